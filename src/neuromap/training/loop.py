"""The training loop: one function for every architecture and both tasks (BraTS, binary LGG).

Callbacks are plain code here (ReduceLROnPlateau, best checkpoint on validation Dice, CSV log, early stopping,
curve PNG, tqdm bar with loss and ETA) because their state must be saved in ``last.pt`` for exact resume.
Multi-process training goes through torchrun + DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from neuromap.checkpoint import ModelSpec, read_checkpoint, save_checkpoint
from neuromap.config import InferenceConfig, TrainConfig
from neuromap.errors import NeuroMapError
from neuromap.inference import predict_probs
from neuromap.io.atomic import atomic_path
from neuromap.io.output_checks import check_writable_folder
from neuromap.tasks import task_of
from neuromap.training.auxiliary import load_auxiliary
from neuromap.training.data import (
    PatchDataset,
    find_training_cases,
    prepare_case,
    split_cases,
    write_split,
)
from neuromap.training.losses import make_loss

LOG_FIELDS = ["epoch", "train_loss", "val_dice_mean", "val_dice_WT", "val_dice_TC", "val_dice_ET", "lr", "seconds"]


@dataclass
class RunResult:
    run_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_dice: float
    epochs_run: int
    stopped: str


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def validate(model: torch.nn.Module, spec: ModelSpec, cases: list, device: torch.device) -> dict[str, float]:
    """Dice per region on whole validation volumes in prepared space, through the segment code path."""
    model.eval()
    scores: dict[str, list[float]] = {}
    for case in cases:
        probs = predict_probs([(model, spec)], case.image, InferenceConfig(), device=device)
        dice = task_of(spec).validation_dice(task_of(spec).labels(probs), case.seg)
        for key, value in dice.items():
            scores.setdefault(key, []).append(value)
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    mean["mean"] = float(np.mean(list(mean.values())))
    return mean


def _plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(epochs, [r["train_loss"] for r in rows])
    ax[0].set(title="training loss", xlabel="epoch", ylabel="loss")
    for key in ("val_dice_mean", "val_dice_WT", "val_dice_TC", "val_dice_ET"):
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) not in ("", None)]
        if pts:
            ax[1].plot(*zip(*pts, strict=True), label=key.replace("val_dice_", ""))
    ax[1].set(title="validation Dice", xlabel="epoch", ylabel="Dice", ylim=(0, 1))
    if ax[1].get_legend_handles_labels()[0]:  # no validation yet after the first epoch
        ax[1].legend()
    fig.tight_layout()
    tmp = path.with_suffix(".part.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> RunResult:
    """Train ``cfg``; with ``resume`` continue from ``last.pt`` in the run folder (same seed, same split)."""
    rank, world, device = _distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)
    run_dir = Path(cfg.output_dir or f"runs/{cfg.name}")
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if resume and not last_path.is_file():
        raise NeuroMapError(f"{last_path}: nothing to resume (no last checkpoint). Fix: start without --resume.")
    if not resume and last_path.exists():
        raise NeuroMapError(f"{run_dir}: a run already exists there. Fix: --resume it, or set another output_dir.")
    check_writable_folder(run_dir, "training run")  # before any data is prepared or any epoch is spent

    cases = find_training_cases(cfg.data_roots)
    split = split_cases([c.case_id for c in cases], cfg.split, cfg.seed)
    by_id = {c.case_id: c for c in cases}
    train_cases = [prepare_case(by_id[i], cfg) for i in split["train"]]
    val_cases = [prepare_case(by_id[i], cfg) for i in split["val"]] if rank == 0 else []
    auxiliary = load_auxiliary(cfg) if cfg.auxiliary else []
    # Data first, folder second: a missing data root, an impossible split or an unusable case leaves no run folder.
    if rank == 0:
        _open_run_folder(run_dir)
        write_split(run_dir / "split.json", split)
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))

    spec = ModelSpec(cfg.model, cfg.preprocess, cfg.task, tuple(cfg.patch_size), cfg.out_channels)
    model = spec.build()
    if cfg.init_checkpoint and not resume:
        spec.info["init_checkpoint"] = _warm_start(model, cfg.init_checkpoint)
    # channels_last: 2D convolutions train 2-4x faster on CPU (oneDNN); measured on the 2D U-Net, 2 threads.
    memory_format = torch.channels_last if cfg.model.spatial_dims == 2 else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optim_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[cfg.optimizer]
    extra = {"momentum": 0.99, "nesterov": True} if cfg.optimizer == "sgd" else {}
    optimizer = optim_cls(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    if cfg.lr_schedule == "poly":  # stepped once per epoch, whatever the validation says
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 - e / cfg.epochs) ** 0.9)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
    loss_fn = make_loss(cfg).to(device)
    amp = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" else (torch.float16 if amp else None)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    state = {"epoch": 0, "best": -1.0, "best_epoch": -1, "bad": 0, "rows": [], "seconds": 0.0, "cpu_seconds": 0.0}
    if resume:
        saved = torch.load(last_path, map_location=device, weights_only=False)
        if saved["split"] != split:
            raise NeuroMapError(f"{last_path}: the saved split differs from this config's split; cannot resume.")
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {"cpu_seconds": 0.0, **saved["state"]}  # runs saved before the CPU budget existed

    dataset = PatchDataset(train_cases, cfg, rank=rank, auxiliary=auxiliary)
    # Workers are re-created every epoch (not persistent) so they see the epoch set on the dataset; samples are
    # seeded by index, so the batches are the same with any number of workers.
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False,
                                         num_workers=cfg.loader_workers)
    started = time.time() - state["seconds"]
    stopped = "epochs"
    for epoch in range(state["epoch"], cfg.epochs):
        t0, cpu0 = time.time(), time.process_time()
        dataset.set_epoch(epoch)
        # Dropout etc. draw from torch's global generator: seed it per epoch so a resumed run repeats exactly.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 101 + rank)
        net.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or rank != 0,
                   leave=False, file=sys.stderr)
        for image, label in bar:
            image, label = image.to(device, memory_format=memory_format), label.to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=amp or cfg.precision == "bf16"):
                logits = net(image)
            loss = loss_fn(logits.float(), label)  # the loss in float32 whatever the network ran in
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"]}
        score = torch.tensor(-1.0)
        state["cpu_seconds"] += time.process_time() - cpu0
        if cfg.lr_schedule == "poly":
            scheduler.step()
            if cfg.cpu_minutes:  # decay over the share of the CPU budget spent, if that is ahead of the epochs
                spent = max(state["cpu_seconds"] / (cfg.cpu_minutes * 60), (epoch + 1) / cfg.epochs)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * max(1 - spent, 0.0) ** 0.9
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            val: dict[str, float] = {}
            if rank == 0 and val_cases:
                val = validate(model, spec, val_cases, device)
                score = torch.tensor(val["mean"])
                row.update({f"val_dice_{k}": v for k, v in val.items()})
            if world > 1:
                dist.broadcast(score, src=0)
            if cfg.lr_schedule == "plateau":
                scheduler.step(float(score))
            # select "last": the newest weights are kept whatever validation says (fixed budget, nnU-Net style)
            if float(score) > state["best"] or cfg.select == "last":
                state.update(best=float(score), best_epoch=epoch + 1, bad=0)
                if rank == 0:
                    # update, not replace: the warm-start record (init_checkpoint) stays in best.pt
                    spec.info.update(best_epoch=epoch + 1, val_dice=dict(val))
                    with _saving(best_path):
                        save_checkpoint(best_path, spec, model.state_dict())
            else:
                state["bad"] += 1
        row["seconds"] = round(time.time() - t0, 2)
        state["rows"].append(row)
        state["epoch"] = epoch + 1
        state["seconds"] = time.time() - started
        if rank == 0:
            with _saving(last_path):  # atomic: a kill or a full disk mid-save keeps the previous last.pt
                with atomic_path(last_path, overwrite=True) as tmp:
                    torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "state": state, "split": split}, tmp)
                _write_log(run_dir / "log.csv", state["rows"])
                _plot_curves(state["rows"], run_dir / "curves.png")
            val_text = f" val Dice {row.get('val_dice_mean', float('nan')):.3f}" if "val_dice_mean" in row else ""
            print(f"epoch {epoch + 1}/{cfg.epochs} loss {row['train_loss']:.4f}{val_text} "
                  f"({row['seconds']:.0f}s, best {state['best']:.3f} @ {state['best_epoch']})", file=sys.stderr)
        if cfg.select == "best" and state["bad"] >= cfg.early_stopping_patience:
            stopped = "early stopping"
            break
        if cfg.max_minutes and state["seconds"] > cfg.max_minutes * 60:
            stopped = "time limit"
            break
        if cfg.cpu_minutes and state["cpu_seconds"] >= cfg.cpu_minutes * 60:
            stopped = "CPU budget"
            break
    if rank == 0 and cfg.select == "last" and state["best_epoch"] != state["epoch"]:
        # A run ended by its CPU or time budget, before a validation epoch: its last weights are the model.
        state.update(best_epoch=state["epoch"])
        spec.info.update(best_epoch=state["epoch"], val_dice={})
        with _saving(best_path):
            save_checkpoint(best_path, spec, model.state_dict())
    if rank == 0:
        summary = {
            "name": cfg.name, "stopped": stopped, "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
            "best_val_dice_mean": state["best"], "wall_seconds": round(state["seconds"], 1),
            "cpu_seconds": round(state["cpu_seconds"], 1), "hardware": hardware(),
            "world_size": world, "split": {k: len(v) for k, v in split.items()}, "seed": cfg.seed,
            "auxiliary": [c.case_id for c in auxiliary],
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return RunResult(run_dir, best_path, state["best_epoch"], state["best"], state["epoch"], stopped)


def _open_run_folder(run_dir: Path) -> None:
    """Create the run folder (its writability was checked before the data was read, `check_writable_folder`) and
    clear temporary checkpoint files a killed run left behind (``atomic_path`` names them ``.<name>.*.part*``)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".*.pt.*.part*"):
            stale.unlink()
    except OSError as exc:
        raise NeuroMapError(f"{run_dir}: the run folder cannot be written ({exc.strerror or exc}). Fix: choose a "
                            "writable output_dir (--output-dir) or fix the folder's permissions.") from None


@contextlib.contextmanager
def _saving(path: Path) -> Iterator[None]:
    """Turn a failed write of a checkpoint or the run's log (disk full, file too large, permissions) into a
    message that says which checkpoint is intact; a half-written checkpoint is already gone (``atomic_path``)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports write failures as RuntimeError
        kept = f"the last good checkpoint is {path}" if path.exists() else f"there is no {path.name} yet"
        raise NeuroMapError(f"{path.parent}: could not write the run's files ({exc}); {kept}. Fix: free disk "
                            "space or fix the folder, then continue with --resume (or start again without "
                            "last.pt).") from None


def _warm_start(model: torch.nn.Module, path: str) -> dict:
    """Copy weights whose name and shape match (e.g. all but the first/last layer when channels differ)."""
    source = read_checkpoint(path)["state_dict"]
    target = model.state_dict()
    matched = {k: v.float() if v.is_floating_point() else v for k, v in source.items()
               if k in target and target[k].shape == v.shape}
    if not matched:
        raise NeuroMapError(f"{path}: no weights match this architecture; init_checkpoint must be the same model.")
    model.load_state_dict(matched, strict=False)
    return {"path": str(path), "tensors_loaded": len(matched), "tensors_total": len(target)}


def _write_log(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".part")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
