"""Engines that look like a PyTorch model to the inference code: ``engine(batch) -> logits``.

`neuromap.inference` calls ``model(batch)`` with a float32 (N, C, *spatial) tensor (channels_last for 2D) and
works on the returned tensor, so every engine here takes and returns torch tensors on the CPU and nothing else
in the pipeline knows which one ran. The ONNX engines read a file written by `neuromap.engines.onnx_export`,
whose batch and spatial axes are dynamic: native-resolution models get crops of any size padded to the
network's divisor, and the last slice batch of a case is smaller than the others.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch


def _numpy_input(batch: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 array: the ONNX runtimes want plain NCHW memory, not torch's channels_last."""
    return np.ascontiguousarray(batch.detach().to("cpu", torch.float32).contiguous().numpy())


class EngineModel:
    """Common face of the non-PyTorch engines: callable like a module, with the few module methods the
    pipeline calls on a model (``to``, ``eval``) as no-ops, since the engine runs on the CPU only."""

    name = "engine"
    # What `neuromap.inference` builds the batches in: plain NCHW, which ONNX Runtime and OpenVINO read without a
    # copy (PyTorch modules get channels_last).
    memory_format = torch.contiguous_format

    def to(self, *args, **kwargs) -> EngineModel:
        return self

    def eval(self) -> EngineModel:
        return self

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class OnnxRuntimeModel(EngineModel):
    """ONNX Runtime on the CPU (MLAS kernels; all graph optimisations, which fold batch norm into the
    convolutions and pick blocked NCHWc layouts on x86)."""

    def __init__(self, path: str | Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one graph, run op by op: parallelism is inside each convolution
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initialisers etc. are noise for users
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.name = f"onnxruntime {ort.__version__}: {Path(path).name}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: _numpy_input(batch)})
        return torch.from_numpy(logits)


class OpenVinoModel(EngineModel):
    """OpenVINO's CPU plugin (oneDNN kernels) compiled for latency. Inference precision is pinned to f32: on
    CPUs with bf16 support OpenVINO would otherwise silently compute in bf16, which moves labels."""

    def __init__(self, path: str | Path, threads: int, cache_dir: Path | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        if cache_dir is not None:  # compiled blobs: later processes skip most of the compile time
            cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()  # one request, shared by the web app's sessions: one inference at a time
        self.name = f"openvino {ov.__version__}: {Path(path).name}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.request.infer({0: _numpy_input(batch)}, share_inputs=True)
            # The output buffer is reused by the next call: copy it out.
            return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


class CompiledTorchModel(EngineModel):
    """``torch.compile`` (Inductor, C++ code generation on the CPU) of the eager model. Compilation happens on
    the first batches of each new shape, so it pays off only when a process segments many cases."""

    memory_format = torch.channels_last

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model
        self.compiled = torch.compile(model, dynamic=True)
        self.name = "torch.compile (inductor, dynamic shapes)"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.compiled(batch)
