"""Metrics against answers derived by hand on tiny volumes, and against independent numpy/scipy code on a real
BraTS case. Every expected value below is counted or reasoned out in the comment next to it, not produced by
the code under test.
"""

from __future__ import annotations

import math
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import BRATS, needs_real_data
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from neuromap.labels import to_internal
from neuromap.metrics import (
    binary_case_metrics,
    case_metrics,
    dice_per_region,
    hd95_mm,
    structure_metrics,
)

REAL_CASE = BRATS / "Brats18_2013_2_1"
METRIC_KEYS = ["dice", "iou", "sensitivity", "precision", "specificity", "accuracy", "hd95",
               "vol_pred_ml", "vol_gt_ml", "vol_diff_ml"]


def box(shape: tuple[int, ...], *slices: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[slices] = True
    return mask


def check(result: dict, expected: dict) -> None:
    """Exact up to float32 rounding (MONAI returns HD95 as float32)."""
    assert list(result) == METRIC_KEYS
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=2e-6, abs=1e-9), key


def test_overlapping_cubes_every_metric():
    # 4x4x4 cube, prediction shifted one voxel along x; voxels are 3 x 1 x 1 mm in a 10^3 image.
    gt = box((10, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))
    pred = box((10, 10, 10), slice(3, 7), slice(2, 6), slice(2, 6))
    tp, fp, fn = 3 * 4 * 4, 4 * 4, 4 * 4  # x overlap 3..5; one 4x4 face on each side is wrong
    tn = 1000 - tp - fp - fn  # 920
    # HD95: every surface voxel is at most one shift (3 mm) from the other surface (translation), and the
    # leading 4x4 face (16 of the 56 surface voxels, > 5 %) is exactly 3 mm away, so the 95th percentile is 3.
    check(structure_metrics(pred, gt, (3.0, 1.0, 1.0)), {
        "dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn), "sensitivity": tp / (tp + fn),
        "precision": tp / (tp + fp), "specificity": tn / (tn + fp), "accuracy": (tp + tn) / 1000, "hd95": 3.0,
        "vol_pred_ml": 64 * 3 / 1000, "vol_gt_ml": 64 * 3 / 1000, "vol_diff_ml": 0.0,
    })
    assert structure_metrics(pred, gt, (3.0, 1.0, 1.0))["dice"] == 0.75


def test_nested_cubes_percentile_and_volumes():
    # Prediction: 4^3 cube inside a 6^3 ground-truth cube (1 mm voxels): one voxel too small on every side.
    pred = box((10, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))
    gt = box((10, 10, 10), slice(1, 7), slice(1, 7), slice(1, 7))
    # pred surface -> gt surface: all 56 voxels at 1 mm. gt surface (152 voxels) -> pred surface: 96 face
    # voxels at 1, 48 edge voxels at sqrt(2), 8 corners at sqrt(3). Linear-interpolated 95th percentile of
    # that sorted list: position 0.95 * 151 = 143.45, between index 143 (sqrt 2) and 144 (sqrt 3).
    expected_hd95 = math.sqrt(2) + 0.45 * (math.sqrt(3) - math.sqrt(2))
    check(structure_metrics(pred, gt, (1.0, 1.0, 1.0)), {
        "dice": 2 * 64 / (64 + 216), "iou": 64 / 216, "sensitivity": 64 / 216, "precision": 1.0,
        "specificity": 1.0, "accuracy": (1000 - 152) / 1000, "hd95": expected_hd95,
        "vol_pred_ml": 0.064, "vol_gt_ml": 0.216, "vol_diff_ml": -0.152,
    })


def test_both_empty_is_perfect():
    empty = np.zeros((5, 6, 7), dtype=bool)
    check(structure_metrics(empty, empty, (1.0, 2.0, 3.0)), {
        "dice": 1.0, "iou": 1.0, "sensitivity": 1.0, "precision": 1.0, "specificity": 1.0, "accuracy": 1.0,
        "hd95": 0.0, "vol_pred_ml": 0.0, "vol_gt_ml": 0.0, "vol_diff_ml": 0.0,
    })


def test_empty_ground_truth_with_false_positives():
    gt = np.zeros((10, 10, 10), dtype=bool)
    pred = box(gt.shape, slice(0, 2), slice(0, 2), slice(0, 2))  # 8 voxels, all false positives
    diagonal = math.sqrt((10 * 3.0) ** 2 + 10**2 + 10**2)  # image extent 30 x 10 x 10 mm
    check(structure_metrics(pred, gt, (3.0, 1.0, 1.0)), {
        "dice": 0.0, "iou": 0.0, "sensitivity": 0.0,  # 0/0, but something false was predicted -> 0
        "precision": 0.0, "specificity": 992 / 1000, "accuracy": 0.992, "hd95": diagonal,
        "vol_pred_ml": 8 * 3 / 1000, "vol_gt_ml": 0.0, "vol_diff_ml": 8 * 3 / 1000,
    })


def test_missed_structure():
    gt = box((10, 10, 10), slice(4, 6), slice(4, 6), slice(4, 6))  # 8 voxels, all missed
    pred = np.zeros_like(gt)
    check(structure_metrics(pred, gt, (1.0, 1.0, 1.0)), {
        "dice": 0.0, "iou": 0.0, "sensitivity": 0.0,
        "precision": 0.0,  # 0/0 with 8 false negatives -> 0
        "specificity": 1.0, "accuracy": 0.992, "hd95": math.sqrt(300),
        "vol_pred_ml": 0.0, "vol_gt_ml": 0.008, "vol_diff_ml": -0.008,
    })


def test_specificity_without_negatives():
    full = np.ones((4, 4, 4), dtype=bool)
    assert structure_metrics(full, full, (1.0, 1.0, 1.0))["specificity"] == 1.0  # 0/0, no error
    partial = full.copy()
    partial[0] = False
    assert structure_metrics(partial, full, (1.0, 1.0, 1.0))["specificity"] == 0.0  # 0/0, 16 missed voxels


@pytest.mark.parametrize(("axis", "spacing", "expected"), [
    (0, (3.0, 1.0, 1.0), 3.0),
    (2, (1.0, 1.0, 3.0), 3.0),
    (0, (1.0, 1.0, 3.0), 1.0),
    (1, (0.5, 2.5, 0.7), 2.5),
])
def test_hd95_uses_spacing_of_the_shift_axis(axis, spacing, expected):
    # Two one-voxel-thick 6x6 plates, one voxel apart along `axis`: every voxel is surface, and its nearest
    # voxel on the other plate is straight across, one voxel = spacing[axis] mm away.
    gt, pred = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    plate = [slice(1, 7)] * 3
    plate[axis] = slice(3, 4)
    gt[tuple(plate)] = True
    plate[axis] = slice(4, 5)
    pred[tuple(plate)] = True
    assert hd95_mm(pred, gt, spacing) == pytest.approx(expected, abs=1e-6)
    assert structure_metrics(pred, gt, spacing)["dice"] == 0.0


def test_two_dimensional_masks():
    gt = box((10, 10), slice(2, 6), slice(2, 6))
    pred = box((10, 10), slice(2, 6), slice(3, 7))  # shifted one pixel along axis 1, which is 2 mm
    # TP 12, FP 4, FN 4. HD95: leading edge (4 of 12 surface pixels) is 2 mm away, nothing further.
    check(structure_metrics(pred, gt, (1.0, 2.0)), {
        "dice": 24 / 32, "iou": 12 / 20, "sensitivity": 0.75, "precision": 0.75, "specificity": 80 / 84,
        "accuracy": 92 / 100, "hd95": 2.0, "vol_pred_ml": 16 * 2 / 1000, "vol_gt_ml": 0.032, "vol_diff_ml": 0.0,
    })


def test_hd95_can_be_skipped():
    gt = box((6, 6, 6), slice(1, 4), slice(1, 4), slice(1, 4))
    result = structure_metrics(gt, gt, (1.0, 1.0, 1.0), hd95=False)
    assert "hd95" not in result and result["dice"] == 1.0


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        structure_metrics(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 4), bool), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        structure_metrics(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool), (1.0, 1.0))


def blobs(seed: int, shape: tuple[int, int, int] = (40, 36, 30)) -> np.ndarray:
    """Irregular random shapes (smoothed noise), some touching the image border."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 3)
    return noise > np.quantile(noise, 0.8)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal deprecation
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounding_box_crop_does_not_change_monai(seed):
    pred, gt = blobs(seed), blobs(seed + 10)
    assert pred[0].any() or pred[-1].any() or pred[:, 0].any()  # the border case is exercised
    spacing = (1.2, 0.8, 2.0)
    full = compute_hausdorff_distance(pred[None, None], gt[None, None], include_background=True,
                                      percentile=95, spacing=spacing).item()
    assert hd95_mm(pred, gt, spacing) == pytest.approx(full, rel=1e-6)


def three_class_labels() -> np.ndarray:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[2:10, 2:10, 2:10] = 2  # ED
    labels[4:8, 4:8, 4:8] = 1  # NCR
    labels[5:7, 5:7, 5:7] = 3  # ET
    return labels


def test_case_metrics_rows_and_structures():
    gt = three_class_labels()
    pred = gt.copy()
    pred[pred == 2] = 1  # edema predicted as necrosis: WT still perfect, TC too large, ED missed
    rows = case_metrics(pred, gt, (1.0, 1.0, 1.0))
    assert [(r["structure"], r["kind"]) for r in rows] == [
        ("WT", "region"), ("TC", "region"), ("ET", "region"), ("NCR", "class"), ("ED", "class"), ("ET", "class")
    ]
    by = {(r["structure"], r["kind"]): r for r in rows}
    assert by["WT", "region"]["dice"] == 1.0 and by["WT", "region"]["hd95"] == 0.0
    assert by["ET", "region"] == {**by["ET", "class"], "kind": "region"}
    # TC: prediction is the whole 8^3 cube, ground truth the 4^3 core -> 2 * 64 / (512 + 64).
    assert by["TC", "region"]["dice"] == pytest.approx(128 / 576)
    assert by["ED", "class"]["dice"] == 0.0 and by["ED", "class"]["hd95"] == pytest.approx(math.sqrt(3 * 144))
    assert dice_per_region(pred, gt) == {k: by[k, "region"]["dice"] for k in ("WT", "TC", "ET")}


def test_binary_case_metrics_single_structure():
    gt = box((8, 8, 8), slice(2, 6), slice(2, 6), slice(2, 6)).astype(np.uint8) * 255  # mask 0/255
    rows = binary_case_metrics(gt, gt > 0, (1.0, 1.0, 1.0))
    assert len(rows) == 1 and rows[0]["structure"] == "abnormality"
    assert rows[0]["dice"] == 1.0 and rows[0]["vol_gt_ml"] == pytest.approx(0.064)


def test_dice_per_region_matches_plain_numpy():
    rng = np.random.default_rng(3)
    pred, gt = rng.integers(0, 4, (20, 20, 20)), rng.integers(0, 4, (20, 20, 20))
    for name, members in {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}.items():
        p, g = np.isin(pred, members), np.isin(gt, members)
        assert dice_per_region(pred, gt)[name] == pytest.approx(2 * (p & g).sum() / (p.sum() + g.sum()))


def independent_hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Dense Euclidean distance transforms of the surfaces (scipy), no cropping, no KD-tree."""
    surface_pred = pred & ~ndimage.binary_erosion(pred)
    surface_gt = gt & ~ndimage.binary_erosion(gt)
    to_gt = ndimage.distance_transform_edt(~surface_gt, sampling=spacing)[surface_pred]
    to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=spacing)[surface_gt]
    return max(np.percentile(to_gt, 95), np.percentile(to_pred, 95))


@pytest.mark.real
@needs_real_data
def test_real_case_against_independent_computation():
    raw = np.asanyarray(nib.load(REAL_CASE / f"{REAL_CASE.name}_seg.nii.gz").dataobj)
    gt = np.isin(to_internal(raw, "brats"), [1, 2, 3])  # whole tumour, full 240x240x155
    # A plausible wrong prediction: shifted (2, -1, 1) voxels and grown by one voxel.
    pred = ndimage.binary_dilation(np.roll(gt, (2, -1, 1), axis=(0, 1, 2)))
    spacing = (0.9, 1.0, 2.5)  # anisotropic on purpose, so the spacing order is tested on real shapes
    start = time.perf_counter()
    result = structure_metrics(pred, gt, spacing)
    elapsed = time.perf_counter() - start
    assert result["hd95"] == pytest.approx(independent_hd95(pred, gt, spacing), rel=1e-4)
    assert result["dice"] == pytest.approx(2 * np.sum(pred & gt) / (np.sum(pred) + np.sum(gt)))
    assert result["vol_gt_ml"] == pytest.approx(gt.sum() * 0.9 * 2.5 / 1000)
    assert elapsed < 10.0, f"all metrics of one full-size region took {elapsed:.1f} s"
