"""One dict from architecture name to builder, so configs, checkpoints and the CLI name models by string.

A builder is ``builder(spatial_dims, in_channels, out_channels, *, option=default, ...)``. Its keyword-only
parameters *are* the allowed ``ModelConfig.options`` and their defaults, so the options a user may set and
the code that uses them cannot drift apart.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from neuromap.config import ModelConfig
from neuromap.errors import NeuroMapError

if TYPE_CHECKING:  # the catalogue is read without PyTorch (`Architecture`); the builders' modules import it
    import torch

Builder = Callable[..., "torch.nn.Module"]


@dataclass
class Architecture:
    """A network as the catalogue knows it without importing it: the module that defines (and registers) its
    builder, the dimensionalities it supports and its size constraint."""

    module: str
    spatial_dims: tuple[int, ...]
    divisor: Callable[[Mapping[str, Any]], int]  # resolved options -> factor input sizes must be divisible by
    registered: Builder | None = field(default=None, repr=False)  # set by `register` when the module is imported

    @property
    def builder(self) -> Builder:
        """The builder, importing its module (and with it MONAI) on first use."""
        if self.registered is None:
            importlib.import_module(self.module)
        return self.registered

    @property
    def defaults(self) -> dict[str, Any]:
        params = inspect.signature(self.builder).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _constant(divisor: int) -> Callable[[Mapping[str, Any]], int]:
    return lambda _options: divisor


# Every architecture, known without importing its module: inference with an exported engine (ONNX Runtime,
# OpenVINO) never builds the PyTorch network, so it never pays MONAI's import (about 5 CPU-seconds per process,
# more than the network's own run on a full case); see `neuromap.engines.load_runner`. Registered (spatial dims,
# size divisor with default options): see `neuromap.models`.
REGISTRY: dict[str, Architecture] = {
    "unet2d": Architecture("neuromap.models.monai_nets", (2,), _constant(16)),
    "unet3d": Architecture("neuromap.models.monai_nets", (3,), _constant(16)),
    "attention_unet": Architecture("neuromap.models.monai_nets", (2, 3), lambda o: math.prod(o["strides"])),
    "segresnet": Architecture("neuromap.models.monai_nets", (2, 3), lambda o: 2 ** (len(o["blocks_down"]) - 1)),
    "resunet": Architecture("neuromap.models.resunet", (2, 3), _constant(32)),
    "deeplabv3plus": Architecture("neuromap.models.deeplab", (2, 3), _constant(32)),
}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator binding a builder function or ``nn.Module`` class to its catalogue entry ``name``."""

    def decorate(builder: Builder) -> Builder:
        arch = REGISTRY[name]
        if arch.registered is not None:
            raise ValueError(f"model name '{name}' is registered twice")
        arch.registered = builder
        return builder

    return decorate


def _architecture(cfg: ModelConfig) -> Architecture:
    if cfg.name not in REGISTRY:
        raise NeuroMapError(
            f"unknown model name '{cfg.name}'. Fix: set model.name to one of {sorted(REGISTRY)}."
        )
    arch = REGISTRY[cfg.name]
    if cfg.spatial_dims not in arch.spatial_dims:
        supporting = sorted(n for n, a in REGISTRY.items() if cfg.spatial_dims in a.spatial_dims)
        raise NeuroMapError(
            f"model '{cfg.name}' does not support spatial_dims={cfg.spatial_dims}. Fix: set "
            f"model.spatial_dims to one of {list(arch.spatial_dims)}, or pick a {cfg.spatial_dims}D model: "
            f"{supporting}."
        )
    return arch


def resolve_options(cfg: ModelConfig) -> dict[str, Any]:
    """The builder's defaults overlaid with ``cfg.options`` (unknown options are an error).

    Storing this, rather than ``cfg.options``, keeps a model rebuildable if a default changes later.
    """
    arch = _architecture(cfg)
    defaults = arch.defaults
    unknown = sorted(set(cfg.options) - set(defaults))
    if unknown:
        raise NeuroMapError(
            f"model '{cfg.name}' has no option(s) {unknown}. "
            f"Fix: use only these options (defaults shown): {defaults}."
        )
    checked = {key: _checked(cfg.name, key, value, defaults[key]) for key, value in cfg.options.items()}
    return {**defaults, **checked}


def _checked(model: str, key: str, value: Any, default: Any) -> Any:
    """Check an option against its default's kind, so a bad value fails here with its name, not deep in MONAI.

    Options are sizes (int, or a sequence of ints, e.g. channels per level), probabilities (float: dropout)
    or names (str: e.g. norm). Sequences come back as tuples whether YAML gave lists or not.
    """
    if isinstance(default, float):
        ok, want = type(value) in (int, float) and 0 <= value < 1, "a probability in [0, 1)"
    elif isinstance(default, int):
        ok, want = type(value) is int and value >= 1, "a positive integer"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    else:  # a size per level
        value = tuple(value) if isinstance(value, list | tuple) else value
        ok = isinstance(value, tuple) and len(value) > 0 and all(type(v) is int and v >= 1 for v in value)
        want = "a non-empty list of positive integers"
    if not ok:
        raise NeuroMapError(
            f"model '{model}': option {key}={value!r} is invalid. Fix: give {want} (default {default!r})."
        )
    return value


def build_model(cfg: ModelConfig, in_channels: int, out_channels: int) -> torch.nn.Module:
    """Build ``cfg.name`` with random weights; it returns raw logits (B, out_channels, *spatial).

    ``cfg.out`` does not change the network: "regions" only means the loss/inference apply sigmoid to the
    logits instead of softmax.
    """
    for what, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(value, int) or value < 1:
            raise NeuroMapError(f"{what} must be a positive integer, got {value!r}.")
    arch = _architecture(cfg)
    options = resolve_options(cfg)
    try:
        return arch.builder(cfg.spatial_dims, in_channels, out_channels, **options)
    except (TypeError, ValueError) as exc:  # MONAI's complaint about a combination of option values
        raise NeuroMapError(
            f"model '{cfg.name}' cannot be built with options {cfg.options} ({type(exc).__name__}: {exc}). "
            f"Fix: correct the option values; the defaults are {arch.defaults}."
        ) from exc


def required_divisor(cfg: ModelConfig, resolved: bool = False) -> int:
    """Factor every spatial input size must be divisible by (2D inference pads each slice up to a multiple of it;
    see `neuromap.models`). ``resolved``: ``cfg.options`` are complete and were checked when stored (a
    checkpoint's), so they need no resolving, which would import the network's module and MONAI."""
    return _architecture(cfg).divisor(cfg.options if resolved else resolve_options(cfg))
