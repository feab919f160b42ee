"""evaluate(): pairing by case id, label conventions, grid checks, output files; known degradations on real GT.

Synthetic label maps are tiny NIfTIs written to tmp_path; the real-data tests use two BraTS 2018 cases.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BRATS, needs_real_data

from neuromap.errors import NeuroMapError
from neuromap.evaluation import evaluate, prediction_files
from neuromap.evaluation_tables import format_table
from neuromap.io.nifti import case_id_of

REAL_CASES = ["Brats18_2013_2_1", "Brats18_CBICA_AQQ_1"]
SHAPE = (16, 16, 12)


def write(path: Path, labels: np.ndarray, zooms: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(labels, np.uint8), np.diag([*zooms, 1.0])), str(path))
    return path


def tumour(offset: int = 0) -> np.ndarray:
    """BraTS 2017-21 labels (1 NCR, 2 ED, 4 ET) as nested boxes, shifted ``offset`` voxels along x."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[3 + offset:13 + offset, 3:13, 2:10] = 2
    labels[5 + offset:11 + offset, 5:11, 4:8] = 1
    labels[7 + offset:9 + offset, 7:9, 5:7] = 4
    return labels


def rows_of(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def structure(summary: dict, name: str, kind: str = "region") -> dict:
    return next(e["metrics"] for e in summary["structures"] if e["structure"] == name and e["kind"] == kind)


@pytest.mark.parametrize(("name", "case_id"), [
    ("Brats18_X_1_seg.nii.gz", "Brats18_X_1"), ("BraTS-GLI-00001-000-seg.nii.gz", "BraTS-GLI-00001-000"),
    ("case7_pred.nii", "case7"), ("case7.nii.gz", "case7"),
])
def test_case_id_strips_label_suffixes(name, case_id):
    assert case_id_of(Path(name)) == case_id


def test_perfect_prediction_outputs(tmp_path):
    for case in ("a", "b"):
        write(tmp_path / "gt" / f"{case}_seg.nii.gz", tumour())
        write(tmp_path / "pred" / f"{case}_seg.nii.gz", tumour())
    summary = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert len(rows) == 2 * 6 and list(rows[0])[:3] == ["case_id", "structure", "kind"]
    assert {float(r["dice"]) for r in rows} == {1.0} and {float(r["hd95"]) for r in rows} == {0.0}
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written == summary and written["research_use_only"] is True and "0/0" in written["conventions"]
    assert structure(summary, "WT")["dice"] == {"mean": 1.0, "std": 0.0, "median": 1.0, "n": 2}
    assert (tmp_path / "out" / "boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(summary)
    assert "WT (region)" in table and "1.000±0.000" in table and "HD95" in table


def test_summary_statistics_over_cases(tmp_path):
    # Case a perfect; case b shifted 2 voxels along x: WT boxes of 10x10x8 overlap on 8x10x8.
    write(tmp_path / "gt" / "a.nii.gz", tumour())
    write(tmp_path / "gt" / "b.nii.gz", tumour())
    write(tmp_path / "pred" / "a_seg.nii.gz", tumour())
    write(tmp_path / "pred" / "b_seg.nii.gz", tumour(offset=2))
    summary = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    dice_b = 2 * 640 / (800 + 800)
    stats = structure(summary, "WT")["dice"]
    assert stats["mean"] == pytest.approx((1 + dice_b) / 2)
    assert stats["median"] == pytest.approx((1 + dice_b) / 2)
    assert stats["std"] == pytest.approx(abs(1 - dice_b) / math.sqrt(2))  # sample std of two values
    assert structure(summary, "WT")["vol_diff_ml"]["mean"] == 0.0


def test_label_conventions_are_paired(tmp_path):
    # Ground truth in the BraTS 2012-2016 convention: part of the core marked 3 (non-enhancing), which means
    # NCR/NET; the prediction uses 1, 2, 4 and labels that whole core 1. Same regions -> perfect.
    gt = tumour()
    gt[5:8, 5:11, 4:8][gt[5:8, 5:11, 4:8] == 1] = 3
    write(tmp_path / "gt" / "a_seg.nii.gz", gt)
    write(tmp_path / "pred" / "a_seg.nii.gz", tumour())
    summary = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert summary["label_conventions"] == {"prediction": {"brats": 1}, "ground_truth": {"brats2012": 1}}
    assert all(float(r["dice"]) == 1.0 for r in rows_of(tmp_path / "out"))
    # The same prediction written with internal labels (3 = ET) and named explicitly.
    internal = tumour()
    internal[internal == 4] = 3
    write(tmp_path / "pred_internal" / "a.nii.gz", internal)
    evaluate(tmp_path / "pred_internal", tmp_path / "gt", tmp_path / "out2", pred_labels="internal")
    assert all(float(r["dice"]) == 1.0 for r in rows_of(tmp_path / "out2"))


def test_empty_prediction_is_scored_not_refused(tmp_path):
    write(tmp_path / "gt" / "a_seg.nii.gz", tumour())
    write(tmp_path / "pred" / "a_seg.nii.gz", np.zeros(SHAPE))
    summary = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", hd95=True)
    assert structure(summary, "WT")["dice"]["mean"] == 0.0
    assert structure(summary, "WT")["hd95"]["mean"] == pytest.approx(math.sqrt(16**2 + 16**2 + 12**2))


def test_prediction_layouts(tmp_path):
    write(tmp_path / "pred" / "a-seg.nii.gz", tumour())
    write(tmp_path / "pred" / "b_pred.nii.gz", tumour())
    write(tmp_path / "pred" / "c" / "c_seg.nii.gz", tumour())
    (tmp_path / "pred" / "c" / "c_report.json").write_text("{}")
    assert sorted(prediction_files(tmp_path / "pred")) == ["a", "b", "c"]
    write(tmp_path / "pred" / "a.nii.gz", tumour())
    with pytest.raises(NeuroMapError, match="two files for case 'a'"):
        prediction_files(tmp_path / "pred")


def test_unmatched_cases_are_listed(tmp_path):
    for case in ("a", "b"):
        write(tmp_path / "gt" / f"{case}_seg.nii.gz", tumour())
    for case in ("b", "zz"):
        write(tmp_path / "pred" / f"{case}_seg.nii.gz", tumour())
    with pytest.raises(NeuroMapError, match=r"without ground truth: zz.*without prediction: a"):
        evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="1 matched case"):
        summary = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", allow_missing=True)
    assert summary["cases"] == ["b"] and summary["unmatched"]["ground_truth_without_prediction"] == ["a"]


def test_grid_mismatches_name_both_files(tmp_path):
    for case in ("a", "b"):
        write(tmp_path / "gt" / f"{case}_seg.nii.gz", tumour())
    write(tmp_path / "pred" / "a_seg.nii.gz", tumour())
    write(tmp_path / "pred" / "b_seg.nii.gz", tumour()[:, :, :10])
    with pytest.raises(NeuroMapError, match=r"shape mismatch for case 'b'.*pred/b_seg.nii.gz.*gt/b_seg.nii.gz"):
        evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before case 'a' was scored or anything written
    write(tmp_path / "pred" / "b_seg.nii.gz", tumour(), zooms=(1.0, 1.0, 1.5))
    with pytest.raises(NeuroMapError, match=r"voxel size mismatch.*\(1.0, 1.0, 1.5\)"):
        evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")


def test_different_affine_is_warned_about(tmp_path):
    write(tmp_path / "gt" / "a_seg.nii.gz", tumour())
    img = nib.Nifti1Image(tumour(), np.diag([-1.0, -1.0, 1.0, 1.0]))  # same voxel size, flipped axes (LPS)
    (tmp_path / "pred").mkdir()
    nib.save(img, str(tmp_path / "pred" / "a_seg.nii.gz"))
    with pytest.warns(UserWarning, match="affine"):
        evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")


def test_refuses_to_overwrite(tmp_path):
    write(tmp_path / "gt" / "a_seg.nii.gz", tumour())
    write(tmp_path / "pred" / "a_seg.nii.gz", tumour())
    evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", hd95=False)
    with pytest.raises(NeuroMapError, match="metrics.csv.*overwrite"):
        evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    summary = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", overwrite=True)
    assert "hd95" in rows_of(tmp_path / "out")[0] and "hd95" in structure(summary, "WT")


def test_unknown_convention_is_refused(tmp_path):
    with pytest.raises(NeuroMapError, match="unknown label convention 'brats2019'"):
        evaluate(tmp_path, tmp_path, tmp_path / "out", gt_labels="brats2019")


def test_binary_task_has_one_structure(tmp_path):
    mask = (tumour() > 0).astype(np.uint8) * 255  # LGG-style 0/255 masks
    write(tmp_path / "gt" / "a_seg.nii.gz", mask)
    write(tmp_path / "pred" / "a_seg.nii.gz", tumour())  # any nonzero label counts as abnormality
    summary = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", task="binary")
    assert [e["structure"] for e in summary["structures"]] == ["abnormality"]
    assert structure(summary, "abnormality")["dice"]["mean"] == 1.0
    assert "abnormality (region)" in format_table(summary)


def real_dataset(tmp_path: Path) -> Path:
    """A dataset folder holding only REAL_CASES: links to the shared case folders, nothing copied."""
    root = tmp_path / "gt"
    root.mkdir()
    for case in REAL_CASES:
        (root / case).symlink_to(BRATS / case, target_is_directory=True)
    return root


@pytest.mark.real
@needs_real_data
def test_real_ground_truth_against_itself(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in REAL_CASES:
        (pred / f"{case}_seg.nii.gz").symlink_to(BRATS / case / f"{case}_seg.nii.gz")
    summary = evaluate(pred, real_dataset(tmp_path), tmp_path / "out")
    assert summary["n_cases"] == 2 and summary["label_conventions"]["ground_truth"] == {"brats": 2}
    for entry in summary["structures"]:
        assert entry["metrics"]["dice"]["mean"] == 1.0 and entry["metrics"]["hd95"]["mean"] == 0.0


@pytest.mark.real
@needs_real_data
def test_real_ground_truth_shifted_two_voxels(tmp_path):
    (tmp_path / "pred").mkdir()
    expected_wt_dice = {}
    for case in REAL_CASES:
        img = nib.load(BRATS / case / f"{case}_seg.nii.gz")
        labels = np.asanyarray(img.dataobj)
        shifted = np.zeros_like(labels)
        shifted[2:] = labels[:-2]  # 2 voxels (2 mm) along the first axis, same affine
        nib.save(nib.Nifti1Image(shifted, img.affine, img.header), str(tmp_path / "pred" / f"{case}_seg.nii.gz"))
        wt, wt_shifted = labels > 0, shifted > 0
        expected_wt_dice[case] = 2 * np.sum(wt & wt_shifted) / (np.sum(wt) + np.sum(wt_shifted))
    summary = evaluate(tmp_path / "pred", real_dataset(tmp_path), tmp_path / "out")
    assert summary["n_cases"] == 2
    for row in rows_of(tmp_path / "out"):
        # A pure translation moves every surface voxel by exactly 2 mm, so no surface distance exceeds 2 mm;
        # the faces perpendicular to the shift are exactly 2 mm away, which puts HD95 at or just below it
        # (sqrt(3) mm is the next distance on a 1 mm grid).
        assert math.sqrt(3) - 1e-5 <= float(row["hd95"]) <= 2.0 + 1e-5, row
        assert float(row["dice"]) < 1.0, row
        if row["structure"] == "WT":
            assert float(row["hd95"]) == pytest.approx(2.0)
            assert float(row["dice"]) == pytest.approx(expected_wt_dice[row["case_id"]])
            assert 0.8 < float(row["dice"]) < 0.95  # a 2 mm slip of a several-cm tumour


def test_ground_truth_case_folders_holding_only_label_maps(tmp_path):
    """Defect 1: labels kept apart from the images, one case folder each, as the prediction side accepts."""
    for case in ("a", "b"):
        write(tmp_path / "gt" / case / f"{case}_seg.nii.gz", tumour())
        write(tmp_path / "pred" / f"{case}_seg.nii.gz", tumour(offset=1 if case == "b" else 0))
    summary = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", hd95=False)
    assert summary["cases"] == ["a", "b"]
    dice = {row["case_id"]: float(row["dice"]) for row in rows_of(tmp_path / "out") if row["structure"] == "WT"}
    assert dice["a"] == 1.0 and 0.8 < dice["b"] < 1.0
    write(tmp_path / "gt" / "a" / "a_pred.nii.gz", tumour())
    with pytest.raises(NeuroMapError, match="several label maps.*keep one"):
        evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "out2")
