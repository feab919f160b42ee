"""int8 post-training quantization of an exported ONNX file, calibrated on real prepared inputs.

Static quantization (ONNX Runtime, QDQ format): weights int8 per output channel, activations uint8 with ranges
measured on calibration batches. The batches are recorded from the normal inference path (the exact slice
stacks, padding and z-scoring the model sees in `neuromap segment`), so calibration cannot drift from what
inference feeds the network. The QDQ file runs in ONNX Runtime and in OpenVINO (which reads the Q/DQ pairs as
its own int8 FakeQuantize). ``reduce_range`` (7-bit weights) is on because the team's CPUs have AVX2 without
VNNI, where 8-bit u8s8 products can saturate (ONNX Runtime's documented advice for such CPUs).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from neuromap.checkpoint import ModelSpec
from neuromap.config import InferenceConfig
from neuromap.engines.runtimes import EngineModel
from neuromap.engines.torch_runner import TorchModel
from neuromap.io.atomic import atomic_path


class _Recorder(EngineModel):
    """Runs the PyTorch model and keeps every ``keep_every``-th input batch, in the plain NCHW layout the ONNX
    runtimes read."""

    def __init__(self, model: torch.nn.Module, keep_every: int) -> None:
        self.model, self.keep_every, self.calls, self.batches = TorchModel(model), keep_every, 0, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.calls % self.keep_every == 0:
            self.batches.append(np.array(batch, dtype=np.float32))
        self.calls += 1
        return self.model(batch)


def calibration_batches(model: torch.nn.Module, spec: ModelSpec, images: Iterable[np.ndarray],
                        keep_every: int = 2, slice_batch_size: int = 8) -> list[np.ndarray]:
    """Network inputs recorded while running the model on prepared images (``prepare(...).image``)."""
    from neuromap.inference import predict_probs

    recorder = _Recorder(model, keep_every)
    # Every slice, not only those `segment` runs with skip_slices: the ranges must cover every input it may see.
    cfg = InferenceConfig(slice_batch_size=slice_batch_size, device="cpu", skip_slices=False)
    for image in images:
        predict_probs([(recorder, spec)], image, cfg)
    return recorder.batches


def quantize_int8(fp32_onnx: str | Path, target: str | Path, batches: Sequence[np.ndarray],
                  method: str = "minmax", overwrite: bool = True) -> Path:
    """Write the int8 (QDQ) version of ``fp32_onnx`` to ``target``, atomically; metadata is kept."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict | None:
            batch = next(self.items, None)
            return None if batch is None else {"image": batch}

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    props = {p.key: p.value for p in onnx.load(str(fp32_onnx)).metadata_props}
    with tempfile.TemporaryDirectory(prefix="neuromap-quant-") as tmp, atomic_path(target, overwrite) as out:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False},
        )
        proto = onnx.load(str(out))
        onnx.helper.set_model_props(proto, {**props, "precision": f"int8 (static, QDQ, {method} calibration)"})
        onnx.save(proto, str(out))
    return Path(target)
