"""Training: config validation, patient-level splits, a real loss decrease, kill -9 resume, DDP on gloo."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import BRATS, needs_real_data

from neuromap.config import SplitConfig, TrainConfig, load_yaml
from neuromap.errors import NeuroMapError
from neuromap.synthetic import write_synthetic_case
from neuromap.training.data import split_cases

TINY = {
    "name": "tiny",
    "preprocess": {"mode": "2d", "slice_size": [32, 32]},
    "model": {"name": "unet2d", "spatial_dims": 2, "options": {"features": [4, 4, 8, 8, 16, 4]}},
    "patch_size": [32, 32], "batch_size": 2, "epochs": 6, "iterations_per_epoch": 3, "val_every": 1,
    "split": {"ratios": [0.6, 0.4]}, "seed": 3, "threads": 1, "early_stopping_patience": 50,
}


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    for i in range(4):
        write_synthetic_case(tmp_path / "data" / f"S{i}", f"S{i}", shape=(32, 32, 12), seed=i)
    cfg = {**TINY, "data_roots": [str(tmp_path / "data")], "output_dir": str(tmp_path / "run")}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"loss": "hinge"}, "loss"),
        ({"batch_size": 0}, "batch_size"),
        ({"patch_size": [32, 32, 32]}, "patch_size"),
        ({"model": {"name": "unet2d", "spatial_dims": 3}}, "spatial_dims"),
        ({"split": {"ratios": [0.5, 0.2]}}, "ratios"),
        ({"class_weights": [1, 2]}, "class_weights"),
        ({"learning_rate": 0.1}, "learning_rate"),
    ],
)
def test_config_errors_name_the_field(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, **change}))
    with pytest.raises(NeuroMapError, match=message) as info:
        load_yaml(path, TrainConfig)
    assert str(path) in str(info.value)


def test_example_configs_are_valid():
    configs = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        load_yaml(path, TrainConfig)


def test_config_base_merges_nested_fields_and_replaces_model_options(tmp_path):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(
        {**TINY, "model": {"name": "unet2d", "spatial_dims": 2, "out": "regions", "options": {"features": [8] * 6}},
         "augment": {"flip": False, "gamma": [0.8, 1.2]}}))
    (tmp_path / "variant.yaml").write_text(yaml.safe_dump(
        {"base": "recipe.yaml", "name": "variant", "model": {"name": "attention_unet"}, "augment": {"flip": True}}))
    cfg = load_yaml(tmp_path / "variant.yaml", TrainConfig)
    assert cfg.name == "variant"
    assert (cfg.model.name, cfg.model.out, cfg.model.options) == ("attention_unet", "regions", {})
    assert cfg.augment.flip and cfg.augment.gamma == (0.8, 1.2)


def test_config_base_loop_and_empty_file_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\n")
    with pytest.raises(NeuroMapError, match="loops back"):
        load_yaml(tmp_path / "a.yaml", TrainConfig)
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(NeuroMapError, match="empty"):
        load_yaml(tmp_path / "empty.yaml", TrainConfig)


def test_splits_are_patient_level_and_deterministic():
    ids = [f"P{i:02d}" for i in range(15)]
    split = split_cases(ids, SplitConfig(), seed=0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [9, 4, 2]
    assert sorted(sum(split.values(), [])) == ids
    assert split == split_cases(list(reversed(ids)), SplitConfig(), seed=0)
    assert split != split_cases(ids, SplitConfig(), seed=1)
    assert [len(split_cases(ids, SplitConfig(ratios=(0.8, 0.2)), 0)[k]) for k in ("train", "val")] == [12, 3]
    folds = [split_cases(ids, SplitConfig(mode="kfold", folds=5, fold=f), 0)["val"] for f in range(5)]
    assert sorted(sum(folds, [])) == ids


@needs_real_data
def test_loss_decreases_on_a_real_crop():
    from neuromap.checkpoint import ModelSpec
    from neuromap.io import discover_cases, load_case
    from neuromap.preprocess import prepare
    from neuromap.training.losses import make_loss

    cfg = TrainConfig.model_validate({
        **TINY, "preprocess": {"mode": "3d", "spacing": [2, 2, 2]}, "patch_size": [32, 32, 32],
        "model": {"name": "segresnet", "spatial_dims": 3, "options": {"init_filters": 8}},
    })
    prepared = prepare(load_case(discover_cases(BRATS / "Brats18_2013_2_1")[0]), cfg.preprocess)
    centre = np.argwhere(prepared.seg > 0).mean(0).astype(int)
    crop = tuple(slice(c - 16, c + 16) for c in centre)
    image = torch.as_tensor(prepared.image[(slice(None),) + crop])[None]
    label = torch.as_tensor(prepared.seg[crop].astype(np.int64))[None, None]
    torch.manual_seed(0)
    model = ModelSpec(cfg.model, cfg.preprocess, "brats", (32, 32, 32), 4).build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = make_loss(cfg)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.85 * losses[0], losses


@pytest.mark.parametrize("loss", ["ce", "dice", "dice_bce", "tversky_ce", "weighted_dice", "focal"])
@pytest.mark.parametrize("out", ["classes", "regions"])
def test_every_loss_runs_for_both_output_types(loss, out):
    from neuromap.training.losses import make_loss

    cfg = TrainConfig.model_validate({**TINY, "loss": loss, "model": {**TINY["model"], "out": out}})
    logits = torch.randn(2, cfg.out_channels, 8, 8, requires_grad=True)
    value = make_loss(cfg)(logits, torch.randint(0, 4, (2, 1, 8, 8)))
    value.backward()
    assert torch.isfinite(value) and logits.grad is not None


def _train_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "neuromap", "train", str(config), "--quiet", *extra]


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_train_writes_run_folder(tiny_config):
    proc = subprocess.run(_train_cmd(tiny_config), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = tiny_config.parent / "run"
    for name in ("best.pt", "last.pt", "log.csv", "curves.png", "split.json", "summary.json", "config.json"):
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 2 and len(split["val"]) == 2 and not set(split["train"]) & set(split["val"])
    assert len((run / "log.csv").read_text().splitlines()) == 1 + TINY["epochs"]
    again = subprocess.run(_train_cmd(tiny_config), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_cpu_budget_stops_the_run_and_decays_the_poly_rate(tiny_config, tmp_path):
    from neuromap.training.loop import train

    cfg = load_yaml(tiny_config, TrainConfig).model_copy(update={
        "cpu_minutes": 1e-4, "lr_schedule": "poly", "epochs": 50, "val_every": 50, "select": "last",
        "output_dir": str(tmp_path / "budget")})
    result = train(cfg, progress=False)
    summary = json.loads((tmp_path / "budget" / "summary.json").read_text())
    assert result.stopped == "CPU budget" and result.epochs_run < 50
    assert summary["cpu_seconds"] >= 60 * 1e-4
    rows = (tmp_path / "budget" / "log.csv").read_text().splitlines()
    assert float(rows[1].split(",")[-2]) == cfg.lr  # the first epoch trains at the full rate
    best, last = _weights(tmp_path / "budget" / "best.pt"), _weights(tmp_path / "budget" / "last.pt")
    assert all(torch.equal(best[k], last[k].to(best[k].dtype)) for k in best)  # select "last": the final weights


def test_resume_after_kills_at_random_moments_matches_uninterrupted_run(tiny_config, tmp_path):
    """kill -9 at seeded random moments (mid-epoch, mid-save, between epochs), resume each time: the final
    weights equal an uninterrupted run's, and no temporary checkpoint file is left behind."""
    reference = subprocess.run(_train_cmd(tiny_config, "--output-dir", str(tmp_path / "ref")), capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    run, rng, kills = tmp_path / "killed", random.Random(7), 0
    for _attempt in range(3):
        resume = ["--resume"] if (run / "last.pt").is_file() else []
        proc = subprocess.Popen(_train_cmd(tiny_config, "--output-dir", str(run), *resume), stderr=subprocess.DEVNULL)
        start_rows = _log_rows(run)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and _log_rows(run) <= start_rows:
            time.sleep(0.01)  # wait until this process has finished one epoch of its own, then a random moment
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the run finished before it could be killed twice"
    resumed = subprocess.run(_train_cmd(tiny_config, "--output-dir", str(run), "--resume"), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final, expected = _weights(run / "last.pt"), _weights(tmp_path / "ref" / "last.pt")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == TINY["epochs"]
    assert not [p.name for p in run.iterdir() if ".part" in p.name]


def _log_rows(run: Path) -> int:
    log = run / "log.csv"
    return len(log.read_text().splitlines()) if log.is_file() else 0


def test_unwritable_run_folder_and_missing_data_are_refused_before_work(tiny_config, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the run folder's parent should be")
    proc = subprocess.run(_train_cmd(tiny_config, "--output-dir", str(blocker / "run")), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "cannot be written" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "missing_root.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "data_roots": [str(tmp_path / "nowhere")]}))
    proc = subprocess.run(_train_cmd(bad, "--output-dir", str(tmp_path / "never")), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


def test_write_failure_mid_run_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    """A real write failure (RLIMIT_FSIZE: the kernel refuses to grow a file, as with a full disk) while saving
    epoch 3 gives a clear message; last.pt still holds epoch 2 and no partial file remains."""
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**yaml.safe_load(tiny_config.read_text()), "epochs": 2}))
    run = tmp_path / "run"
    first = subprocess.run(_train_cmd(two, "--output-dir", str(run)), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = (run / "last.pt").read_bytes()
    limit = len(before) // 2  # small files (config, split) still fit; no checkpoint does

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(_train_cmd(tiny_config, "--output-dir", str(run), "--resume"), capture_output=True,
                          text=True, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr
    assert "could not write the run's files" in proc.stderr and "Traceback" not in proc.stderr
    assert "last good checkpoint" in proc.stderr
    assert (run / "last.pt").read_bytes() == before
    assert torch.load(run / "last.pt", weights_only=False)["state"]["epoch"] == 2
    assert not [p.name for p in run.iterdir() if ".part" in p.name]


def test_ddp_two_processes_on_gloo(tiny_config, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "--module", "neuromap", "train", str(tiny_config), "--quiet", "--output-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == TINY["epochs"]
    assert (tmp_path / "ddp" / "best.pt").is_file()


def test_tversky_ce_costs_misses_more_than_dice_does():
    """beta 0.7: against a prediction with false positives, one with misses loses more than under Dice + CE."""
    from neuromap.training.losses import make_loss

    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[..., 2:6, 2:6] = 2  # 16 pixels of edema: WT only
    missed, extra = (torch.full((1, 3, 8, 8), -20.0) for _ in range(2))
    missed[:, 0, 2:4, 2:6] = 20.0  # 8 of the 16 found
    extra[:, 0, 2:8, 2:6] = 20.0  # all 16 found plus 8 false positives
    gaps = {}
    for name in ("tversky_ce", "dice_bce"):
        loss = make_loss(_region_config(name))
        gaps[name] = float(loss(missed, target) - loss(extra, target))
    # WT channel of 3: Tversky 0.41 vs 0.13, Dice 0.33 vs 0.20, so the gaps differ by about (0.28 - 0.13) / 3
    assert gaps["tversky_ce"] > gaps["dice_bce"] + 0.03, gaps


def test_dice_bce_penalises_false_positives_on_background_where_dice_ce_does_not():
    """MONAI's DiceCELoss on region outputs: softmax CE across WT/TC/ET is 0 where all three targets are 0."""
    from neuromap.training.losses import make_loss

    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[..., 2:6, 2:6] = 2
    clean, noisy = (torch.full((1, 3, 8, 8), -4.0) for _ in range(2))
    clean[:, 0, 2:6, 2:6] = noisy[:, 0, 2:6, 2:6] = 4.0
    noisy[:, :, 0, :] = 4.0  # one row of background called tumour in all three regions
    cost = {}
    for name in ("dice_ce", "dice_bce"):
        loss = make_loss(_region_config(name))
        ce = loss.loss.ce  # the cross-entropy term alone (MONAI's method, or ours)
        cost[name] = float(ce(noisy, _regions(target)) - ce(clean, _regions(target)))
    assert cost["dice_ce"] == pytest.approx(0.0, abs=1e-6) and cost["dice_bce"] > 0.1, cost


def _region_config(loss: str) -> TrainConfig:
    return TrainConfig.model_validate({**TINY, "loss": loss, "model": {**TINY["model"], "out": "regions"}})


def _regions(target: torch.Tensor) -> torch.Tensor:
    from neuromap.training.losses import region_targets

    return region_targets(target)
