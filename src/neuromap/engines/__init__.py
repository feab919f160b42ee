"""Inference engines: run a loaded checkpoint with PyTorch (eager or ``torch.compile``), ONNX Runtime or
OpenVINO, behind the one interface the pipeline already uses, ``model(batch) -> logits``.

The `Segmenter` resolves the engine once (`resolve_engine`) and loads each checkpoint once as a runner
(`load_runner`: NumPy in, NumPy out, `neuromap.engines.runtimes`); everything downstream (slice stacks, padding,
TTA, ensembles, labels) does not know which engine ran. The ONNX engines run a file exported from the checkpoint
and cached under `cache_dir()`, keyed by the checkpoint's bytes, with the checkpoint's spec beside it, so the export
(a few seconds) happens once per checkpoint and machine, and later processes never import PyTorch; each export is
checked against PyTorch before it is used. Which engine "auto" picks, and why, is in
docs/experiments/inference_engines.md (measured by benchmarks/engines.py). PyTorch is always the fallback:
the ONNX engines are optional extras (``pip install 'neuromap[onnx]'`` or ``'neuromap[openvino]'``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from neuromap.checkpoint import ModelSpec
from neuromap.errors import NeuroMapError
from neuromap.io.atomic import atomic_path

if TYPE_CHECKING:
    import torch

    from neuromap.engines.runtimes import EngineModel

ENGINES: tuple[str, ...] = ("torch", "torch-compile", "onnxruntime", "openvino")
# engine -> (Python modules it imports, the pip extra that installs them)
REQUIREMENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "onnxruntime": (("onnxruntime", "onnx"), "onnx"),
    "openvino": (("openvino", "onnx"), "openvino"),
}
EXPORTED = tuple(REQUIREMENTS)  # the engines that run the ONNX export of a checkpoint
# What "auto" tries on a CPU, best first (benchmarks/engines.py; docs/experiments/inference_engines.md).
AUTO_ORDER: tuple[str, ...] = ("openvino", "onnxruntime")
EXPORT_VERSION = 3  # bump when the export changes, so cached files are made again (3: the spec records the size)


def engine_available(engine: str) -> bool:
    """Whether the packages ``engine`` needs are installed (PyTorch engines always are)."""
    modules = REQUIREMENTS.get(engine, ((), ""))[0]
    return all(importlib.util.find_spec(m) is not None for m in modules)


def require_engine(engine: str) -> None:
    """Raise the user-facing error naming what to install when ``engine``'s packages are missing."""
    if engine not in ENGINES:
        raise NeuroMapError(f"unknown engine '{engine}'. Fix: choose one of {['auto', *ENGINES]}.")
    if not engine_available(engine):
        modules, extra = REQUIREMENTS[engine]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        raise NeuroMapError(
            f"engine '{engine}' needs the Python package(s) {', '.join(missing)}, which are not installed. "
            f"Fix: pip install 'neuromap[{extra}]', or use --engine torch (or auto)."
        )


def resolve_device(name: str) -> str:
    """"cpu" or "cuda" for an `InferenceConfig.device`. "auto" is the CPU without asking PyTorch when the machine
    has no NVIDIA driver (``/proc/driver/nvidia``): CUDA cannot be there, and asking would import PyTorch, a fifth
    of a one-case run with the ONNX engines, which do not need it."""
    if name == "cpu" or (name == "auto" and not Path("/proc/driver/nvidia").exists()):
        return "cpu"
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise NeuroMapError("--device cuda requested but no CUDA GPU is available. Fix: use --device cpu.")
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_threads() -> int:
    """Threads a runner uses when none are configured, decided here for every engine: ``OMP_NUM_THREADS`` when
    set (as PyTorch honours it), else the CPUs this process may run on (PyTorch's own default on the project's
    machines; the runtimes would otherwise pick their own)."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_engine(engine: str, device: str = "cpu") -> str:
    """The engine that will run: "auto" is the fastest installed CPU engine (PyTorch on a GPU or when none
    is installed); an explicit choice must be installed and, for the ONNX engines, needs the CPU."""
    on_cpu = str(device).split(":")[0] == "cpu"
    if engine == "auto":
        return next((e for e in AUTO_ORDER if on_cpu and engine_available(e)), "torch")
    require_engine(engine)
    if engine in REQUIREMENTS and not on_cpu:
        raise NeuroMapError(f"engine '{engine}' runs on the CPU only. Fix: use --device cpu, or --engine torch.")
    return engine


def cache_dir() -> Path:
    """Where exported engine files live: $NEUROMAP_CACHE_DIR, else $XDG_CACHE_HOME/neuromap, else
    ~/.cache/neuromap."""
    if os.environ.get("NEUROMAP_CACHE_DIR"):
        return Path(os.environ["NEUROMAP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neuromap"


def _file_key(path: Path) -> str:
    """The checkpoint's bytes (not PyTorch's version: an export checked once stays right when PyTorch changes)."""
    digest = hashlib.sha256(path.read_bytes())
    digest.update(f"export {EXPORT_VERSION}".encode())
    return digest.hexdigest()[:20]


def _cached_onnx_path(checkpoint: Path) -> Path:
    return cache_dir() / "onnx" / f"{checkpoint.stem}-{_file_key(checkpoint)}.onnx"


def _spec_path(exported: Path) -> Path:
    """The checkpoint's spec beside its cached export: reading it from the checkpoint would import PyTorch."""
    return exported.with_suffix(".spec.json")


def cached_onnx(model: torch.nn.Module, spec: ModelSpec, checkpoint: str | Path) -> Path:
    """The checked ONNX export of ``checkpoint``, made on first use and kept in `cache_dir()` with its spec."""
    from neuromap.engines.onnx_export import export_onnx

    target = _cached_onnx_path(Path(checkpoint))
    if _cached_spec(target) is None:  # missing or damaged (then removed): made again
        try:
            # atomic, the spec last: concurrent processes never see half a file, nor an export without its spec
            export_onnx(model, spec, target, overwrite=True)
            with atomic_path(_spec_path(target), overwrite=True) as tmp:
                tmp.write_text(json.dumps({"spec": spec.to_dict(), "onnx_bytes": target.stat().st_size}))
        except PermissionError as exc:
            raise NeuroMapError(
                f"cannot write the engine cache {target.parent} ({exc.strerror}). Fix: set NEUROMAP_CACHE_DIR to a "
                "writable folder, or use --engine torch."
            ) from None
    return target


def wrap_model(model: torch.nn.Module, spec: ModelSpec, engine: str, checkpoint: str | Path,
               fallback: bool = False, device: str = "cpu", threads: int | None = None) -> EngineModel:
    """``model`` as the runner of ``engine`` (a name `resolve_engine` returned), on ``device`` for the PyTorch
    engines, with ``threads`` (default `default_threads`; PyTorch keeps its own setting). ``checkpoint`` (the file
    ``model`` was loaded from) keys the export cache. With ``fallback`` (the user asked for "auto") a model that
    cannot be exported runs in PyTorch with a warning instead of failing the segmentation.

    Built once per loaded model by its owner (`neuromap.segmenter.Segmenter`), which keeps it for every case."""
    import torch

    from neuromap.engines.torch_runner import CompiledTorchModel, TorchModel

    if threads:
        torch.set_num_threads(threads)
    threads = threads or default_threads()  # the runtimes: the same count a cached run (`load_runner`) uses
    path = Path(checkpoint).resolve()
    try:
        if engine in EXPORTED:
            return _runtime(engine, cached_onnx(model, spec, path), threads)
    except Exception as exc:  # an architecture the exporter or runtime cannot handle
        if not fallback:
            raise
        warnings.warn(f"{path.name}: engine {engine} unavailable ({type(exc).__name__}: {exc}); using PyTorch",
                      stacklevel=2)
    # 2D networks run channels_last (oneDNN's convolutions are ~1.5-2x faster so; measured on the shipped U-Net)
    layout = torch.channels_last if spec.model.spatial_dims == 2 else torch.preserve_format
    model = model.to(device, memory_format=layout)
    return (CompiledTorchModel if engine == "torch-compile" else TorchModel)(model, device)


def load_runner(checkpoint: Path, engine: str, device: str = "cpu", fallback: bool = False,
                threads: int | None = None) -> tuple[EngineModel, ModelSpec]:
    """(the checkpoint's model as ``engine`` runs it, its spec); see `wrap_model` for the rest.

    With ONNX Runtime or OpenVINO and this checkpoint's export already cached, PyTorch is never imported (the spec
    is read from beside the export), nor the network's module or MONAI: PyTorch's import was about a fifth of a
    one-case `neuromap segment` process, MONAI's once 5 of its 18 CPU-seconds."""
    from neuromap.checkpoint import load_model

    path = Path(checkpoint).resolve()
    exported = _cached_onnx_path(path) if engine in EXPORTED else None  # hashes the checkpoint: once
    spec = _cached_spec(exported) if exported is not None else None
    if spec is not None:
        try:
            return _runtime(engine, exported, threads or default_threads()), spec
        except Exception:  # a sound export this runtime cannot open: `wrap_model` reports the runtime's own error
            pass  # (or falls back from it) and keeps the export, which is therefore not made again on every run
    model, spec = load_model(path)
    return wrap_model(model, spec, engine, path, fallback, device, threads), spec


def _cached_spec(exported: Path) -> ModelSpec | None:
    """The spec of an intact cache entry, else None with a damaged entry (cut short by a full disk, edited) removed
    so that it is exported again: the spec records the export's size, so a damaged file is told apart from a
    runtime that cannot open a sound one (that one is kept, or every run would export it again)."""
    if not (exported.is_file() and _spec_path(exported).is_file()):
        return None
    try:
        entry = json.loads(_spec_path(exported).read_text())
        if entry["onnx_bytes"] == exported.stat().st_size:
            return ModelSpec.from_dict(entry["spec"])
    except Exception:  # unreadable or edited: removed below
        pass
    for stale in (exported, _spec_path(exported)):
        stale.unlink(missing_ok=True)
    return None


def _runtime(name: str, onnx_file: Path, threads: int) -> EngineModel:
    """An ONNX file in the runtime ``name`` ("onnxruntime" or "openvino")."""
    from neuromap.engines import runtimes

    if name == "onnxruntime":
        return runtimes.OnnxRuntimeModel(onnx_file, threads)
    return runtimes.OpenVinoModel(onnx_file, threads, cache_dir() / "openvino")


__all__ = ["AUTO_ORDER", "ENGINES", "cache_dir", "cached_onnx", "default_threads", "engine_available",
           "load_runner", "require_engine", "resolve_device", "resolve_engine", "wrap_model"]
