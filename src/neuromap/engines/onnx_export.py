"""ONNX export of any NeuroMap checkpoint: a self-describing file that the ONNX engines (and users' own tools)
run without this package.

The file's metadata carries the model's spec (modalities in channel order, preprocessing, task, output type,
size divisor) as JSON, like a checkpoint does, so nothing else is needed to use it. Batch and spatial axes are
dynamic. The exporter is PyTorch's TorchScript-based one (``dynamo=False``): on this model family it is ~8x
faster than the dynamo exporter, writes one file instead of a graph plus an external-data file, and needs no
onnxscript; both give the same logits to ~1e-6. Every export is checked against PyTorch before it counts.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuromap.checkpoint import ModelSpec
from neuromap.errors import NeuroMapError
from neuromap.io.atomic import atomic_path

FORMAT = "neuromap-onnx-v1"
OPSET = 17
INPUT, OUTPUT = "image", "logits"
# float32 logits of the same graph through other kernels differ by ~1e-5 on these networks; 1e-3 still catches
# any real mistake (a wrong weight or layer shifts logits by orders of magnitude more).
TOLERANCE = 1e-3


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float  # largest |logit difference| between PyTorch and the ONNX file on a random input
    checked_with: str  # the runtime that ran the file for that check
    input_shape: tuple[int, ...]


def example_shape(spec: ModelSpec, batch: int = 2, grow: int = 0) -> tuple[int, ...]:
    """A valid input shape: the model's training patch (each side a multiple of its divisor), ``grow`` more
    divisor steps on the last axis so a check can use a size the export never saw."""
    divisor = spec.divisor
    sides = [math.ceil(s / divisor) * divisor for s in spec.patch_size]
    sides[-1] += grow * divisor
    return (batch, spec.preprocess.in_channels, *sides)


def metadata(spec: ModelSpec) -> dict[str, str]:
    """The spec as ONNX ``metadata_props`` (string values): the full spec as JSON plus the keys a reader of
    the file most needs at a glance."""
    axes = "N, C, X, Y" if spec.model.spatial_dims == 2 else "N, C, X, Y, Z"
    return {
        "neuromap_format": FORMAT,
        "neuromap_spec": json.dumps(spec.to_dict(), default=list),
        "modalities": ",".join(spec.modalities),
        "context_slices": str(spec.preprocess.context_slices),
        "task": spec.task,
        "output": spec.model.out,
        "activation": "sigmoid" if spec.model.out == "regions" else "softmax",
        "input_layout": f"({axes}) float32, z-scored per sequence; channels = modalities x (2 * context_slices + 1)",
        "size_divisor": str(spec.divisor),
        "research_use_only": "true",
    }


def spec_from_onnx(path: str | Path) -> ModelSpec:
    """The ModelSpec stored in an exported file (for tools that run ONNX files made by ``neuromap export``)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if props.get("neuromap_format") != FORMAT:
        raise NeuroMapError(f"{path}: not an ONNX file written by `neuromap export` (no '{FORMAT}' metadata).")
    return ModelSpec.from_dict(json.loads(props["neuromap_spec"]))


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise NeuroMapError(
            "ONNX export needs the 'onnx' package. Fix: pip install 'neuromap[onnx]' (onnx + onnxruntime)."
        ) from None


def _run_onnx(path: Path, x: np.ndarray) -> tuple[np.ndarray, str]:
    """Run the file with whichever runtime is installed (ONNX Runtime first)."""
    from neuromap.engines.runtimes import OnnxRuntimeModel, OpenVinoModel

    for module, engine in (("onnxruntime", OnnxRuntimeModel), ("openvino", OpenVinoModel)):
        try:
            __import__(module)
        except ImportError:
            continue
        runner = engine(path, threads=torch.get_num_threads())
        return runner(x), runner.name.split(":")[0]
    raise NeuroMapError(
        "checking the exported file needs ONNX Runtime or OpenVINO. Fix: pip install 'neuromap[onnx]'."
    )


def verify(model: torch.nn.Module, spec: ModelSpec, path: Path, seed: int = 0) -> tuple[float, str, tuple]:
    """Max |logit difference| between PyTorch and the ONNX file on a random input whose batch and last
    spatial size differ from the export's example (so the dynamic axes are exercised too)."""
    shape = example_shape(spec, batch=3, grow=1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(x)
    got, runtime = _run_onnx(path, x.numpy())
    if got.shape != tuple(expected.shape):
        raise RuntimeError(f"{path}: the export returned shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    return float(np.abs(got - expected.numpy()).max()), runtime, shape


def export_onnx(model: torch.nn.Module, spec: ModelSpec, target: str | Path, overwrite: bool = False,
                check: bool = True) -> ExportResult:
    """Write ``model`` (eval mode, float32) to ``target`` as ONNX with dynamic batch and spatial axes and the
    spec in its metadata; atomic (a failed export or check leaves nothing under ``target``)."""
    _require_onnx()
    import onnx

    target = Path(target)
    model = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    dims = ["n", *"xyz"[: spec.model.spatial_dims]]
    dynamic = {name: {0: "n", **{i + 2: d for i, d in enumerate(dims[1:])}} for name in (INPUT, OUTPUT)}
    example = torch.zeros(example_shape(spec))
    with atomic_path(target, overwrite) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on constant folding are not for users
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, metadata(spec))
        proto.producer_name = "neuromap"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        diff, runtime, shape = verify(model, spec, tmp) if check else (float("nan"), "not checked", ())
        if diff > TOLERANCE:
            raise RuntimeError(f"ONNX export differs from PyTorch by {diff:.2e} (> {TOLERANCE}): a bug, not kept")
    return ExportResult(target, diff, runtime, shape)


def export_command(model: str, fmt: str = "onnx", output: str | Path | None = None, overwrite: bool = False) -> str:
    """``neuromap export MODEL --format onnx [-o PATH]``: a shipped name or checkpoint path to a checked ONNX
    file; returns the line the CLI prints."""
    from neuromap.checkpoint import load_model
    from neuromap.zoo import resolve_model_paths

    if fmt != "onnx":
        raise NeuroMapError(f"export format '{fmt}' is not supported. Fix: use --format onnx.")
    _require_onnx()
    (path,) = resolve_model_paths(model, [])
    net, spec = load_model(path)
    target = Path(output) if output else Path.cwd() / f"{Path(path).stem}.onnx"
    if target.suffix != ".onnx":
        raise NeuroMapError(f"{target}: the output file must end in .onnx.")
    result = export_onnx(net, spec, target, overwrite=overwrite)
    return (f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB; inputs {', '.join(spec.modalities)} "
            f"x {2 * spec.preprocess.context_slices + 1} slices, task {spec.task}, output {spec.model.out}); "
            f"checked with {result.checked_with} on a random input {result.input_shape}: "
            f"max |logit difference| vs PyTorch = {result.max_abs_diff:.2e}")
