"""Inference engines x precision on real BraTS cases: model-stage time per full case, peak memory, label agreement.

For the model (the shipped default, or ``--model``), each engine (PyTorch eager with channels_last,
torch.compile, ONNX Runtime, OpenVINO) and precision (fp32; int8 = static QDQ quantization calibrated on other
cases' real slices), every case goes through the normal `Segmenter.segment_case` path; only the model the
Segmenter would load is swapped for the engine, wrapped in a timer around each forward call (the model stage:
all axial slices of the prepared case). Measured per case, all engines in turn in one process (ratios against
PyTorch eager from the same case and run):
  - CPU seconds and wall seconds of the model stage (CPU seconds with 1 thread do not count time spent waiting
    for a busy CPU, so they are the robust number on a loaded machine; wall seconds with 2 threads are the user's
    number on a quiet one);
  - peak RSS above the RSS before the case (/proc/self/clear_refs resets the high-water mark);
  - Dice per region (WT/TC/ET) of the engine's labels against eager's, and each one's Dice against the expert
    labels (the change is what the int8 bar of 0.005 per region is about).
Each ISA setting runs in its own process, because the variables are read when the libraries load: "native", and
"avx2", which caps oneDNN (PyTorch convolutions, OpenVINO) and ATen at AVX2 like the team's AMD EPYC; ONNX
Runtime's MLAS has no such switch and always uses the best ISA present (stated in the results). The CPU's fp32
peak is a large torch.matmul in the same process, and the network's FLOPs per case come from
torch.utils.flop_counter, so achieved GFLOP/s can be set against it.

    python benchmarks/engines.py [--cases 4] [--threads 1] [--isa avx2 native] [--compile] [--model NAME|CKPT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import ISA_ENV, cpu_info, matmul_peak_gflops, slice_model_flops
from timed import Timed

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brats2018"
RESULT = ROOT / "benchmarks" / "results" / "engines.json"
# Never used to train the shipped model (its card: validation and test cases) and never used for calibration.
EVAL_CASES = ["Brats18_CBICA_AMH_1", "Brats18_2013_23_1", "Brats18_CBICA_AOP_1", "Brats18_CBICA_AOZ_1",
              "Brats18_CBICA_ATD_1", "Brats18_CBICA_AVG_1"]
CALIBRATION_CASES = ["Brats18_2013_2_1", "Brats18_CBICA_ARW_1"]  # training cases of the models measured
def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def openvino_kernels(engine) -> dict:
    """Kernel implementations OpenVINO picked (e.g. jit_avx2_FP32 vs jit_avx512_FP32): proves the ISA cap."""
    counts: dict[str, int] = {}
    for op in engine.compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "primitiveType" in info:
            kind = info["primitiveType"].astype(str)
            if "jit" in kind or "brgconv" in kind or "gemm" in kind:
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def build_engines(model, spec, checkpoint: Path, work: Path, args, threads: int) -> tuple[dict, dict]:
    """name -> engine, and notes (export check, quantization time, kernels)."""
    import torch

    from neuromap.engines.onnx_export import export_onnx
    from neuromap.engines.quantize import calibration_batches, quantize_int8
    from neuromap.engines.runtimes import OnnxRuntimeModel, OpenVinoModel
    from neuromap.engines.torch_runner import CompiledTorchModel, TorchModel
    from neuromap.io import discover_cases, load_case
    from neuromap.preprocess import prepare

    notes: dict = {}
    fp32 = work / f"{checkpoint.stem}.onnx"
    start = time.perf_counter()
    export = export_onnx(model, spec, fp32, overwrite=True)
    notes["export"] = {"seconds": time.perf_counter() - start, "max_abs_logit_diff": export.max_abs_diff}
    engines = {"torch eager fp32": TorchModel(model)}
    engines["onnxruntime fp32"] = OnnxRuntimeModel(fp32, threads)
    engines["openvino fp32"] = OpenVinoModel(fp32, threads)
    notes["aten_capability"] = torch.backends.cpu.get_cpu_capability()
    if args.compile:
        engines["torch.compile fp32"] = CompiledTorchModel(model)
    if args.fp32_only:
        notes["openvino_kernels"] = {"openvino fp32": openvino_kernels(engines["openvino fp32"])}
        return engines, notes
    start = time.perf_counter()
    images = []
    for name in CALIBRATION_CASES:  # central 48 slices of each: where the tumour and most brain are
        image = prepare(load_case(discover_cases(DATA / name)[0], spec.modalities), spec.preprocess).image
        mid = image.shape[-1] // 2
        images.append(image[..., mid - 24: mid + 24])
    batches = calibration_batches(model, spec, images, keep_every=1, slice_batch_size=8)
    int8 = quantize_int8(fp32, work / f"{checkpoint.stem}-int8.onnx", batches, method=args.calibration)
    notes["int8"] = {"seconds": time.perf_counter() - start, "calibration_slices": sum(len(b) for b in batches),
                     "calibration_cases": CALIBRATION_CASES, "method": args.calibration}
    engines["onnxruntime int8"] = OnnxRuntimeModel(int8, threads)
    engines["openvino int8"] = OpenVinoModel(int8, threads)
    notes["openvino_kernels"] = {k: openvino_kernels(engines[k]) for k in ("openvino fp32", "openvino int8")}
    return engines, notes


def segmenter_running(runner, spec, cfg):
    """The normal `Segmenter` (internal labels, no files) with ``runner`` in place of the model it would load:
    the one change the benchmark makes to the segment path."""
    from neuromap.segmenter import Segmenter

    class WithRunner(Segmenter):
        def _models(self, paths):
            return [(runner, spec)]

    return WithRunner(None, cfg, "internal")


def run_model(label: str, checkpoint: Path, args, out: dict, save) -> None:
    import nibabel as nib
    import numpy as np
    import torch

    from neuromap.checkpoint import load_model
    from neuromap.config import InferenceConfig
    from neuromap.io import discover_cases, load_case
    from neuromap.labels import to_internal
    from neuromap.metrics import dice_per_region
    from neuromap.preprocess import prepare

    model, spec = load_model(checkpoint)
    model = model.to(memory_format=torch.channels_last)
    work = Path(tempfile.mkdtemp(prefix="engines-"))
    engines, notes = build_engines(model, spec, checkpoint, work, args, torch.get_num_threads())
    record = out.setdefault("models", {})[label] = {"checkpoint": str(checkpoint), "notes": notes, "cases": {}}
    cfg = InferenceConfig(threads=args.threads, device="cpu", engine="torch")
    names = list(engines)
    for index, case_name in enumerate(EVAL_CASES[: args.cases]):
        case = discover_cases(DATA / case_name)[0]
        truth = to_internal(np.asarray(nib.load(case.seg.path).dataobj), "brats")
        if "flops_per_case" not in notes:
            prepared = prepare(load_case(case, spec.modalities), spec.preprocess).image
            notes["flops_per_case"] = slice_model_flops(model, spec, prepared.shape[1:3], prepared.shape[-1])
            notes["prepared_shape"] = list(prepared.shape)
        rows, labels = {}, {}
        order = names[index % len(names):] + names[: index % len(names)]  # rotate: drift hits every engine
        for name in order:
            timed = Timed(engines[name])
            before = _rss_mb("VmRSS")
            _reset_peak()
            result = segmenter_running(timed, spec, cfg).segment_case(case)
            peak = _rss_mb("VmHWM")
            labels[name] = np.asarray(result.labels.dataobj)
            rows[name] = {"model_wall_s": timed.wall, "model_cpu_s": timed.cpu, "peak_rss_mb": peak,
                          "peak_above_start_mb": peak - before,
                          "dice_vs_truth": dice_per_region(labels[name], truth)}
        reference = labels["torch eager fp32"]
        for name in names:
            rows[name]["dice_vs_eager"] = dice_per_region(labels[name], reference)
        record["cases"][case_name] = rows
        save()
        print(f"[{label}] {case_name}: " + ", ".join(f"{n} {r['model_cpu_s']:.1f} cpu-s" for n, r in rows.items()),
              flush=True)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from neuromap.zoo import default_model, model_path

    out = {"isa": args.child, "env": ISA_ENV[args.child], "threads": args.threads, "cpu": cpu_info(),
           "torch": torch.__version__, "matmul_peak": matmul_peak_gflops()}
    target = Path(args.child_json)

    def save() -> None:
        target.write_text(json.dumps(out, indent=1, default=str))

    if args.model:
        run_model(Path(args.model).stem, model_path(args.model), args, out, save)
    else:
        shipped = default_model(["t1", "t1ce", "t2", "flair"], "brats")
        run_model(f"{shipped.name} (shipped default)", shipped.file, args, out, save)
    out["cpu"]["load_avg_end"] = os.getloadavg()
    save()


def _median_ratio(per: list[dict], eager: list[dict], key: str) -> float:
    return round(statistics.median(e[key] / p[key] for p, e in zip(per, eager, strict=True)), 2)


def summarize(results: list[dict]) -> list[dict]:
    """One row per ISA x model x engine: medians over cases of the ratios to eager, worst agreement."""
    rows = []
    regions = ("WT", "TC", "ET")
    for run in results:
        for model, record in run.get("models", {}).items():
            cases = record["cases"]
            if not cases:
                continue
            flops = record["notes"].get("flops_per_case", 0)
            for engine in next(iter(cases.values())):
                per = [c[engine] for c in cases.values()]
                eager = [c["torch eager fp32"] for c in cases.values()]
                cpu = statistics.median(p["model_cpu_s"] for p in per)
                pairs = list(zip(per, eager, strict=True))
                change = {r: max(abs(p["dice_vs_truth"][r] - e["dice_vs_truth"][r]) for p, e in pairs) for r in regions}
                rows.append({
                    "isa": run["isa"], "threads": run["threads"], "model": model, "engine": engine,
                    "n_cases": len(per), "model_cpu_s": round(cpu, 2),
                    "model_wall_s": round(statistics.median(p["model_wall_s"] for p in per), 2),
                    "cpu_speedup_vs_eager": _median_ratio(per, eager, "model_cpu_s"),
                    "wall_speedup_vs_eager": _median_ratio(per, eager, "model_wall_s"),
                    "peak_above_start_mb": round(max(p["peak_above_start_mb"] for p in per)),
                    "peak_rss_mb": round(max(p["peak_rss_mb"] for p in per)),
                    "min_dice_vs_eager": {r: round(min(p["dice_vs_eager"][r] for p in per), 4) for r in regions},
                    "max_abs_dice_change_vs_truth": {r: round(v, 4) for r, v in change.items()},
                    "gflop_per_cpu_s": round(flops / 1e9 / cpu, 1) if cpu else None,
                    "matmul_peak_gflop_per_cpu_s": round(run["matmul_peak"]["gflops_per_cpu_s_best"], 1),
                })
    return rows


def markdown(rows: list[dict]) -> str:
    """The table for docs/experiments/inference_engines.md."""
    lines = ["| ISA | model | engine | n | model stage CPU s (median) | speed-up vs eager, CPU / wall | peak above "
             "start MB | min Dice vs eager WT/TC/ET | max abs change of Dice vs truth WT/TC/ET | GFLOP per CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        agree = " / ".join(f"{r['min_dice_vs_eager'][k]:.4f}" for k in ("WT", "TC", "ET"))
        change = " / ".join(f"{r['max_abs_dice_change_vs_truth'][k]:.4f}" for k in ("WT", "TC", "ET"))
        model = r["model"].split(" (")[0]
        lines.append(f"| {r['isa']} | {model} | {r['engine']} | {r['n_cases']} | {r['model_cpu_s']} "
                     f"| {r['cpu_speedup_vs_eager']}x / {r['wall_speedup_vs_eager']}x | {r['peak_above_start_mb']} "
                     f"| {agree} | {change} | {r['gflop_per_cpu_s']} (peak {r['matmul_peak_gflop_per_cpu_s']}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4, help="evaluation cases per model (max 6)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", nargs="+", choices=sorted(ISA_ENV), default=["avx2", "native"])
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile)")
    parser.add_argument("--calibration", choices=["minmax", "percentile", "entropy"], default="minmax")
    parser.add_argument("--model", help="shipped model name or checkpoint (default: the shipped four-sequence model)")
    parser.add_argument("--fp32-only", action="store_true", help="skip int8 (quantization takes minutes)")
    parser.add_argument("--json", default=str(RESULT))
    parser.add_argument("--child", choices=sorted(ISA_ENV), help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: the benchmark needs the shared BraTS 2018 cases.")
    results = []
    for isa in args.isa:
        part = Path(args.json).with_suffix(f".{isa}.part.json")
        cmd = [sys.executable, __file__, "--child", isa, "--child-json", str(part), "--cases", str(args.cases),
               "--threads", str(args.threads), "--calibration", args.calibration]
        cmd += (["--fp32-only"] if args.fp32_only else []) + (["--compile"] if args.compile else [])
        cmd += ["--model", args.model] if args.model else []
        subprocess.run(cmd, check=False, env={**os.environ, **ISA_ENV[isa], "PYTHONWARNINGS": "ignore"})
        if part.is_file():
            results.append(json.loads(part.read_text()))
            part.unlink()
    summary = {"machine": cpu_info(), "runs": results, "summary": summarize(results)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    print(markdown(summary["summary"]))


if __name__ == "__main__":
    main()
