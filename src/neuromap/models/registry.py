"""One dict from architecture name to builder, so configs, checkpoints and the CLI name models by string.

A builder is ``builder(spatial_dims, in_channels, out_channels, *, option=default, ...)``. Its keyword-only
parameters *are* the allowed ``ModelConfig.options`` and their defaults, so the options a user may set and
the code that uses them cannot drift apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from neuromap.config import ModelConfig
from neuromap.errors import NeuroMapError

Builder = Callable[..., torch.nn.Module]


@dataclass(frozen=True)
class Architecture:
    """A registered network: how to build it, which dimensionalities it supports and its size constraint."""

    builder: Builder
    spatial_dims: tuple[int, ...]
    divisor: Callable[[Mapping[str, Any]], int]  # resolved options -> factor input sizes must be divisible by

    @property
    def defaults(self) -> dict[str, Any]:
        params = inspect.signature(self.builder).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


REGISTRY: dict[str, Architecture] = {}


def register(
    name: str, *, spatial_dims: tuple[int, ...], divisor: int | Callable[[Mapping[str, Any]], int]
) -> Callable[[Builder], Builder]:
    """Decorator adding a builder function or ``nn.Module`` class to the registry under ``name``.

    ``divisor`` is a constant or a function of the resolved options (e.g. the product of the strides).
    """

    def decorate(builder: Builder) -> Builder:
        if name in REGISTRY:
            raise ValueError(f"model name '{name}' is registered twice")
        size_rule = divisor if callable(divisor) else (lambda _options: divisor)
        REGISTRY[name] = Architecture(builder, spatial_dims, size_rule)
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


def required_divisor(cfg: ModelConfig) -> int:
    """Factor every spatial input size must be divisible by (2D inference pads each slice up to a multiple of it;
    see `neuromap.models`)."""
    return _architecture(cfg).divisor(resolve_options(cfg))
