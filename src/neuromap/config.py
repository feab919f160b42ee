"""All configuration in one typed place.

Pydantic models validate YAML/CLI input and give precise messages; checkpoints store these models as dicts,
so loading a model never needs the training config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from neuromap.errors import NeuroMapError

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
# Aliases used by BraTS 2023 (t1n, t1c, t2w, t2f), BraTS-Toolkit (fla) and others.
MODALITY_ALIASES: dict[str, str] = {
    "t1": "t1", "t1n": "t1", "t1w": "t1", "native": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1post": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "fla": "flair", "t2flair": "flair",
}


def canonical_modality(name: str) -> str:
    """Map an alias (t1n, t1c, t2w, t2f, fla, ...) to t1/t1ce/t2/flair."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in MODALITY_ALIASES:
        raise NeuroMapError(f"unknown modality '{name}'; use one of {list(MODALITIES)} (or an alias like t1c, t2f).")
    return MODALITY_ALIASES[key]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PreprocessConfig(Strict):
    """What `neuromap.preprocess.prepare` does; stored in every checkpoint."""

    modalities: list[str] = Field(default_factory=lambda: list(MODALITIES))
    orientation: Literal["RAS"] = "RAS"
    crop_margin: int = Field(4, ge=0, description="voxels kept around the brain mask's bounding box")
    normalize: bool = True
    n4: bool = False
    spacing: tuple[float, float, float] | None = Field(None, description="target voxel size in mm, None = keep")
    mode: Literal["3d", "2d"] = "3d"
    slice_range: tuple[int, int] | None = Field(
        None, description="2D: axial slices [start, stop) of the RAS volume; None = all slices"
    )
    slice_size: tuple[int, int] = (128, 128)

    @field_validator("modalities")
    @classmethod
    def _canonical(cls, value: list[str]) -> list[str]:
        mods = [canonical_modality(m) for m in value]
        if not mods or len(set(mods)) != len(mods):
            raise ValueError(f"modalities must be a non-empty list without repeats, got {value}")
        return mods


class ModelConfig(Strict):
    """Architecture by registry name plus its options (see neuromap.models)."""

    name: str = "segresnet"
    spatial_dims: Literal[2, 3] = 3
    out: Literal["classes", "regions"] = "classes"
    options: dict = Field(default_factory=dict)


def load_yaml(path: str | Path, model: type[BaseModel]) -> BaseModel:
    """Read a YAML file into a typed config with a message that names the file and the bad field."""
    path = Path(path)
    if not path.is_file():
        raise NeuroMapError(f"{path}: config file not found.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise NeuroMapError(f"{path}: not valid YAML ({exc}).") from None
    return parse_config(data, model, source=str(path))


def parse_config(data: dict, model: type[BaseModel], source: str = "config") -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise NeuroMapError(f"{source}: invalid configuration: {problems}") from None


__all__ = [
    "MODALITIES", "MODALITY_ALIASES", "canonical_modality", "PreprocessConfig", "ModelConfig",
    "load_yaml", "parse_config",
]
