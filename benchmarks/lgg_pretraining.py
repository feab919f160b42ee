"""Does pretraining on the LGG FLAIR slices improve the whole-tumour Dice of BraTS models on their validation cases?

(a) Pretrain a FLAIR-only binary 2D U-Net on the LGG kaggle_3m patients (configs/lgg_unet2d.yaml, FLAIR only).
(b) Train a FLAIR-only binary (whole tumour) BraTS 2D U-Net (configs/brats_unet2d.yaml with task binary) twice,
    with the same architecture, budget, seed and patient split: from scratch, and from the LGG model
    (``init_checkpoint``: every tensor matches, as both models have one input and two output channels;
    results.json records how many were loaded). Both start from the same seeded initialisation, so the
    pretrained weights are the only difference.
(c) Segment the BraTS validation cases with both best checkpoints, score them with `neuromap.evaluate` (task
    binary: any nonzero BraTS label is whole tumour), and print and write ``results.json``: the best validation
    WT Dice of each run (as training logs it, in the preprocessed space) and the per-case Dice in the input grid.

Only the public API is used (`neuromap.train` with dict configs, `neuromap.segment`, `neuromap.evaluate`), so this
is the same code the command line runs. Not run by the tests. The budget per run is wall time (``--minutes``)
unless ``--epochs`` caps it first; both BraTS runs get the same caps, and results.json records how many epochs
each completed, because on a shared machine equal minutes need not mean equal updates: for a strict
comparison give an ``--epochs`` cap that both reach within ``--minutes``. With about 4 validation cases and
one seed the answer is an indication, not a significance test.

    python benchmarks/lgg_pretraining.py --minutes 20 [--epochs N] [--iterations N] [--out DIR] [--threads 2]
    python benchmarks/lgg_pretraining.py --minutes 0.5 --epochs 1 --iterations 2 --out /tmp/pretrain_smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def base_config(name: str, data_root: Path, args: argparse.Namespace) -> dict:
    """A repository config made FLAIR-only and binary, with this experiment's budget, seed and output folder."""
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    cfg["preprocess"]["modalities"] = ["flair"]
    cfg.update(task="binary", data_roots=[str(data_root)], seed=args.seed, max_minutes=args.minutes,
               threads=args.threads, output_dir=str(args.out / name))
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    if args.iterations is not None:
        cfg["iterations_per_epoch"] = args.iterations
    return cfg


def per_case_dice(metrics_csv: Path) -> dict[str, float]:
    with open(metrics_csv, newline="") as handle:
        return {row["case_id"]: float(row["dice"]) for row in csv.DictReader(handle)}


def score_validation_cases(checkpoint: Path, val_cases: list[Path], out: Path) -> dict[str, float]:
    """Segment the validation cases with ``checkpoint`` and score them against their ground truth."""
    import neuromap

    truth = out / "ground_truth"  # links to the validation cases only: nothing copied, no other case scored
    truth.mkdir(parents=True, exist_ok=True)
    for case in val_cases:
        link = truth / case.name
        if not link.exists():
            link.symlink_to(case.resolve(), target_is_directory=True)
    neuromap.segment([str(c) for c in val_cases], out / "predictions", model=str(checkpoint))
    neuromap.evaluate(out / "predictions", truth, out / "evaluation", task="binary")
    return per_case_dice(out / "evaluation" / "metrics.csv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="wall-time budget of each of the three runs")
    parser.add_argument("--epochs", type=int, help="epoch cap of each run (default: the configs' epochs)")
    parser.add_argument("--iterations", type=int, help="iterations per epoch (default: the configs' value)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lgg", type=Path, default=DATA / "lgg_kaggle_3m")
    parser.add_argument("--brats", type=Path, default=DATA / "brats2018")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lgg_pretraining")
    args = parser.parse_args(argv)

    import neuromap
    from neuromap.checkpoint import read_checkpoint

    lgg_cfg = base_config("lgg_unet2d", args.lgg, args)
    brats_cfg = base_config("brats_unet2d", args.brats, args)
    brats_cfg["model"] = lgg_cfg["model"]  # one architecture, so every pretrained tensor can be loaded

    print(f"(a) pretraining on LGG FLAIR slices ({args.minutes} min)", file=sys.stderr)
    lgg = neuromap.train(lgg_cfg, progress=False)
    runs = {}
    for variant, init in (("scratch", None), ("pretrained", str(lgg.best_checkpoint))):
        cfg = {**brats_cfg, "name": f"brats_flair_wt_{variant}", "init_checkpoint": init,
               "output_dir": str(args.out / f"brats_{variant}")}
        print(f"(b) BraTS FLAIR whole tumour, {variant} ({args.minutes} min)", file=sys.stderr)
        runs[variant] = neuromap.train(cfg, progress=False)

    # Both BraTS runs share data, seed and split config, hence the same validation cases.
    val_ids = json.loads((runs["scratch"].run_dir / "split.json").read_text())["val"]
    val_cases = [args.brats / case_id for case_id in val_ids]
    results = {
        "question": "Does LGG FLAIR pretraining improve the whole-tumour Dice of a FLAIR-only BraTS 2D U-Net?",
        "budget_per_run": {"minutes": args.minutes, "epochs": brats_cfg["epochs"],
                           "iterations_per_epoch": brats_cfg["iterations_per_epoch"], "seed": args.seed},
        "lgg_pretraining": {"best_val_dice": lgg.best_dice, "best_epoch": lgg.best_epoch, "epochs_run": lgg.epochs_run,
                            "checkpoint": str(lgg.best_checkpoint)},
        "validation_cases": val_ids,
    }
    for variant, run in runs.items():
        print(f"(c) scoring the {len(val_cases)} validation cases, {variant}", file=sys.stderr)
        dice = score_validation_cases(run.best_checkpoint, val_cases, args.out / f"eval_{variant}")
        results[f"brats_{variant}"] = {
            "best_val_dice_WT": run.best_dice, "best_epoch": run.best_epoch, "epochs_run": run.epochs_run,
            "stopped": run.stopped, "checkpoint": str(run.best_checkpoint),
            "warm_start": read_checkpoint(run.best_checkpoint)["spec"]["info"].get("init_checkpoint"),
            "per_case_dice_WT": dice, "mean_dice_WT": statistics.fmean(dice.values()),
        }
    results["pretrained_minus_scratch"] = {
        "best_val_dice_WT": runs["pretrained"].best_dice - runs["scratch"].best_dice,
        "mean_dice_WT": results["brats_pretrained"]["mean_dice_WT"] - results["brats_scratch"]["mean_dice_WT"],
    }
    results["note"] = (f"{len(val_cases)} validation cases and one seed: a difference smaller than the spread of the "
                       "per-case Dice is not evidence either way. best_val_dice_WT is measured in the preprocessed "
                       "128x128 space during training; per_case_dice_WT in the input grid.")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
