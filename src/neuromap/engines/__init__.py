"""Inference engines: run a loaded checkpoint with PyTorch (eager or ``torch.compile``), ONNX Runtime or
OpenVINO, behind the one interface the pipeline already uses, ``model(batch) -> logits``.

The `Segmenter` resolves the engine once (`resolve_engine`), loads each PyTorch checkpoint and passes it through
`wrap_model` once; everything downstream (slice stacks, padding, TTA, ensembles, labels) is unchanged and does not
know which engine ran. The ONNX engines run a file exported from the checkpoint and cached under
`cache_dir()`, keyed by the checkpoint's bytes, so the export (a few seconds) happens once per checkpoint and
machine; each export is checked against PyTorch before it is used. Which engine "auto" picks, and why, is in
docs/experiments/inference_engines.md (measured by benchmarks/engines.py). PyTorch is always the fallback:
the ONNX engines are optional extras (``pip install 'neuromap[onnx]'`` or ``'neuromap[openvino]'``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch

from neuromap.checkpoint import ModelSpec
from neuromap.errors import NeuroMapError

ENGINES: tuple[str, ...] = ("torch", "torch-compile", "onnxruntime", "openvino")
# engine -> (Python modules it imports, the pip extra that installs them)
REQUIREMENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "onnxruntime": (("onnxruntime", "onnx"), "onnx"),
    "openvino": (("openvino", "onnx"), "openvino"),
}
EXPORTED = tuple(REQUIREMENTS)  # the engines that run the ONNX export of a checkpoint
# What "auto" tries on a CPU, best first (benchmarks/engines.py; docs/experiments/inference_engines.md).
AUTO_ORDER: tuple[str, ...] = ("openvino", "onnxruntime")
EXPORT_VERSION = 1  # bump when the export changes, so cached files are made again


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


def resolve_engine(engine: str, device: torch.device | str = "cpu") -> str:
    """The engine that will run: "auto" is the fastest installed CPU engine (PyTorch on a GPU or when none
    is installed); an explicit choice must be installed and, for the ONNX engines, needs the CPU."""
    on_cpu = torch.device(device).type == "cpu"
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
    digest = hashlib.sha256(path.read_bytes())
    digest.update(f"{torch.__version__}|{EXPORT_VERSION}".encode())
    return digest.hexdigest()[:20]


def _cached_onnx_path(checkpoint: Path) -> Path:
    return cache_dir() / "onnx" / f"{checkpoint.stem}-{_file_key(checkpoint)}.onnx"


def cached_onnx(model: torch.nn.Module, spec: ModelSpec, checkpoint: str | Path) -> Path:
    """The checked ONNX export of ``checkpoint``, made on first use and kept in `cache_dir()`."""
    from neuromap.engines.onnx_export import export_onnx

    target = _cached_onnx_path(Path(checkpoint))
    if not target.is_file():
        try:
            export_onnx(model, spec, target, overwrite=True)  # atomic: concurrent processes never see half a file
        except PermissionError as exc:
            raise NeuroMapError(
                f"cannot write the engine cache {target.parent} ({exc.strerror}). Fix: set NEUROMAP_CACHE_DIR to a "
                "writable folder, or use --engine torch."
            ) from None
    return target


def wrap_model(model: torch.nn.Module, spec: ModelSpec, engine: str, checkpoint: str | Path,
               fallback: bool = False):
    """``model`` as ``engine`` (a name `resolve_engine` returned) runs it: the module itself for "torch", else a
    callable taking and returning torch tensors exactly like it. ``checkpoint`` (the file ``model`` was loaded
    from) keys the export cache. With ``fallback`` (the user asked for "auto") a model that cannot be exported
    runs in PyTorch with a warning instead of failing the segmentation.

    Built once per loaded model by its owner (`neuromap.segmenter.Segmenter`), which keeps it for every case."""
    if engine == "torch":
        return model
    path = Path(checkpoint).resolve()
    try:
        return _build(model, spec, engine, path)
    except Exception as exc:  # an architecture the exporter or runtime cannot handle
        if not fallback:
            raise
        warnings.warn(f"{path.name}: engine {engine} unavailable ({type(exc).__name__}: {exc}); using PyTorch",
                      stacklevel=2)
        return model


def load_runner(checkpoint: Path, engine: str, device: torch.device, fallback: bool = False):
    """(the checkpoint's model as ``engine`` runs it, its spec); see `wrap_model` for ``fallback``.

    With ONNX Runtime or OpenVINO and this checkpoint's export already cached, the PyTorch network is never built,
    so neither its module nor MONAI is imported: about 5 of the 18 CPU-seconds of a one-case `neuromap segment`
    process on the project's VM went to MONAI's import alone, twice the network's own run."""
    from neuromap.checkpoint import load_model, read_checkpoint
    from neuromap.inference import memory_format_of

    path = Path(checkpoint).resolve()
    exported = _cached_onnx_path(path) if engine in EXPORTED else None  # hashes the checkpoint: once
    if exported is not None and exported.is_file():
        spec = ModelSpec.from_dict(read_checkpoint(path)["spec"])
        try:
            return _runtime(engine, exported), spec
        except Exception:  # the same failure `wrap_model` reports (or falls back from), with the network built
            if not fallback:
                raise
    model, spec = load_model(path)
    model = model.to(device, memory_format=memory_format_of(model, spec))
    return wrap_model(model, spec, engine, path, fallback=fallback), spec


def _build(model: torch.nn.Module, spec: ModelSpec, name: str, checkpoint: Path):
    if name == "torch-compile":
        from neuromap.engines.runtimes import CompiledTorchModel

        return CompiledTorchModel(model)
    return _runtime(name, cached_onnx(model, spec, checkpoint))


def _runtime(name: str, onnx_file: Path):
    """An ONNX file in the runtime ``name`` ("onnxruntime" or "openvino")."""
    from neuromap.engines import runtimes

    threads = torch.get_num_threads()
    if name == "onnxruntime":
        return runtimes.OnnxRuntimeModel(onnx_file, threads)
    return runtimes.OpenVinoModel(onnx_file, threads, cache_dir() / "openvino")


def engine_name(model) -> str:
    """What ran a (possibly wrapped) model, for reports."""
    return getattr(model, "name", "torch") if not isinstance(model, torch.nn.Module) else "torch"


__all__ = ["AUTO_ORDER", "ENGINES", "cache_dir", "cached_onnx", "engine_available", "engine_name", "load_runner",
           "require_engine", "resolve_engine", "wrap_model"]
