"""Runners: what `neuromap.inference` calls, ``runner(batch) -> logits`` on NumPy arrays, whatever runs the network.

`neuromap.inference` calls ``runner(batch)`` with a float32 (N, C, *spatial) array and works on the returned
array, so nothing in the pipeline knows which engine ran. This module imports neither PyTorch nor the runtimes
(each is imported when its runner is built): a process running OpenVINO or ONNX Runtime never pays PyTorch's
import. PyTorch's own runners are in `neuromap.engines.torch_runner`. The ONNX engines read a file written by
`neuromap.engines.onnx_export`, whose batch and spatial axes are dynamic: native-resolution models get crops of
any size padded to the network's divisor, and the last slice batch of a case is smaller than the others.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from neuromap.config import InferenceConfig


class EngineModel:
    """Common face of the runners: callable on a NumPy batch, returning NumPy logits."""

    name = "engine"
    # The layout `neuromap.inference` builds 2D batches in: plain NCHW, which ONNX Runtime and OpenVINO read
    # without a copy; PyTorch runners want NHWC memory (channels_last, ~1.5-2x faster convolutions with oneDNN).
    channels_last = False

    def __call__(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    device = "cpu"  # where 3D sliding windows are cut (`sliding_window`)

    def predict_window(self, window: torch.Tensor) -> torch.Tensor:
        """One batch of 3D windows, as MONAI's sliding window hands them over (tensors on ``device``)."""
        import torch

        return torch.from_numpy(self(window.numpy()))

    def sliding_window(self, image: np.ndarray, roi_size: Sequence[int], cfg: InferenceConfig) -> np.ndarray:
        """3D networks: logits (K, X, Y, Z) of a (C, X, Y, Z) volume from MONAI's Gaussian-weighted sliding
        windows, each window batch through `predict_window` (MONAI, and so PyTorch, only for 3D models)."""
        import torch
        from monai.inferers import sliding_window_inference

        with torch.inference_mode():
            logits = sliding_window_inference(
                torch.from_numpy(image[None]).to(self.device), roi_size=roi_size, sw_batch_size=cfg.sw_batch_size,
                predictor=self.predict_window, overlap=cfg.overlap, mode="gaussian",
            )[0]
        return logits.float().cpu().numpy()

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

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return logits


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

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)
            # The output buffer is reused by the next call: copy it out.
            return self.request.get_output_tensor(0).data.copy()
