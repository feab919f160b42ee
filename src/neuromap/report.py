"""The report JSON of one segmented case: inputs, model, label convention, volumes, warnings, timings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # type hints only: pictures and io read RESEARCH_NOTICE here without loading torch
    from neuromap.checkpoint import ModelSpec
    from neuromap.config import InferenceConfig
    from neuromap.io import Volume
    from neuromap.tasks import Task

RESEARCH_NOTICE = "Research use only. Not for diagnosis or treatment decisions."


def case_report(
    volume: Volume, spec: ModelSpec, task: Task, model_files: list[Path], cfg: InferenceConfig, convention: str,
    internal: np.ndarray, warnings: list[str], device: str, engine: str, extra: dict,
) -> dict:
    """The report of one case. Volumes list the task's structures, in mL, or as None (with voxel counts) where
    the files store no voxel size."""
    case, known = volume.case, volume.spacing_known
    voxels = task.volume_voxels(internal)
    return {
        "case_id": case.case_id,
        "notice": RESEARCH_NOTICE,
        "research_use_only": True,
        "inputs": {m: str(case.images[m]) for m in spec.modalities},
        "model": {"files": [str(p) for p in model_files], "task": spec.task,
                  "architecture": spec.model.name, "modalities": spec.modalities, "tta": cfg.tta,
                  "ensemble_size": len(model_files), "validation": spec.info.get("val_dice")},
        "label_convention": convention,
        "voxel_spacing_mm": list(volume.spacing) if known else None,
        "volumes_ml": {k: round(n * volume.voxel_ml, 3) if known else None for k, n in voxels.items()},
        "volume_voxels": voxels,
        **extra,
        "warnings": warnings,
        "device": device,
        "engine": engine,  # what ran the network (neuromap.engines)
    }
