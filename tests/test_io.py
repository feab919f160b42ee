"""Case discovery for every layout, validation messages, and reading all real data."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BRATS, UNLABELLED, needs_real_data, real_cases

from neuromap.errors import NeuroMapError
from neuromap.io import cases_from_inputs, discover_cases, load_case, read_mapping_file, validate_case
from neuromap.synthetic import synthetic_arrays, write_synthetic_case


@pytest.mark.parametrize(
    ("layout", "expected_layout"), [("brats", "brats"), ("brats2023", "brats2023"), ("plain", "plain")]
)
def test_discovers_each_naming(tmp_path, layout, expected_layout):
    folder = write_synthetic_case(tmp_path / "case", case_id="P1", shape=(24, 24, 16), layout=layout)
    (case,) = discover_cases(folder)
    assert case.naming == expected_layout
    assert case.modalities == ["t1", "t1ce", "t2", "flair"]
    volume = load_case(case)
    assert volume.image.shape == (4, 24, 24, 16)
    assert set(np.unique(volume.seg)) == {0, 1, 2, 3}


def test_brats_toolkit_naming(tmp_path):
    images, _ = synthetic_arrays((16, 16, 8))
    names = {"t1": "t1", "t1ce": "t1c", "t2": "t2", "flair": "fla"}
    for mod, data in images.items():
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"pat7_{names[mod]}.nii.gz"))
    (case,) = discover_cases(tmp_path)
    assert case.naming == "brats-toolkit" and case.case_id == "pat7"
    assert set(case.modalities) == {"t1", "t1ce", "t2", "flair"}


def test_parent_folder_gives_all_cases(tmp_path):
    for i in range(3):
        write_synthetic_case(tmp_path / f"C{i}", case_id=f"C{i}", shape=(16, 16, 8), seed=i)
    assert [c.case_id for c in discover_cases(tmp_path)] == ["C0", "C1", "C2"]


def test_msd_task01_4d_layout(tmp_path):
    images, labels = synthetic_arrays((20, 20, 12))
    order = ["flair", "t1", "t1ce", "t2"]  # MSD: 0 FLAIR, 1 T1w, 2 t1gd, 3 T2w
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    image4d = np.stack([images[m] for m in order], -1)
    nib.save(nib.Nifti1Image(image4d, np.eye(4)), str(tmp_path / "imagesTr/BRATS_001.nii.gz"))
    msd_labels = np.choose(labels, [0, 2, 1, 3]).astype(np.uint8)  # internal -> MSD (1 ED, 2 NET, 3 ET)
    nib.save(nib.Nifti1Image(msd_labels, np.eye(4)), str(tmp_path / "labelsTr/BRATS_001.nii.gz"))
    meta = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    (case,) = discover_cases(tmp_path)
    volume = load_case(case)
    assert case.naming == "msd"
    assert np.array_equal(volume.image[volume.modalities.index("t1ce")], images["t1ce"])
    assert np.array_equal(volume.seg, labels)


def test_user_mapping_yaml(tmp_path):
    folder = write_synthetic_case(tmp_path / "x", case_id="odd", shape=(16, 16, 8), layout="plain")
    renamed = {}
    for i, mod in enumerate(["t1", "t1c", "t2", "flair"]):
        target = folder / f"series_{i}.nii.gz"
        (folder / f"{mod}.nii.gz").rename(target)
        renamed[mod] = target.name
    (folder / "map.yaml").write_text("\n".join(f"{k}: {v}" for k, v in renamed.items()))
    with cases_from_inputs(None, read_mapping_file(folder / "map.yaml")) as (case,):
        assert load_case(case).image.shape == (4, 16, 16, 8)


def _write(path: Path, data: np.ndarray, affine=None) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _problem(folder: Path, modalities=None) -> str:
    (case,) = discover_cases(folder)
    with pytest.raises(NeuroMapError) as info:
        validate_case(case, modalities)
    return str(info.value)


def test_validation_messages_name_file_and_problem(synthetic_case):
    flair = synthetic_case / "Synthetic_001_flair.nii.gz"
    t2 = synthetic_case / "Synthetic_001_t2.nii.gz"
    data = np.asarray(nib.load(flair).dataobj)
    affine = nib.load(flair).affine

    _write(flair, data[:-1], affine)
    assert "Synthetic_001_flair.nii.gz: voxel grid differs from Synthetic_001_t1.nii.gz: shape (47, 48, 32) vs " \
        "(48, 48, 32)" in _problem(synthetic_case)
    _write(flair, data, affine @ np.diag([1, 1, 2.0, 1]))
    assert "voxel size 1 x 1 x 2 mm vs 1 x 1 x 1 mm" in _problem(synthetic_case)
    _write(flair, data[..., None].repeat(2, -1), affine)
    assert "image is 4D" in _problem(synthetic_case)
    bad = data.astype(np.float32)
    bad[3, 3, 3] = np.nan
    _write(flair, bad, affine)
    assert "NaN" in _problem(synthetic_case)
    _write(flair, np.zeros_like(data), affine)
    assert "all zero" in _problem(synthetic_case)
    flair.write_text("not an image")
    msg = _problem(synthetic_case)
    assert "Synthetic_001_flair.nii.gz: cannot be read as NIfTI" in msg
    t2.unlink()
    flair.unlink()
    assert "missing modality ['t2', 'flair']" in _problem(synthetic_case, ["t1", "t1ce", "t2", "flair"])


def test_segmentation_checks(synthetic_case):
    seg_path = synthetic_case / "Synthetic_001_seg.nii.gz"
    seg = np.asarray(nib.load(seg_path).dataobj).astype(np.float32)
    _write(seg_path, seg, nib.load(seg_path).affine)
    (case,) = discover_cases(synthetic_case)
    assert load_case(case).seg.max() == 3  # float but integral: accepted
    seg[0, 0, 0] = 0.5
    _write(seg_path, seg, nib.load(seg_path).affine)
    assert "non-integral" in _problem(synthetic_case)
    seg[0, 0, 0] = 9
    _write(seg_path, seg, nib.load(seg_path).affine)
    assert "labels [9]" in _problem(synthetic_case)


def test_two_files_for_one_modality(synthetic_case):
    shutil.copy(synthetic_case / "Synthetic_001_t1ce.nii.gz", synthetic_case / "Synthetic_001_t1c.nii.gz")
    with pytest.raises(NeuroMapError, match="two files map to modality 't1ce'"):
        discover_cases(synthetic_case)


def test_empty_folder_message(tmp_path):
    with pytest.raises(NeuroMapError, match="no cases found"):
        discover_cases(tmp_path)


@needs_real_data
@pytest.mark.parametrize("folder", real_cases(), ids=lambda p: p.name)
def test_every_real_case_loads(folder):
    (case,) = discover_cases(folder)
    volume = load_case(case)
    assert volume.image.shape == (4, 240, 240, 155)
    assert volume.image.dtype == np.float32
    if folder.parent == BRATS:
        assert case.seg is not None and set(np.unique(volume.seg)) <= {0, 1, 2, 3}
        assert (volume.seg == 3).any()  # label 4 (ET) was mapped to the internal 3
    else:
        assert folder.parent == UNLABELLED and volume.seg is None
