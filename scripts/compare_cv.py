"""Compare cross-validation runs on the folds they share: one markdown row per run (out-of-fold mean Dice per
region and over regions, worst case, n, training budget actually spent).

    python scripts/compare_cv.py runs/brats_unet25d runs/arch_resunet ... --folds 0 1

Only cases held out in the given folds are scored, and every run must have them, so rows compare like with like.
The training budget comes from each fold's summary.json: CPU seconds of the training process when the run
recorded them (``cpu_minutes`` budgets), wall seconds otherwise (marked "wall").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from neuromap.config import TrainConfig
from neuromap.tasks import get_task
from neuromap.training.crossval import per_case_scores


def _held_out(run: Path, folds: list[int]) -> set[str]:
    return {c for f in folds for c in json.loads((run / f"fold_{f}" / "split.json").read_text())["val"]}


def _budget(run: Path, folds: list[int], cfg: TrainConfig) -> str:
    summaries = [json.loads((run / f"fold_{f}" / "summary.json").read_text()) for f in folds]
    iterations = np.mean([s["epochs_run"] * cfg.iterations_per_epoch for s in summaries])
    if all("cpu_seconds" in s for s in summaries):
        time_text = f"{np.mean([s['cpu_seconds'] for s in summaries]) / 60:.1f} CPU-min"
    else:
        time_text = f"{np.mean([s['wall_seconds'] for s in summaries]) / 60:.1f} wall-min"
    return f"{time_text}, {iterations:.0f} it x {cfg.batch_size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="cross-validation run folders (runs/<name>)")
    parser.add_argument("--folds", nargs="+", type=int, required=True)
    args = parser.parse_args()
    cases = _held_out(args.runs[0], args.folds)
    cfg0 = TrainConfig.model_validate_json((args.runs[0] / f"fold_{args.folds[0]}" / "config.json").read_text())
    regions = get_task(cfg0.task).headline
    print(f"| run | model | {' | '.join(f'Dice {r}' for r in regions)} | mean | worst case mean | n | "
          "training per fold |")
    print("|---|---|" + "---|" * (len(regions) + 4))
    for run in args.runs:
        if _held_out(run, args.folds) != cases:
            raise SystemExit(f"{run}: folds {args.folds} hold out other cases than {args.runs[0]}'s")
        cfg = TrainConfig.model_validate_json((run / f"fold_{args.folds[0]}" / "config.json").read_text())
        scores = per_case_scores(run / "oof_eval" / "metrics.csv", cfg.task)
        missing = cases - scores.keys()
        if missing:
            raise SystemExit(f"{run}: no out-of-fold score for {sorted(missing)}; run `neuromap cv --evaluate-only`")
        rows = [scores[c] for c in sorted(cases)]
        key = "dice_mean" if len(regions) > 1 else f"dice_{regions[0]}"
        means = [np.mean([r[f"dice_{reg}"] for r in rows]) for reg in regions]
        model = f"{cfg.model.name} {cfg.model.spatial_dims}D"
        print(f"| {run.name} | {model} | " + " | ".join(f"{m:.3f}" for m in means)
              + f" | {np.mean([r[key] for r in rows]):.3f} | {min(r[key] for r in rows):.3f} | {len(rows)} | "
              f"{_budget(run, args.folds, cfg)} |")


if __name__ == "__main__":
    main()
