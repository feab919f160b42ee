"""Cross-validation and the 2.5D / native-resolution recipe: stratified folds, slice stacks, padding, a real
fold run scored out of fold through the CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import BRATS, needs_real_data

from neuromap.checkpoint import ModelSpec
from neuromap.cli import main
from neuromap.config import InferenceConfig, ModelConfig, PreprocessConfig, SplitConfig, TrainConfig, load_yaml
from neuromap.inference import predict_probs, slice_batch, slice_volume
from neuromap.training.crossval import fold_config
from neuromap.training.data import kfold_assignment, site_of, split_cases

BRATS_IDS = (["Brats18_2013_2_1", "Brats18_2013_3_1", "Brats18_2013_23_1"]
             + [f"Brats18_CBICA_A{c}_1" for c in "BCDEFGHIJKLM"]
             + [f"Brats18_TCIA0{i}_{100 + i}_1" for i in range(7)])


def test_site_of_reads_the_institution():
    assert site_of("Brats18_2013_2_1") == "2013"
    assert site_of("Brats18_TCIA01_378_1") == "TCIA"
    assert site_of("Brats18_CBICA_AOP_1") == "CBICA"
    assert site_of("TCGA_CS_4941_19960909") == "CS"
    assert site_of("case7") == ""


def test_folds_partition_the_cases_and_spread_every_site():
    folds = [split_cases(BRATS_IDS, SplitConfig(mode="kfold", folds=5, fold=f), seed=0) for f in range(5)]
    held_out = [f["val"] for f in folds]
    assert sorted(sum(held_out, [])) == sorted(BRATS_IDS)  # every case held out exactly once
    assert sorted(len(v) for v in held_out) == [4, 4, 4, 5, 5]
    for fold in folds:
        assert not set(fold["train"]) & set(fold["val"]) and not fold["test"]
    # the three BraTS-2013 patients land in three different folds
    assert len({f for f, val in enumerate(held_out) for c in val if site_of(c) == "2013"}) == 3
    assert kfold_assignment(BRATS_IDS, 5, 0) == kfold_assignment(list(reversed(BRATS_IDS)), 5, 0)
    assert kfold_assignment(BRATS_IDS, 5, 0) != kfold_assignment(BRATS_IDS, 5, 1)


def test_split_seed_keeps_the_folds_when_the_training_seed_changes():
    """A seed study pairs runs on the same held-out cases: ``split.seed`` fixes the shuffle, else the run's seed."""
    fold = {"mode": "kfold", "folds": 5, "fold": 2}
    fixed = SplitConfig.model_validate({**fold, "seed": 0})
    assert split_cases(BRATS_IDS, fixed, seed=1) == split_cases(BRATS_IDS, SplitConfig(**fold), seed=0)
    assert split_cases(BRATS_IDS, SplitConfig(**fold), seed=1) != split_cases(BRATS_IDS, SplitConfig(**fold), seed=0)
    cfg = load_yaml(Path(__file__).parents[1] / "configs" / "arms" / "seed1.yaml", TrainConfig)
    assert (cfg.seed, cfg.split.seed) == (1, 0)


def test_split_all_trains_on_everything_and_needs_select_last():
    assert split_cases(BRATS_IDS, SplitConfig(mode="all"), 0)["train"] == sorted(BRATS_IDS)
    with pytest.raises(ValueError, match="select: last"):
        TrainConfig.model_validate({"split": {"mode": "all"}})


def test_fold_config_sets_split_and_folder():
    cfg = TrainConfig.model_validate({"name": "x", "output_dir": "/tmp/runs/x"})
    folded = fold_config(cfg, 3)
    assert (folded.split.mode, folded.split.fold, folded.output_dir) == ("kfold", 3, "/tmp/runs/x/fold_3")


@pytest.mark.parametrize("channels_last", [False, True])
def test_slice_batch_orders_sequence_then_offset_with_zero_ends(channels_last):
    image = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)

    def stack(index: list[int], context: int) -> np.ndarray:
        batch = slice_batch(slice_volume(image, context, channels_last=channels_last), np.array(index), context,
                            channels_last)
        # what the engine reads, without another copy: NCHW memory, or NHWC memory seen as NCHW (channels_last)
        laid_out = np.moveaxis(batch, 1, -1) if channels_last else batch
        assert laid_out.flags.c_contiguous
        return batch

    batch = stack([0, 2], context=1)
    assert batch.shape == (2, 6, 3, 4)
    assert np.array_equal(batch[1, 0], image[0, ..., 1]) and np.array_equal(batch[1, 2], image[0, ..., 3])
    assert np.array_equal(batch[1, 4], image[1, ..., 2])
    assert np.array_equal(batch[0, 0], np.zeros((3, 4)))  # below the first slice
    assert np.array_equal(stack([4], context=0)[0], image[..., 4])


def test_native_resolution_inference_pads_to_the_divisor_and_crops_back():
    """A crop of 37 x 29 voxels (not a multiple of 16) goes through a 2.5D U-Net and comes back the same size;
    each slice's output depends only on its own stack (same answer for any slice batch size)."""
    preprocess = PreprocessConfig(mode="2d", slice_size=None, context_slices=1)
    spec = ModelSpec(ModelConfig(name="unet2d", spatial_dims=2, out="regions",
                                 options={"features": [4, 4, 8, 8, 16, 4]}), preprocess, "brats", (32, 32), 3)
    assert preprocess.in_channels == 12
    torch.manual_seed(0)
    model = spec.build().eval()
    image = np.random.default_rng(0).normal(size=(4, 37, 29, 7)).astype(np.float32)
    probs = predict_probs([(model, spec)], image, InferenceConfig(slice_batch_size=3, skip_slices=False))
    assert probs.shape == (3, 37, 29, 7)
    again = predict_probs([(model, spec)], image, InferenceConfig(slice_batch_size=7, skip_slices=False))
    assert np.allclose(probs, again, atol=1e-5)


@needs_real_data
@pytest.mark.slow
def test_cv_command_trains_a_fold_and_scores_its_cases_out_of_fold(tmp_path, capsys):
    """A tiny 2.5D fold on the real BraTS cases, through `neuromap cv`: a resumable fold folder, every held-out
    case segmented in its own grid and scored, a table with one row per held-out case."""
    cfg = {
        "name": "tiny_cv", "data_roots": [str(BRATS)], "output_dir": str(tmp_path / "run"),
        "preprocess": {"mode": "2d", "slice_size": None, "spacing": [1, 1, 1], "context_slices": 1},
        "model": {"name": "unet2d", "spatial_dims": 2, "out": "regions", "options": {"features": [4, 4, 8, 8, 16, 4]}},
        "patch_size": [48, 48], "batch_size": 2, "epochs": 1, "iterations_per_epoch": 2, "val_every": 1,
        "lr_schedule": "poly", "select": "last", "split": {"mode": "kfold", "folds": 5}, "threads": 2,
        "batch_dice": True, "precision": "bf16",
        "augment": {"channel_wise": True, "bias_field": 0.3, "noise_std": 0.05, "blur_sigma": [0.5, 1.0],
                    "low_resolution": [0.5, 1.0], "prob": 1.0},
    }
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["cv", str(path), "--folds", "2", "--quiet", "--no-hd95"]) == 0
    run = tmp_path / "run"
    held_out = json.loads((run / "fold_2" / "split.json").read_text())["val"]
    assert len(held_out) == 4
    assert sorted(p.name for p in (run / "oof").glob("*_seg.nii.gz")) == sorted(f"{c}_seg.nii.gz" for c in held_out)
    table = (run / "oof_table.md").read_text()
    assert all(case in table for case in held_out) and "| **n** | | 4 |" in table
    assert "hd95" not in table and "nan" not in table  # --no-hd95: no empty columns
    summary = json.loads((run / "oof_eval" / "summary.json").read_text())
    assert summary["n_cases"] == 4 and sorted(summary["cases"]) == sorted(held_out)
    # a finished fold is not trained again: the second call only re-scores, and only its own folds' cases, though
    # another fold's lane (`neuromap cv --folds K` run in parallel) has put a prediction in the shared oof/
    mtime = (run / "fold_2" / "last.pt").stat().st_mtime
    other = json.loads((run / "fold_2" / "split.json").read_text())["train"][0]
    shutil.copy(run / "oof" / f"{held_out[0]}_seg.nii.gz", run / "oof" / f"{other}_seg.nii.gz")
    assert main(["cv", str(path), "--folds", "2", "--quiet", "--no-hd95"]) == 0
    assert (run / "fold_2" / "last.pt").stat().st_mtime == mtime
    summary = json.loads((run / "oof_eval" / "summary.json").read_text())
    assert sorted(summary["cases"]) == sorted(held_out) and other not in (run / "oof_table.md").read_text()
    assert main(["cv", str(path), "--folds", "7", "--quiet"]) == 2
    assert "folds are 0..4" in capsys.readouterr().err


def test_cv_refuses_to_score_untrained_folds(tmp_path, capsys):
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump({"name": "none", "output_dir": str(tmp_path / "run"),
                                    "data_roots": [str(Path(BRATS))]}))
    code = main(["cv", str(path), "--evaluate-only"])
    err = capsys.readouterr().err
    assert code == 2 and ("no trained model" in err or "no labelled cases" in err)
