"""Lesion-wise evaluation (`neuromap evaluate --lesion-wise`) under both BraTS rule sets.

The hand-built cases are small label maps (BraTS 2023 labels, 1 mm voxels) saved as real NIfTI files and run
through the real CLI / API. Their expected numbers were worked out by hand from the rules in
`neuromap.lesionwise` (the reasoning is next to each case); they were also checked against the official code
(brats-evaluation 0.0.10 / panoptica 2.1.7, and BraTS-2023-Metrics' brats_metrics.py with DeepMind's
surface-distance), run outside this repository.
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
from scipy import ndimage

import neuromap
from neuromap.cli import main
from neuromap.errors import NeuroMapError
from neuromap.lesionwise import lesions
from neuromap.metrics import hd95_mm

SHAPE = (48, 48, 24)
NCR, ED, ET = 1, 2, 3  # BraTS 2023 labels
REGIONS = ("WT", "TC", "ET")
INF, NAN = math.inf, math.nan


# Each case: boxes (side, label, x range, y range, z range) painted on empty 48x48x24 volumes; side "gt", "pred"
# or "both". The expected numbers below are worked out here.
CASES = {
    # A: two 4^3 ET cubes 2 voxels apart (x 4-7 and 10-13) and a third far away (missed). Prediction = the
    # two near cubes exactly. brats-eval: 3 expert lesions, 2 matched perfectly -> Dice 1, HD95 0, 1 missed.
    # brats2023: 3 dilations merge the near cubes into one lesion (Dice 1, HD95 0); the far one (64 voxels
    # > 50) is missed: Dice (1 + 0) / 2 = 0.5, HD95 (0 + 374) / 2 = 187.
    "A_merge_missed": [("both", ET, (4, 8), (4, 8), (4, 8)), ("both", ET, (10, 14), (4, 8), (4, 8)),
                       ("gt", ET, (30, 34), (30, 34), (10, 14))],
    # B: WT lesion B1 = 5^3 ED cube, predicted shifted 1 voxel along x: Dice 2*100/250 = 0.8, and HD95 1 (a
    # third of the surface is 1 mm off, the rest 0). Two tiny ET cubes (27 voxels <= 50): B2 missed, B3
    # predicted exactly; plus an extra 8-voxel ET blob E far from everything.
    # brats-eval WT: matched B1 (0.8, 1) and B3 (1, 0) -> Dice 0.9, HD95 0.5; B2 missed, E extra.
    # brats-eval TC/ET: only B2, B3 and E exist there -> B3 matched: Dice 1, HD95 0; 1 missed, 1 extra.
    # brats2023 WT: B2 and B3 ignored, B1 kept, E extra -> Dice 0.8 / 2 = 0.4, HD95 (1 + 374) / 2 = 187.5.
    # brats2023 TC/ET: nothing kept, E extra -> Dice 0 / 1 = 0, HD95 374 / 1 = 374.
    "B_small_extra": [("gt", ED, (5, 10), (5, 10), (5, 10)), ("pred", ED, (6, 11), (5, 10), (5, 10)),
                      ("gt", ET, (30, 33), (30, 33), (5, 8)), ("both", ET, (30, 33), (5, 8), (15, 18)),
                      ("pred", ET, (40, 42), (40, 42), (18, 20))],
    # C: two 4^3 NCR cubes 8 voxels apart (x 4-7 and 16-19: their dilations stay 2 voxels apart, no merge);
    # the prediction is one 16x4x4 bar over both. Each cube against the bar: Dice 2*64/(64+256) = 0.4, HD95
    # 12 (the bar's far end is 12 mm from the cube; it holds > 5 % of the pooled distances and of the area).
    # brats-eval WT/TC: one-to-one, so one cube matched (0.4, 12), the other missed.
    # brats2023 WT/TC: the bar belongs to both lesions: Dice (0.4 + 0.4) / 2, HD95 (12 + 12) / 2.
    # ET is empty on both sides: brats-eval undefined (NaN), brats2023 Dice 1, HD95 0.
    "C_one_to_many": [("gt", NCR, (4, 8), (4, 8), (4, 8)), ("gt", NCR, (16, 20), (4, 8), (4, 8)),
                      ("pred", NCR, (4, 20), (4, 8), (4, 8))],
    # D: empty ground truth, one predicted 3^3 ET cube. E: one 4^3 ET cube, empty prediction. F: both empty.
    "D_empty_gt": [("pred", ET, (10, 13), (10, 13), (10, 13))],
    "E_empty_pred": [("gt", ET, (10, 14), (10, 14), (10, 14))],
    "F_both_empty": [],
}


def hand_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """case id -> (ground truth, prediction) label maps painted from CASES."""
    cases = {}
    for case, boxes in CASES.items():
        gt, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
        for side, label, x, y, z in boxes:
            for name, labels in (("gt", gt), ("pred", pred)):
                if side in (name, "both"):
                    labels[x[0]:x[1], y[0]:y[1], z[0]:z[1]] = label
        cases[case] = gt, pred
    return cases


# (case, region) -> (lesion Dice, lesion HD95, matched, missed, extra[, ignored_small]), worked out above.
EXPECTED = {
    "brats-eval": {
        **{("A_merge_missed", r): (1.0, 0.0, 2, 1, 0) for r in REGIONS},
        ("B_small_extra", "WT"): (0.9, 0.5, 2, 1, 1),
        **{("B_small_extra", r): (1.0, 0.0, 1, 1, 1) for r in ("TC", "ET")},
        **{("C_one_to_many", r): (0.4, 12.0, 1, 1, 0) for r in ("WT", "TC")},
        ("C_one_to_many", "ET"): (NAN, NAN, 0, 0, 0),
        **{("D_empty_gt", r): (0.0, INF, 0, 0, 1) for r in REGIONS},
        **{("E_empty_pred", r): (0.0, INF, 0, 1, 0) for r in REGIONS},
        **{("F_both_empty", r): (NAN, NAN, 0, 0, 0) for r in REGIONS},
    },
    "brats2023": {
        **{("A_merge_missed", r): (0.5, 187.0, 1, 1, 0, 0) for r in REGIONS},
        ("B_small_extra", "WT"): (0.4, 187.5, 1, 0, 1, 2),
        **{("B_small_extra", r): (0.0, 374.0, 0, 0, 1, 2) for r in ("TC", "ET")},
        **{("C_one_to_many", r): (0.4, 12.0, 2, 0, 0, 0) for r in ("WT", "TC")},
        ("C_one_to_many", "ET"): (1.0, 0.0, 0, 0, 0, 0),
        **{("D_empty_gt", r): (0.0, 374.0, 0, 0, 1, 0) for r in REGIONS},
        **{("E_empty_pred", r): (0.0, 374.0, 0, 1, 0, 0) for r in REGIONS},
        **{("F_both_empty", r): (1.0, 0.0, 0, 0, 0, 0) for r in REGIONS},
    },
}


def write_cases(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[Path, Path]:
    for side, index in (("gt", 0), ("pred", 1)):
        (root / side).mkdir(parents=True, exist_ok=True)
        for case, pair in cases.items():
            nib.save(nib.Nifti1Image(pair[index], np.eye(4)), str(root / side / f"{case}_seg.nii.gz"))
    return root / "pred", root / "gt"


def lesion_csv(out: Path) -> dict[tuple[str, str], dict]:
    with open(out / "lesion_metrics.csv", newline="") as handle:
        return {(r["case_id"], r["region"]): r for r in csv.DictReader(handle)}


def same(actual: str | float, expected: float) -> bool:
    value = float(actual)
    return math.isnan(expected) and math.isnan(value) or value == pytest.approx(expected, abs=1e-6)


def check_rows(rows: dict[tuple[str, str], dict], rules: str) -> None:
    assert len(rows) == 6 * 3
    for key, (dice, hd95, matched, missed, extra, *ignored) in EXPECTED[rules].items():
        row = rows[key]
        assert row["rules"] == rules
        assert same(row["lesion_dice"], dice) and same(row["lesion_hd95"], hd95), (key, row)
        assert (int(row["matched"]), int(row["missed"]), int(row["extra"])) == (matched, missed, extra), (key, row)
        assert int(row["ignored_small"]) == (ignored[0] if ignored else 0), (key, row)


def region(summary: dict, name: str) -> dict:
    return next(e for e in summary["lesion_wise"]["regions"] if e["region"] == name)


def test_brats_eval_rules_through_the_cli(tmp_path, capsys):
    pred, gt = write_cases(tmp_path, hand_cases())
    code = main(["evaluate", str(pred), str(gt), "-o", str(tmp_path / "out"), "--lesion-wise",
                 "--gt-labels", "brats2023", "--pred-labels", "brats2023"])
    assert code == 0
    check_rows(lesion_csv(tmp_path / "out"), "brats-eval")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["lesion_wise"]["rules"] == "brats-eval" and "panoptica" in summary["lesion_wise"]["definition"]
    wt = region(summary, "WT")
    # Dice over the 5 defined cases (F is NaN): (1 + 0.9 + 0.4 + 0 + 0) / 5; HD95 over the 3 finite ones.
    assert wt["lesion_dice"]["mean"] == pytest.approx(2.3 / 5) and wt["lesion_dice"]["n_undefined"] == 1
    assert wt["lesion_hd95"]["mean"] == pytest.approx(12.5 / 3)
    assert (wt["lesion_hd95"]["n"], wt["lesion_hd95"]["n_infinite"], wt["lesion_hd95"]["n_undefined"]) == (3, 2, 1)
    assert (wt["matched"], wt["missed"], wt["extra"]) == (5, 4, 2)
    et = region(summary, "ET")
    assert et["lesion_dice"]["mean"] == pytest.approx(0.5) and et["lesion_dice"]["n_undefined"] == 2
    printed = capsys.readouterr().out
    assert "lesion-wise, rules brats-eval" in printed and "lesion_metrics.csv" in printed
    assert "0.460±" in printed and "(1 undef)" in printed


def test_brats2023_rules_through_the_api(tmp_path):
    pred, gt = write_cases(tmp_path, hand_cases())
    summary = neuromap.evaluate(pred, gt, tmp_path / "out", lesion_wise=True, lesion_rules="brats2023")
    check_rows(lesion_csv(tmp_path / "out"), "brats2023")
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["lesion_wise"]["rules"] == "brats2023" and "374" in summary["lesion_wise"]["definition"]
    wt = region(summary, "WT")
    assert wt["lesion_dice"]["mean"] == pytest.approx(2.3 / 6)
    assert wt["lesion_hd95"]["mean"] == pytest.approx((187 + 187.5 + 12 + 374 + 374 + 0) / 6)
    assert (wt["matched"], wt["missed"], wt["extra"], wt["ignored_small"]) == (4, 2, 2, 2)
    et = region(summary, "ET")
    assert et["lesion_dice"]["mean"] == pytest.approx(2.5 / 6)
    assert et["lesion_hd95"]["mean"] == pytest.approx((187 + 374 + 0 + 374 + 374 + 0) / 6)
    # The voxel-wise outputs are unchanged by the option.
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "metrics.csv", "summary.json", "boxplot.png", "lesion_metrics.csv"}


def test_hd95_skipped_with_no_hd95(tmp_path):
    cases = hand_cases()
    pred, gt = write_cases(tmp_path, {k: cases[k] for k in ("B_small_extra",)})
    summary = neuromap.evaluate(pred, gt, tmp_path / "out", hd95=False, lesion_wise=True)
    row = lesion_csv(tmp_path / "out")[("B_small_extra", "WT")]
    assert row["lesion_hd95"] == "" and float(row["lesion_dice"]) == pytest.approx(0.9)
    assert "lesion_hd95" not in region(summary, "WT")


def test_user_mistakes_exit_2(tmp_path, capsys):
    pred, gt = write_cases(tmp_path, {"a": hand_cases()["A_merge_missed"]})
    out = str(tmp_path / "out")
    assert main(["evaluate", str(pred), str(gt), "-o", out, "--lesion-wise", "--lesion-rules", "brats2021"]) == 2
    assert "unknown lesion rules 'brats2021'" in capsys.readouterr().err
    assert main(["evaluate", str(pred), str(gt), "-o", out, "--lesion-rules", "brats2023"]) == 2
    assert "--lesion-wise" in capsys.readouterr().err
    with pytest.raises(NeuroMapError, match="--task brats"):
        neuromap.evaluate(pred, gt, out, task="binary", lesion_wise=True)
    assert not (tmp_path / "out").exists()
    neuromap.evaluate(pred, gt, out, lesion_wise=True)
    with pytest.raises(NeuroMapError, match="lesion_metrics.csv"):
        neuromap.evaluate(pred, gt, out, lesion_wise=True)


def test_lesions_are_26_connected():
    mask = np.zeros((5, 5, 5), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner neighbours: one lesion
    mask[4, 4, 4] = True  # separate
    assert lesions(mask)[1] == 2


def test_hd95_conventions_by_hand():
    # Cube vs the bar of case C (see hand_cases): 12 mm under both official conventions; MONAI's default (max of
    # the two directed 95th percentiles) gives the same here. A 1-voxel shift of a cube: 1 mm under all three.
    cube, bar = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    cube[4:8, 4:8, 4:8] = True
    bar[4:20, 4:8, 4:8] = True
    shifted = np.roll(cube, 1, axis=0)
    for convention in ("monai", "panoptica", "deepmind"):
        assert hd95_mm(bar, cube, (1, 1, 1), convention) == pytest.approx(12.0)
        assert hd95_mm(shifted, cube, (1, 1, 1), convention) == pytest.approx(1.0)


def test_hd95_conventions_match_the_official_implementations():
    # Random smooth blobs; reference values from panoptica 2.1.7 (_compute_hausdorff_distance95) and DeepMind
    # surface-distance 0.1 (compute_robust_hausdorff(compute_surface_distances(gt, pred, spacing), 95)).
    rng = np.random.default_rng(0)
    gt = ndimage.gaussian_filter(rng.random((40, 36, 30)), 3) > 0.52
    pred = ndimage.gaussian_filter(rng.random((40, 36, 30)), 3) > 0.52
    gt = gt | np.roll(gt, 1, 0)
    pred = pred & np.roll(gt, 2, 1) | pred
    assert hd95_mm(pred, gt, (1, 1, 1), "panoptica") == pytest.approx(16.912959922454178, rel=1e-6)
    assert hd95_mm(pred, gt, (1, 1, 1), "deepmind") == pytest.approx(17.349351572897472, rel=1e-6)
    assert hd95_mm(pred, gt, (0.9, 1.2, 2.5), "panoptica") == pytest.approx(25.11967273529479, rel=1e-6)
    assert hd95_mm(pred, gt, (0.9, 1.2, 2.5), "deepmind") == pytest.approx(26.745093007877166, rel=1e-6)


@pytest.mark.real
@needs_real_data
def test_real_case_against_a_perturbed_copy(tmp_path):
    case = "Brats18_2013_2_1"
    img = nib.load(BRATS / case / f"{case}_seg.nii.gz")
    labels = np.asanyarray(img.dataobj).astype(np.uint8)
    perturbed = np.zeros_like(labels)
    perturbed[2:] = labels[:-2]  # 2 mm shift along the first axis
    perturbed[20:26, 20:26, 20:26] = 4  # a 216-voxel false ET lesion far from the tumour
    for side, data in (("gt", labels), ("pred", perturbed)):
        (tmp_path / side).mkdir()
        nib.save(nib.Nifti1Image(data, img.affine, img.header), str(tmp_path / side / f"{case}_seg.nii.gz"))
    results = {}
    for rules in ("brats-eval", "brats2023"):
        neuromap.evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / rules, lesion_wise=True, lesion_rules=rules)
        results[rules] = {r: row for (_, r), row in lesion_csv(tmp_path / rules).items()}
    for name in REGIONS:
        ev, b23 = results["brats-eval"][name], results["brats2023"][name]
        assert int(ev["matched"]) >= 1 and int(ev["extra"]) >= 1 and int(b23["extra"]) == 1  # the false lesion
        # brats-eval: only matched lesions count, and a pure 2 mm shift keeps every surface distance <= 2 mm.
        assert 0.5 < float(ev["lesion_dice"]) < 0.9 and math.sqrt(3) - 1e-5 <= float(ev["lesion_hd95"]) <= 2 + 1e-5
        # brats2023: one merged tumour plus the extra lesion (Dice 0, 374 mm) -> about half the tumour's scores.
        assert 0.35 < float(b23["lesion_dice"]) < 0.5 and 187 < float(b23["lesion_hd95"]) <= 188 + 1e-5
    # The same files through the official code (converted to BraTS 2023 labels first; run outside this repo):
    # brats-evaluation 0.0.10 (panoptica 2.1.7) and BraTS-2023-Metrics' brats_metrics.py gave exactly these.
    official = {
        "brats-eval": {"WT": (0.5037311589954984, 2.0, 5, 1, 2), "TC": (0.8673921344024437, 2.0, 1, 1, 2),
                       "ET": (0.7575659715814725, 1.7320508075688772, 1, 1, 2)},
        "brats2023": {"WT": (0.4343701399688958, 188.0, 1, 0, 1), "TC": (0.43369859875529765, 188.0, 1, 0, 1),
                      "ET": (0.37878857775522445, 187.70710678118655, 1, 0, 1)},
    }
    for rules, by_region in official.items():
        for name, (dice, hd95, matched, missed, extra) in by_region.items():
            row = results[rules][name]
            assert float(row["lesion_dice"]) == pytest.approx(dice, rel=1e-9)
            assert float(row["lesion_hd95"]) == pytest.approx(hd95, rel=1e-6)  # MONAI's distances are float32
            assert (int(row["matched"]), int(row["missed"]), int(row["extra"])) == (matched, missed, extra)
