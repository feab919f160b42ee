"""What the benchmarks say about the machine and the network's arithmetic, shared by `segment_speed.py` and
`engines.py`: the CPU (name, family/model, ISA flags) and its load while measuring, the CPU's measured fp32 matmul
rate (the hardware limit the model stage is set against), the FLOPs of the network on a case, and a timer around
the network's calls (the model stage's wall and CPU seconds).

Imported as a sibling module (``python benchmarks/<script>.py`` puts this folder on the path).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")

# Caps the vector ISA of oneDNN (PyTorch convolutions, OpenVINO) and ATen at AVX2, like the team's AMD EPYC; read
# when the libraries load, so set for a whole process. ONNX Runtime's MLAS has no such switch.
ISA_ENV = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                  "OV_CPU_MAX_ISA": "AVX2"}}


def cpu_info() -> dict:
    """The CPU as /proc/cpuinfo names it (a VM may show only "AMD EPYC": family and model then say which
    generation), its vector ISA flags, and the load average at this moment."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""

    def field(name: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(name)), "")

    flags = set(field("flags").split())
    return {"model": field("model name") or platform.processor(), "family": field("cpu family"),
            "model_number": field("model\t"), "cores": os.cpu_count(),
            "flags": [f for f in FLAGS if f in flags], "load_avg_start": os.getloadavg()}


def load_now() -> dict:
    """Load average (1, 5, 15 min) and, where the kernel reports it, the share of time runnable tasks waited
    for a CPU (/proc/pressure/cpu "some avg10"): how much the measurement competed with other work."""
    pressure = Path("/proc/pressure/cpu")
    some = pressure.read_text().split("\n")[0] if pressure.is_file() else ""
    avg10 = next((float(p.split("=")[1]) for p in some.split() if p.startswith("avg10=")), None)
    return {"load_avg": [round(v, 2) for v in os.getloadavg()], "cpu_pressure_some_avg10_pct": avg10}


def matmul_peak_gflops(n: int = 2048, repeats: int = 7) -> dict:
    """The CPU's fp32 rate on a large torch.matmul (MKL) with the current torch thread count: best wall and
    best per-CPU-second GFLOP/s over ``repeats``."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    flops = 2 * n**3
    return {"n": n, "threads": torch.get_num_threads(), "gflops_wall_best": flops / min(walls) / 1e9,
            "gflops_per_cpu_s_best": flops / min(cpus) / 1e9}


def forward_flops(model, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of an input of ``shape`` (convolutions and matmuls, 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(shape))
    return counter.get_total_flops()


def slice_model_flops(model, spec, in_plane: tuple[int, int], slices: int) -> int:
    """FLOPs of a 2D/2.5D model over ``slices`` axial slices of ``in_plane`` size, padded to the network's
    divisor as inference pads them."""

    divisor = spec.divisor
    x, y = (-(-s // divisor) * divisor for s in in_plane)
    return forward_flops(model, (1, spec.preprocess.in_channels, x, y)) * slices


