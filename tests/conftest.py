"""Shared fixtures: where the real data lives, and small synthetic cases written per test."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BRATS = SHARED_DATA / "brats2018"
UNLABELLED = SHARED_DATA / "unlabelled"
LGG = SHARED_DATA / "lgg_kaggle_3m"

needs_real_data = pytest.mark.skipif(
    not BRATS.is_dir(), reason=f"real data folder {SHARED_DATA} is absent (fresh clone outside the team setup)"
)


@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory) -> Path:
    """Engine exports (neuromap.engines) go to a private folder, never the user's ~/.cache; subprocesses inherit it."""
    import os

    folder = tmp_path_factory.mktemp("engine-cache")
    previous = os.environ.get("NEUROMAP_CACHE_DIR")
    os.environ["NEUROMAP_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("NEUROMAP_CACHE_DIR", None)
    else:
        os.environ["NEUROMAP_CACHE_DIR"] = previous


@pytest.fixture
def synthetic_case(tmp_path: Path) -> Path:
    from neuromap.synthetic import write_synthetic_case

    return write_synthetic_case(tmp_path / "Synthetic_001", case_id="Synthetic_001", shape=(48, 48, 32))


def cropped_real_case(folder: Path, name: str = "Brats18_2013_23_1", slices: int = 24) -> Path:
    """A real BraTS case cut to ``slices`` axial slices through its tumour, written under ``folder``: quick to
    segment, still real anatomy and contrast."""
    import nibabel as nib
    import numpy as np

    source = BRATS / name
    seg = nib.load(next(source.glob("*_seg.nii.gz")))
    z = np.flatnonzero(np.asarray(seg.dataobj).any(axis=(0, 1)))
    mid = int(z[len(z) // 2])
    out = folder / name
    out.mkdir(parents=True)
    for path in source.glob("*.nii.gz"):
        nib.save(nib.load(path).slicer[:, :, mid - slices // 2: mid + slices // 2], str(out / path.name))
    return out


def real_cases() -> list[Path]:
    if not SHARED_DATA.is_dir():
        return []
    return sorted(p for p in BRATS.iterdir() if p.is_dir()) + sorted(p for p in UNLABELLED.iterdir() if p.is_dir())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real (untrained, randomly initialised) small 2D U-Net checkpoint: fast, exercises every stage."""
    import torch

    from neuromap.checkpoint import ModelSpec, save_checkpoint
    from neuromap.config import ModelConfig, PreprocessConfig

    torch.manual_seed(0)
    spec = ModelSpec(
        ModelConfig(name="unet2d", spatial_dims=2, options={"features": [8, 8, 16, 16, 32, 8]}),
        PreprocessConfig(mode="2d", slice_size=(64, 64)), "brats", (64, 64), 4,
    )
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", spec, spec.build().state_dict())


UNSEEN = UNLABELLED / "BraTS-GLI-00001-000"  # real, expert-unlabelled, never used to train the shipped models


@pytest.fixture(scope="session")
def unseen_segmented(tmp_path_factory):
    """The unseen real case segmented once by the shipped default model with both maps written (the model run is
    the slow part, so the tests of maps and quality share it)."""
    if not UNSEEN.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (fresh clone outside the team setup)")
    from neuromap.segmenter import segment

    (result,) = segment(UNSEEN, tmp_path_factory.mktemp("unseen"), uncertainty=True, probabilities=True)
    return result
