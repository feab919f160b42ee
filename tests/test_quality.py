"""The per-case quality estimate (`neuromap.quality`): shipped calibration, report field, and that it reacts to a
corrupted input."""

import json

from conftest import LGG, UNSEEN, needs_real_data

from neuromap.checkpoint import ModelSpec, read_checkpoint
from neuromap.cli import main
from neuromap.quality import WEIGHTS_DIR, calibration_for, quality_text, recipe_key
from neuromap.segmenter import segment
from neuromap.zoo import default_model, shipped_models

SIGNALS = {"flip_dice", "tumour_entropy", "uncertain_ratio", "core_fraction", "core_largest_share", "tumour_ml",
           "intensity_distance", "swap_margin"}


def spec_of(name: str) -> ModelSpec:
    return ModelSpec.from_dict(read_checkpoint(shipped_models()[name].file)["spec"])


def test_every_calibration_belongs_to_a_shipped_model():
    shipped = {recipe_key(spec_of(name)) for name in shipped_models()}
    files = sorted(WEIGHTS_DIR.glob("quality_*.json"))
    assert files
    for path in files:
        assert json.loads(path.read_text())["recipe"] in shipped, f"{path.name} fits no shipped model"


def test_shipped_calibration_loads_and_applies_to_the_default_model():
    """A new default model must come with its own fitted quality score (scripts/fit_quality.py)."""
    default = default_model(["t1", "t1ce", "t2", "flair"], "brats").name
    calibration = calibration_for(spec_of(default))
    assert calibration is not None, f"weights/quality_*.json for the default model {default}'s recipe is missing"
    data = calibration.data
    assert data["validation"]["n"] == 22
    assert -1 <= data["validation"]["loo_spearman"] <= 1
    assert set(data["model"]["features"]) <= SIGNALS
    assert len(data["model"]["coef"]) == len(data["model"]["features"])
    n = len(spec_of(default).modalities)
    assert len(data["reference"]["intensity"]["mean"]) == n * 7 + n * (n - 1) // 2  # 7 quantiles each, and pairs
    assert 0 < calibration.flag_below < 1
    worst = {f: 0.0 for f in data["model"]["features"]}
    best = {f: 1.0 for f in data["model"]["features"]}
    assert all(0 <= calibration.score(s) <= 1 for s in (worst, best))  # clipped: always a Dice-like number
    assert calibration.score({}) is None  # a missing signal gives no score, never a made-up one


def test_uncalibrated_model_gets_no_score_and_review(tmp_path, tiny_checkpoint, synthetic_case, capsys):
    assert main(["segment", str(synthetic_case), "-o", str(tmp_path), "--model", str(tiny_checkpoint),
                 "--quiet"]) == 0
    quality = json.loads((tmp_path / "Synthetic_001_report.json").read_text())["quality"]
    assert quality["score"] is None and quality["flag"] == "review"
    assert "never calibrated" in quality["reasons"][0]
    assert 0 <= quality["signals"]["flip_dice"] <= 1
    printed = capsys.readouterr().out  # the summary line shows the estimate, the reasons follow it
    assert "Synthetic_001: WT " in printed and "; quality n/a REVIEW -> " in printed
    assert f"  review: {quality['reasons'][0]}" in printed


@needs_real_data
def test_report_quality_on_a_real_case(unseen_segmented):
    quality = unseen_segmented.report["quality"]
    assert quality == json.loads(unseen_segmented.files["report.json"].read_text())["quality"]
    assert isinstance(quality["score"], float) and 0 <= quality["score"] <= 1
    assert quality["flag"] in ("ok", "review")
    assert isinstance(quality["reasons"], list) and all(isinstance(r, str) for r in quality["reasons"])
    assert (quality["flag"] == "review") == bool(quality["reasons"])
    assert quality["calibration"]["n"] == 22
    assert quality_text(quality).startswith(f"quality {quality['score']:.2f}")


@needs_real_data
def test_swapped_sequences_get_a_lower_score_and_review(unseen_segmented):
    """The same real scan with its files given under the wrong names (T1<->T2, T1ce<->FLAIR), as a wrong --map
    would. The default (FLAIR+T1ce) model reads the swapped pair: its estimate must drop and the case be flagged.
    The four-sequence model compares every renaming of four files, so its swap check must also name the swap."""
    files = {token: next(UNSEEN.glob(f"*-{token}.nii.gz")) for token in ("t1n", "t1c", "t2w", "t2f")}
    swapped = {"t1": files["t2w"], "t2": files["t1n"], "t1ce": files["t2f"], "flair": files["t1c"]}
    (result,) = segment(swapped)
    clean, corrupt = unseen_segmented.report["quality"], result.report["quality"]
    assert corrupt["flag"] == "review"
    assert not any("swapped" in reason for reason in clean["reasons"])
    assert clean["signals"]["looks_like"] == {}
    assert corrupt["score"] is None or corrupt["score"] < clean["score"] - 0.05
    (four,) = segment(swapped, model="brats_resunet25d")
    quality = four.report["quality"]
    assert quality["flag"] == "review"
    assert any("sequences look swapped" in reason for reason in quality["reasons"])
    assert quality["signals"]["looks_like"] == {"t1": "t2", "t1ce": "flair", "t2": "t1", "flair": "t1ce"}


def test_signals_do_not_change_with_tta(tiny_checkpoint, synthetic_case):
    """The score was fitted on single model passes; with --tta the output is the flip average, but the quality
    signals must still come from the single unmirrored and mirrored passes."""
    plain, = segment(synthetic_case, model=tiny_checkpoint)
    averaged, = segment(synthetic_case, model=tiny_checkpoint, tta=True)
    assert averaged.report["model"]["tta"] is True
    for name in ("flip_dice", "tumour_entropy", "uncertain_ratio"):
        assert averaged.report["quality"]["signals"][name] == plain.report["quality"]["signals"][name]


@needs_real_data
def test_shipped_lgg_model_scores_a_real_slice_folder(tmp_path):
    """The LGG model has its own calibration (20 patients, out of fold); slice folders store no voxel size, so its
    voxel-size check is absent rather than comparing against a made-up size."""
    patient = LGG / "TCGA_CS_6290_20000917"  # one of the cross-validation's held-out patients (0.90 Dice there)
    (result,) = segment(patient, tmp_path)
    quality = result.report["quality"]
    assert quality["calibration"]["n"] == 20 and quality["calibration"]["file"] == "quality_lgg_resunet.json"
    assert isinstance(quality["score"], float) and 0 <= quality["score"] <= 1
    assert quality["signals"]["spacing_mm"] is None and "core_fraction" not in quality["signals"]
    assert not any("voxel size" in reason for reason in quality["reasons"])
    assert calibration_for(spec_of("lgg_resunet")).reference["spacing_mm_allowed"] is None
