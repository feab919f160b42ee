"""Checkpoint files: weights plus everything needed to use them (architecture, modalities, preprocessing,
label scheme, training summary, metrics). Loading never needs the training config file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from neuromap.config import ModelConfig, PreprocessConfig
from neuromap.errors import NeuroMapError
from neuromap.io.atomic import atomic_path
from neuromap.models import build_model, required_divisor, resolve_options

if TYPE_CHECKING:  # imported where a file is read or written: a spec alone needs no PyTorch
    import torch

FORMAT = "neuromap-checkpoint-v1"


@dataclass
class ModelSpec:
    """What a trained model expects and produces."""

    model: ModelConfig
    preprocess: PreprocessConfig
    task: str  # "brats" (4 classes / 3 regions) or "binary"
    patch_size: tuple[int, ...]
    out_channels: int
    info: dict = field(default_factory=dict)  # training summary and metrics, shown in reports
    # True for a spec read from a file: its options were stored resolved, so `to_dict` need not resolve them again
    # (which imports the network's module and MONAI; see `neuromap.engines.load_runner`).
    resolved: bool = field(default=False, repr=False, compare=False)

    @property
    def modalities(self) -> list[str]:
        return list(self.preprocess.modalities)

    def to_dict(self) -> dict:
        # Resolved options (defaults filled in) so a later change of a default cannot change a saved model.
        options = ({k: tuple(v) if isinstance(v, list) else v for k, v in self.model.options.items()}  # as resolved
                   if self.resolved else resolve_options(self.model))
        model = {**self.model.model_dump(), "options": options}
        return {
            "model": model, "preprocess": self.preprocess.model_dump(), "task": self.task,
            "patch_size": list(self.patch_size), "out_channels": self.out_channels, "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        return cls(
            model=ModelConfig.model_validate(data["model"]),
            preprocess=PreprocessConfig.model_validate(data["preprocess"]),
            task=data["task"], patch_size=tuple(data["patch_size"]), out_channels=int(data["out_channels"]),
            info=dict(data.get("info", {})), resolved=True,
        )

    @property
    def divisor(self) -> int:
        """The factor the network's input sizes must be divisible by (`neuromap.models.required_divisor`)."""
        return required_divisor(self.model, resolved=self.resolved)

    def build(self) -> torch.nn.Module:
        return build_model(self.model, self.preprocess.in_channels, self.out_channels)


def save_checkpoint(path: str | Path, spec: ModelSpec, state_dict: dict, half: bool = False, **extra) -> Path:
    """Write atomically; ``half`` stores float weights as float16 (shipped models: half the size)."""
    import torch

    weights = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu() for k, v in state_dict.items()}
    payload = {"format": FORMAT, "spec": spec.to_dict(), "state_dict": weights, **extra}
    with atomic_path(path, overwrite=True) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_checkpoint(path: str | Path) -> dict:
    import torch

    path = Path(path)
    if not path.is_file():
        raise NeuroMapError(f"{path}: model file not found. Fix: give a .pt checkpoint or a shipped model name.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # no code execution from files
    except Exception as exc:  # torch raises many types for a damaged file
        raise NeuroMapError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc}).") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise NeuroMapError(f"{path}: not a NeuroMap checkpoint (missing format '{FORMAT}').")
    return payload


def load_model(path: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    """Build the architecture recorded in the checkpoint and load its weights (float32, eval mode)."""
    payload = read_checkpoint(path)
    spec = ModelSpec.from_dict(payload["spec"])
    model = spec.build()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    return model.eval(), spec
