"""The LGG slice task end to end: preprocessing of non-skull-stripped slices, `neuromap segment` writing per-slice
masks, report and montage, `neuromap evaluate` per patient and per slice, and `neuromap train` on slice folders.

Synthetic patients are small kaggle_3m-like folders written here: a bright elliptic head on a noisy, nonzero
background (the slices are not skull-stripped) with a lesion that is bright on FLAIR. Real-data tests use the
shared patients and skip when they are absent.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from conftest import LGG
from scipy import ndimage

import neuromap
from neuromap.checkpoint import ModelSpec, load_model, save_checkpoint
from neuromap.cli import main
from neuromap.config import InferenceConfig, ModelConfig, PreprocessConfig, TrainConfig, load_yaml
from neuromap.errors import NeuroMapError
from neuromap.evaluation import evaluate
from neuromap.evaluation_tables import format_table
from neuromap.inference import predict_probs
from neuromap.io import LGG as SLICE_LAYOUT
from neuromap.io import atomic_path, discover_cases, load_case
from neuromap.metrics import binary_case_metrics
from neuromap.postprocess import postprocess
from neuromap.preprocess import foreground_mask, prepare
from neuromap.segmenter import segment
from neuromap.tasks import task_of
from neuromap.training.data import prepare_case
from neuromap.training.loop import validate
from neuromap.zoo import resolve_model_paths

ROWS, COLS, N = 40, 36, 11  # non-square, and slice numbers past 9 so a lexicographic order would show
LESION = range(3, 7)  # slice indices (0-based) with abnormality
needs_lgg = pytest.mark.skipif(not LGG.is_dir(), reason=f"real LGG data not found at {LGG}")
# The two smallest real patients keep the real-data tests quick.
REAL_IDS = ["TCGA_CS_6290_20000917", "TCGA_CS_4941_19960909"]


def make_patient(root: Path, case_id: str, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A kaggle_3m patient folder; returns it and the ground truth (rows, cols, N) as 0/1."""
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    r, c = np.mgrid[:ROWS, :COLS]
    head = ((r - ROWS / 2) / (ROWS * 0.42)) ** 2 + ((c - COLS / 2) / (COLS * 0.42)) ** 2 < 1
    truth = np.zeros((ROWS, COLS, N), np.uint8)
    for z in range(N):
        image = rng.integers(1, 12, (ROWS, COLS, 3)).astype(np.uint8)  # noisy background, nonzero like the dataset
        image[head] = rng.integers(70, 110, (int(head.sum()), 3))
        if z in LESION:
            lesion = (r - ROWS * 0.45) ** 2 + (c - COLS * 0.55) ** 2 < (2 + z - LESION.start) ** 2
            image[lesion, 1] = 220  # FLAIR hyperintensity
            truth[lesion, z] = 1
        tifffile.imwrite(folder / f"{case_id}_{z + 1}.tif", image, photometric="rgb")
        tifffile.imwrite(folder / f"{case_id}_{z + 1}_mask.tif", truth[:, :, z] * 255)
    return folder, truth


@pytest.fixture
def patients(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A parent folder with two synthetic patients, and their ground truth by case id."""
    truths = {}
    for i, case_id in enumerate(("TCGA_AA_0001_20000101", "TCGA_BB_0002_20010101")):
        truths[case_id] = make_patient(tmp_path / "lgg", case_id, seed=i)[1]
    return tmp_path / "lgg", truths


@pytest.fixture(scope="module")
def binary_checkpoint(tmp_path_factory) -> Path:
    """A real (untrained) small binary 2D U-Net for the three LGG channels."""
    torch.manual_seed(0)
    spec = ModelSpec(
        ModelConfig(name="unet2d", spatial_dims=2, options={"features": [8, 8, 16, 16, 32, 8]}),
        PreprocessConfig(mode="2d", slice_size=(64, 64), modalities=["t1", "flair", "t1ce"], foreground="otsu"),
        "binary", (64, 64), 2,
    )
    return save_checkpoint(tmp_path_factory.mktemp("lgg_ckpt") / "lgg_tiny.pt", spec, spec.build().state_dict())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def predictions_from(truths: dict[str, np.ndarray], gt_root: Path, out: Path) -> Path:
    """A prediction folder as `neuromap segment` lays it out, holding the given masks."""
    for case_id, labels in truths.items():
        SLICE_LAYOUT.write_masks(labels, SLICE_LAYOUT.case_from_folder(gt_root / case_id), out / case_id)
    return out


# ------------------------------------------------------------------------------------------------ preprocessing


def test_otsu_foreground_excludes_the_noisy_background_and_maps_back_exactly(tmp_path):
    folder, truth = make_patient(tmp_path, "TCGA_AA_0001_20000101")
    volume = load_case(SLICE_LAYOUT.case_from_folder(folder))
    assert np.any(volume.image != 0, axis=0).all()  # "nonzero" would keep the whole field of view
    mask = foreground_mask(volume.image, "otsu")
    r, c = np.mgrid[:ROWS, :COLS]
    head = ((r - ROWS / 2) / (ROWS * 0.42)) ** 2 + ((c - COLS / 2) / (COLS * 0.42)) ** 2 < 1
    assert np.array_equal(mask, np.repeat(head[:, :, None], N, axis=2))

    (r0, c0), (r1, c1) = np.argwhere(head).min(axis=0), np.argwhere(head).max(axis=0) + 1
    cfg = PreprocessConfig(modalities=["t1", "flair", "t1ce"], mode="2d", crop_margin=0, foreground="otsu",
                           slice_size=(r1 - r0, c1 - c0))  # no resize, so the mapping can be compared exactly
    prepared = prepare(volume, cfg)
    assert prepared.inverse.bbox == ((r0, r1), (c0, c1), (0, N))  # cropped to the head
    assert not prepared.image[:, ~head[r0:r1, c0:c1]].any()  # background outside the z-score, set to 0
    # Identity affine: RAS reorientation is the identity, and without a resize the mapping is exact both ways.
    assert np.array_equal(prepared.inverse.to_ras, [[0, 1], [1, 1], [2, 1]])
    assert np.array_equal(prepared.inverse.to_original(prepared.seg), truth)
    assert np.array_equal(prepared.inverse.to_prepared(truth), prepared.seg)


@pytest.mark.real
@needs_lgg
def test_real_otsu_mask_keeps_every_abnormal_voxel():
    cfg = load_yaml(Path(__file__).parents[1] / "configs" / "lgg_unet2d.yaml", TrainConfig).preprocess
    assert cfg.foreground == "otsu"
    for case_id in REAL_IDS:
        volume = load_case(SLICE_LAYOUT.case_from_folder(LGG / case_id), cfg.modalities)
        mask = foreground_mask(volume.image, cfg.foreground)
        assert not (volume.seg.astype(bool) & ~mask).any()
        assert mask.mean() < 0.6 < np.any(volume.image != 0, axis=0).mean()  # the head, not the field of view


def test_postprocess_measures_components_in_voxels_when_spacing_is_unknown():
    labels = np.zeros((40, 40, 6), np.uint8)
    labels[5:25, 5:25, 1:5] = 1  # 1600 voxels
    labels[32:35, 32:35, 2:5] = 1  # 27 voxels, disconnected
    cfg = InferenceConfig()
    cleaned, notes = postprocess(labels, None, cfg)
    assert cleaned.sum() == 1600 and set(np.unique(cleaned)) == {0, 1}  # binary labels are never relabelled
    assert notes == [f"removed 1 tumour component(s) (27.00 voxels in all) smaller than {cfg.min_component_voxels} "
                     f"voxels or 10% of the largest"]
    kept, notes = postprocess(labels, None, cfg.model_copy(update={"min_component_voxels": 20,
                                                                   "min_component_fraction": 0.0}))
    assert kept.sum() == 1627 and notes == []


# ----------------------------------------------------------------------------------------------------- segment


def test_segment_writes_slice_masks_montage_and_voxel_report(tmp_path, patients, binary_checkpoint, capsys):
    root, truths = patients
    out = tmp_path / "out"
    assert main(["segment", str(root), "-o", str(out), "--model", str(binary_checkpoint), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for case_id in truths:
        assert f"{case_id}: abnormality " in printed and " voxels " in printed
        masks = sorted((out / case_id).iterdir(), key=lambda p: int(p.name.split("_")[-3]))
        assert [p.name for p in masks] == [f"{case_id}_{n}_pred_mask.tif" for n in range(1, N + 1)]
        stack = np.stack([tifffile.imread(p) for p in masks], axis=-1)
        assert stack.shape == (ROWS, COLS, N) and stack.dtype == np.uint8 and set(np.unique(stack)) <= {0, 255}

        report = json.loads((out / f"{case_id}_report.json").read_text())
        assert report["volume_voxels"] == {"abnormality": int((stack > 0).sum())}
        assert report["volumes_ml"] == {"abnormality": None} and report["voxel_spacing_mm"] is None
        assert "pixel spacing unknown: volumes in voxels" in report["warnings"]
        assert report["label_convention"] == "binary" and report["model"]["task"] == "binary"
        present = [n for n in range(1, N + 1) if stack[:, :, n - 1].any()]
        assert report["slices"] == {"count": N, "with_abnormality": present}
        assert report["research_use_only"] is True
        assert (out / f"{case_id}_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing else: the patients' slices are in separate folders, next to one report and montage each.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{c}{suffix}" for c in truths for suffix in ("", "_overlay.png", "_report.json")
    )


def test_segment_api_flags_flair_copies_and_returns_labels(tmp_path, binary_checkpoint):
    folder, _ = make_patient(tmp_path, "TCGA_CC_0003_20020202")
    for n in range(1, N + 1):  # the dataset fills a missing post-contrast with FLAIR
        path = folder / f"{folder.name}_{n}.tif"
        image = tifffile.imread(path)
        image[:, :, 2] = image[:, :, 1]
        tifffile.imwrite(path, image, photometric="rgb")
    for _ in range(2):  # the package-level function keeps working once the submodule has been imported
        (result,) = neuromap.segment(folder, model=binary_checkpoint)
    assert result.files == {} and result.labels.shape == (ROWS, COLS, N)
    assert any("t1ce channel(s) are copies of FLAIR" in w and "the model read t1ce" in w
               for w in result.report["warnings"])


@pytest.mark.parametrize("failing", ["third mask", "report"])
def test_failure_mid_write_leaves_no_output(tmp_path, patients, binary_checkpoint, monkeypatch, failing):
    """Masks, montage and report are staged together: a failure in any of them leaves none behind."""
    root, _ = patients
    if failing == "third mask":
        calls = []

        def broken_imwrite(path, *args, **kwargs):
            calls.append(path)
            Path(path).write_bytes(b"partial")
            if len(calls) == 3:
                raise OSError("disk full")

        monkeypatch.setattr("neuromap.io.lgg_files.tifffile.imwrite", broken_imwrite)
    else:
        staging = atomic_path

        @contextlib.contextmanager
        def broken_report(target: Path, overwrite: bool = False):
            with staging(target, overwrite) as tmp:
                if target.name.endswith("_report.json"):
                    raise OSError("disk full")
                yield tmp

        monkeypatch.setattr("neuromap.segmenter.atomic_path", broken_report)
    with pytest.raises(OSError, match="disk full"):
        segment(root / "TCGA_AA_0001_20000101", tmp_path / "out", model=binary_checkpoint)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_outputs_never_go_into_a_patient_folder(patients, binary_checkpoint):
    root, _ = patients
    folder = root / "TCGA_AA_0001_20000101"
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(NeuroMapError, match="input folder"):
        segment(folder, root, model=binary_checkpoint)  # masks would land in the patient folder itself
    with pytest.raises(NeuroMapError, match="lies inside the input folder"):
        segment(folder, folder, model=binary_checkpoint)  # report and montage would
    assert sorted(p.name for p in folder.iterdir()) == before


def test_slice_folders_default_to_the_shipped_binary_model(tmp_path, monkeypatch, patients):
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setattr("neuromap.zoo.WEIGHTS_DIR", weights)
    brats = {"brats_flair": {"file": "b.pt", "modalities": ["flair"], "task": "brats"}}
    (weights / "models.json").write_text(json.dumps(brats))
    with pytest.raises(NeuroMapError, match="no model for the 'binary' task is shipped.*--model"):
        segment(patients[0])
    index = {**brats, "lgg": {"file": "lgg.pt", "modalities": ["t1", "flair", "t1ce"], "task": "binary"}}
    (weights / "models.json").write_text(json.dumps(index))
    case = discover_cases(patients[0])[0]
    assert resolve_model_paths(None, case.modalities, "binary") == [weights / "lgg.pt"]
    assert resolve_model_paths(None, case.modalities) == [weights / "b.pt"]


@pytest.mark.real
@needs_lgg
def test_real_patient_segments_in_its_own_layout(tmp_path, binary_checkpoint):
    (result,) = segment(LGG / REAL_IDS[0], tmp_path, model=binary_checkpoint)
    case = SLICE_LAYOUT.case_from_folder(LGG / REAL_IDS[0])
    for _, image, _ in case.slices:
        mask = tifffile.imread(tmp_path / REAL_IDS[0] / f"{image.stem}_pred_mask.tif")
        assert mask.shape == tifffile.imread(image).shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
    assert result.report["slices"]["count"] == len(case.slices)
    assert result.files["overlay.png"].stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_ground_truth_against_itself(tmp_path, patients, capsys):
    root, truths = patients
    pred = predictions_from(truths, root, tmp_path / "pred")
    assert main(["evaluate", str(pred), str(root), "-o", str(tmp_path / "out"), "--task", "binary"]) == 0
    table = capsys.readouterr().out
    assert "per slice, only slices with ground-truth abnormality" in table and "HD95 (vox)" in table
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    slices = read_csv(tmp_path / "out" / "metrics_per_slice.csv")
    assert len(rows) == 2 and len(slices) == 2 * N
    assert [int(r["slice"]) for r in slices[:N]] == list(range(1, N + 1))
    for row in rows + slices:
        for key in ("dice", "iou", "sensitivity", "precision", "specificity", "accuracy"):
            assert float(row[key]) == 1.0, (key, row)
        assert float(row["hd95"]) == 0.0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["hd95_unit"].startswith("voxels") and "vol_gt_voxels" in rows[0]
    assert summary["per_slice"]["n_slices"] == 2 * N
    with_gt = summary["per_slice"]["slices_with_ground_truth"][0]["metrics"]["dice"]
    assert with_gt == {"mean": 1.0, "std": 0.0, "median": 1.0, "n": 2 * len(LESION)}
    assert "both empty" in summary["per_slice"]["convention"]


def test_evaluate_eroded_ground_truth(tmp_path, patients):
    root, truths = patients
    eroded = {c: np.stack([ndimage.binary_erosion(t[:, :, z]) for z in range(N)], -1).astype(np.uint8)
              for c, t in truths.items()}
    pred = predictions_from(eroded, root, tmp_path / "pred")
    summary = evaluate(pred, root, tmp_path / "out", task="binary")
    for row in read_csv(tmp_path / "out" / "metrics.csv"):
        gt, ero = truths[row["case_id"]], eroded[row["case_id"]]
        assert float(row["dice"]) == pytest.approx(2 * ero.sum() / (ero.sum() + gt.sum()))
        assert float(row["sensitivity"]) == pytest.approx(ero.sum() / gt.sum()) and float(row["precision"]) == 1
        assert int(row["vol_diff_voxels"]) == int(ero.sum()) - int(gt.sum())
    for row in read_csv(tmp_path / "out" / "metrics_per_slice.csv"):
        z = int(row["slice"]) - 1
        gt, ero = truths[row["case_id"]][:, :, z], eroded[row["case_id"]][:, :, z]
        if gt.any():
            assert ero.any()  # every synthetic lesion survives one erosion: an inner layer one pixel away
            assert float(row["dice"]) == pytest.approx(2 * ero.sum() / (ero.sum() + gt.sum()))
            assert 0 < float(row["hd95"]) <= math.sqrt(2) + 1e-6
        else:
            assert float(row["dice"]) == 1.0  # both empty
    per_slice = summary["per_slice"]
    assert per_slice["slices_with_ground_truth"][0]["metrics"]["dice"]["mean"] < 1.0
    assert per_slice["all_slices"][0]["metrics"]["dice"]["mean"] > \
        per_slice["slices_with_ground_truth"][0]["metrics"]["dice"]["mean"]  # empty slices inflate the mean
    assert "per slice, all slices" in format_table(summary)


def test_empty_slice_conventions(tmp_path, patients):
    root, truths = patients
    case_id = "TCGA_AA_0001_20000101"
    pred = truths[case_id].copy()
    pred[:4, :4, 0] = 1  # false positive on an empty slice
    pred[:, :, LESION.start] = 0  # a lesion slice missed entirely
    predictions_from({case_id: pred}, root, tmp_path / "pred")
    with pytest.warns(UserWarning, match="1 matched case"):
        summary = evaluate(tmp_path / "pred", root, tmp_path / "out", task="binary", allow_missing=True)
    by_slice = {int(r["slice"]): r for r in read_csv(tmp_path / "out" / "metrics_per_slice.csv")}
    diagonal = math.hypot(ROWS, COLS)
    false_positive, missed, both_empty = by_slice[1], by_slice[LESION.start + 1], by_slice[N]
    assert float(false_positive["dice"]) == 0 and float(false_positive["sensitivity"]) == 0
    assert float(false_positive["hd95"]) == pytest.approx(diagonal)
    assert float(missed["dice"]) == 0 and float(missed["precision"]) == 0
    assert float(missed["hd95"]) == pytest.approx(diagonal)
    assert float(both_empty["dice"]) == 1 and float(both_empty["hd95"]) == 0
    with_gt = summary["per_slice"]["slices_with_ground_truth"][0]["metrics"]["dice"]
    assert with_gt["n"] == len(LESION) and with_gt["mean"] == pytest.approx((len(LESION) - 1) / len(LESION))


def test_evaluate_refuses_mismatches(tmp_path, patients):
    root, truths = patients
    pred = predictions_from(truths, root, tmp_path / "pred")
    with pytest.raises(NeuroMapError, match="--task binary"):
        evaluate(pred, root, tmp_path / "out")
    next((pred / "TCGA_BB_0002_20010101").glob("*_11_pred_mask.tif")).unlink()
    with pytest.raises(NeuroMapError, match=r"slice mismatch for case 'TCGA_BB_0002_20010101'.*lacks slices \[11\]"):
        evaluate(pred, root, tmp_path / "out", task="binary")
    assert not (tmp_path / "out").exists()


@pytest.mark.real
@needs_lgg
def test_real_ground_truth_against_itself_and_eroded(tmp_path):
    gt_root = tmp_path / "gt"
    gt_root.mkdir()
    truths, eroded = {}, {}
    for case_id in REAL_IDS:
        (gt_root / case_id).symlink_to(LGG / case_id, target_is_directory=True)  # nothing copied
        truths[case_id] = load_case(SLICE_LAYOUT.case_from_folder(LGG / case_id), ["flair"]).seg
        eroded[case_id] = ndimage.binary_erosion(truths[case_id], structure=np.ones((3, 3, 1)))
    same = evaluate(predictions_from(truths, gt_root, tmp_path / "same"), gt_root, tmp_path / "out1", task="binary")
    for table in (same["structures"], same["per_slice"]["all_slices"], same["per_slice"]["slices_with_ground_truth"]):
        assert table[0]["metrics"]["dice"]["mean"] == 1.0 and table[0]["metrics"]["hd95"]["mean"] == 0.0
    worse = evaluate(predictions_from(eroded, gt_root, tmp_path / "ero"), gt_root, tmp_path / "out2", task="binary")
    for row in read_csv(tmp_path / "out2" / "metrics.csv"):
        gt, ero = truths[row["case_id"]], eroded[row["case_id"]]
        assert float(row["dice"]) == pytest.approx(2 * ero.sum() / (ero.sum() + gt.sum()))
        assert 0.8 < float(row["dice"]) < 1.0  # one pixel off the rim of a lesion of several thousand pixels
    assert worse["per_slice"]["n_slices"] == sum(t.shape[2] for t in truths.values())


# ------------------------------------------------------------------------------------------------------- train


def test_train_on_slice_folders_logs_the_abnormality_dice(tmp_path):
    for i in range(3):
        make_patient(tmp_path / "data", f"TCGA_T{i}_000{i}_20000101", seed=i)
    config = {
        "name": "lgg_tiny", "data_roots": [str(tmp_path / "data")], "task": "binary",
        "preprocess": {"modalities": ["t1", "flair", "t1ce"], "mode": "2d", "slice_size": [32, 32],
                       "crop_margin": 0, "foreground": "otsu"},
        "model": {"name": "unet2d", "spatial_dims": 2, "options": {"features": [4, 4, 8, 8, 16, 4]}},
        "patch_size": [32, 32], "batch_size": 2, "epochs": 2, "iterations_per_epoch": 2, "val_every": 1,
        "split": {"ratios": [0.67, 0.33]}, "seed": 0, "threads": 1,
    }
    path = tmp_path / "lgg_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--output-dir", str(tmp_path / "run"), "--quiet"]) == 0
    model, spec = load_model(tmp_path / "run" / "best.pt")
    assert spec.task == "binary" and set(spec.info["val_dice"]) == {"WT", "mean"}
    log = read_csv(tmp_path / "run" / "log.csv")
    assert len(log) == 2 and all(row["val_dice_WT"] == row["val_dice_mean"] and not row["val_dice_ET"] for row in log)

    # The logged score is the abnormality Dice: label 1 against the binary mask, nothing averaged in (for
    # binary labels, BraTS's ET region would be empty on both sides and score a free 1).
    (val_id,) = json.loads((tmp_path / "run" / "split.json").read_text())["val"]
    cfg = TrainConfig.model_validate(config)
    val_case = prepare_case(next(c for c in discover_cases(tmp_path / "data") if c.case_id == val_id), cfg)
    labels = task_of(spec).labels(predict_probs([(model, spec)], val_case.image, InferenceConfig()))
    expected = binary_case_metrics(labels, val_case.seg, None, hd95=False)[0]["dice"]
    assert validate(model, spec, [val_case], torch.device("cpu")) == {"WT": expected, "mean": expected}

    # Warm start from it (the pretraining experiment's step): recorded in the new best.pt, every tensor loaded.
    warm = neuromap.train({**config, "epochs": 1, "output_dir": str(tmp_path / "warm"),
                           "init_checkpoint": str(tmp_path / "run" / "best.pt")}, progress=False)
    record = load_model(warm.best_checkpoint)[1].info["init_checkpoint"]
    assert record["tensors_loaded"] == record["tensors_total"] > 0
