"""Fit and validate the per-case quality score (issue 15) on the out-of-fold predictions of a cross-validation.

Every segmentation records its quality signals in the report (`neuromap.quality`), so ``neuromap cv`` leaves what
this script needs: ``RUN/oof/<case>_report.json`` (signals of each held-out case, measured with the model of the
fold that never saw it), ``RUN/oof_eval/metrics.csv`` (the true Dice of the same predictions) and
``RUN/fold_k/`` (split, config, checkpoint). The script adds the intensity profiles of the cases (loading and
preparing them, no model), then:

1. measures each held-out case's intensity distance against its own fold's training cases, as the product does
   against the shipped model's training cases;
2. fits the score, a least-squares line from the signals in ``FEATURES`` to the case's mean region Dice (with 22
   cases, one or two parameters besides the intercept; a line is monotone and cannot bend to single cases);
3. validates it by leave-one-out: each case is scored by a line fitted without it, and the input-check thresholds
   are set without it too; reports the Spearman correlation of those scores with true Dice, and how many of the
   poor cases (mean Dice < ``POOR``) the flag catches against how many good cases it flags;
4. writes the calibration JSON the product loads (coefficients fitted on all cases, the training cases' reference
   statistics and thresholds, the validation numbers) and prints the tables for the experiments page.

    neuromap cv configs/arch/resunet.yaml --evaluate-only --no-hd95     # (re)segments the held-out cases
    python scripts/fit_quality.py runs/arch_resunet -o src/neuromap/weights/quality_brats_resunet25d.json

``--evaluate-only`` rewrites ``RUN/oof/``; to keep a run's own outputs, give ``--output-dir`` a new folder whose
``fold_k`` are links to the run's (docs/experiments/quality_score.md does).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from neuromap.checkpoint import ModelSpec, read_checkpoint
from neuromap.config import TrainConfig
from neuromap.io.atomic import write_bytes_atomic
from neuromap.preprocess import prepare
from neuromap.quality import (
    best_renaming,
    intensity_distance,
    intensity_profile,
    recipe_key,
    renamed,
    review_reasons,
)
from neuromap.training.data import find_training_cases

FEATURES = ("flip_dice",)
CANDIDATES = ("flip_dice", "tumour_entropy", "uncertain_ratio", "core_fraction", "core_largest_share", "tumour_ml",
              "intensity_distance", "swap_margin")
POOR = 0.7  # a case with mean region Dice below this is one a user should have checked
FLAG_BELOW = 0.75
# The input checks fire above this multiple of the largest intensity distance of a held-out case, below this share
# of the smallest brain extent, and outside this range of voxel sizes (shares of the smallest and largest).
DISTANCE_MARGIN = 1.5
EXTENT_MARGIN = 0.8
SPACING_MARGINS = (0.8, 1.25)
# The swap check fires when renaming the files fits the training sequences better by more than this (summed squared
# z). Chosen by looking at these same cases (clean held-out cases reach about 7), so its 0 false alarms are
# optimistic; docs/experiments/quality_score.md.
SWAP_MARGIN = 10.0
SWAPS = {"t1<->t1ce": {"t1": "t1ce", "t1ce": "t1"}, "t2<->flair": {"t2": "flair", "flair": "t2"},
         "t1<->t2": {"t1": "t2", "t2": "t1"}, "t1ce<->flair": {"t1ce": "flair", "flair": "t1ce"},
         "t1<->flair": {"t1": "flair", "flair": "t1"}, "t1ce<->t2": {"t1ce": "t2", "t2": "t1ce"},
         "t1<->t2 and t1ce<->flair": {"t1": "t2", "t2": "t1", "t1ce": "flair", "flair": "t1ce"}}


def folds_of(run: Path) -> list[Path]:
    folds = sorted(run.glob("fold_*"))
    if not folds:
        raise SystemExit(f"{run}: no fold_k folders; run `neuromap cv CONFIG` first.")
    return folds


def true_dice(metrics_csv: Path) -> tuple[dict[str, float], tuple[str, ...]]:
    """Mean region Dice per case from ``neuromap evaluate``'s metrics.csv, and the regions averaged: every row of
    kind "region" (WT, TC, ET for BraTS; the abnormality for a binary task), so the target is the task's own."""
    per_case: dict[str, dict[str, float]] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["kind"] == "region":
                per_case.setdefault(row["case_id"], {})[row["structure"]] = float(row["dice"])
    regions = tuple(max(per_case.values(), key=len)) if per_case else ()
    return {case: float(np.mean(list(v.values()))) for case, v in per_case.items() if len(v) == len(regions)}, regions


def reference_of(profiles: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = profiles[0]
    return {"mean": {k: float(np.mean([p[k] for p in profiles])) for k in keys},
            "std": {k: float(np.std([p[k] for p in profiles], ddof=1)) for k in keys}}


def input_thresholds(signals: list[dict]) -> dict:
    """The input checks' thresholds (`neuromap.quality.input_checks`) from the held-out cases' signals."""
    extents = np.array([s["brain_extent_mm"] for s in signals])
    # Slice folders (LGG kaggle_3m) store no voxel size: then there is nothing to check a voxel size against.
    spacings = None if any(s["spacing_mm"] is None for s in signals) else np.array([s["spacing_mm"] for s in signals])
    return {
        "intensity_distance_max": round(DISTANCE_MARGIN * max(s["intensity_distance"] for s in signals), 3),
        "swap_margin_max": SWAP_MARGIN,
        "spacing_mm_allowed": None if spacings is None else [round(SPACING_MARGINS[0] * float(spacings.min()), 3),
                                                             round(SPACING_MARGINS[1] * float(spacings.max()), 3)],
        "brain_extent_min_mm": [round(EXTENT_MARGIN * float(v), 1) for v in extents.min(axis=0)],
    }


def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, list[float]]:
    design = np.column_stack([np.ones(len(x)), x])
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    return float(solution[0]), [float(c) for c in solution[1:]]


def predict_line(intercept: float, coef: list[float], x: np.ndarray) -> np.ndarray:
    return np.clip(intercept + x @ np.asarray(coef), 0.0, 1.0)


def loo_scores(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each case's score from the line fitted on all other cases."""
    out = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        out[i] = predict_line(*fit_line(x[keep], y[keep]), x[i:i + 1])[0]
    return out


def bootstrap_interval(a: np.ndarray, b: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of Spearman(a, b) over cases: how much 22 cases pin the number down."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, len(a), len(a))
        if len(np.unique(b[pick])) > 2:
            values.append(spearmanr(a[pick], b[pick]).statistic)
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return float(low), float(high)


def exploratory(table: dict[str, np.ndarray], y: np.ndarray) -> dict[str, float]:
    """Leave-one-out Spearman of other lines (each signal alone, and each beside flip_dice), printed for the record
    and not shipped: picking the best of them on these 22 cases would make its number optimistic."""
    usable = [k for k, v in table.items() if not np.isnan(v).any()]
    models = [(k,) for k in usable] + [("flip_dice", k) for k in usable if k != "flip_dice"]
    return {" + ".join(m): float(spearmanr(loo_scores(np.column_stack([table[k] for k in m]), y), y).statistic)
            for m in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a `neuromap cv` run folder (fold_k/, oof/, oof_eval/)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="calibration JSON to write")
    args = parser.parse_args()
    started, cpu_started = time.perf_counter(), time.process_time()
    folds = folds_of(args.run)
    cfg = TrainConfig.model_validate(json.loads((folds[0] / "config.json").read_text()))
    specs = [ModelSpec.from_dict(read_checkpoint(f / "best.pt")["spec"]) for f in folds]
    recipes = {recipe_key(s) for s in specs}
    if len(recipes) != 1:
        raise SystemExit(f"{args.run}: the folds' checkpoints are of different recipes {sorted(recipes)}.")
    spec = specs[0]
    splits = {f.name: json.loads((f / "split.json").read_text()) for f in folds}
    fold_of = {case: name for name, split in splits.items() for case in split["val"]}
    dice, regions = true_dice(args.run / "oof_eval" / "metrics.csv")
    cases = {c.case_id: c for c in find_training_cases(cfg.data_roots)}
    ids = sorted(fold_of)
    missing = [c for c in ids if c not in dice or not (args.run / "oof" / f"{c}_report.json").is_file()]
    if missing:
        raise SystemExit(f"{args.run}: no out-of-fold report or Dice for {missing}; run `neuromap cv` again.")

    signals = {c: json.loads((args.run / "oof" / f"{c}_report.json").read_text())["quality"]["signals"]
               for c in ids}
    profiles = {}
    for case_id in cases:
        volume = cases[case_id].layout.load(cases[case_id], spec.modalities, with_seg=False)
        profiles[case_id] = intensity_profile(prepare(volume, spec.preprocess).image, spec.modalities)
    # Each held-out case against its own fold's training cases, as the product compares a new case with the
    # shipped model's training cases; and the same case with its files deliberately swapped.
    swaps = {name: swap for name, swap in SWAPS.items() if set(swap) <= set(spec.modalities)}
    swap_caught = dict.fromkeys(swaps, 0)
    for case_id in ids:
        reference = reference_of([profiles[c] for c in splits[fold_of[case_id]]["train"]])
        signals[case_id]["intensity_distance"] = intensity_distance(profiles[case_id], reference)
        signals[case_id]["swap_margin"], signals[case_id]["looks_like"] = best_renaming(
            profiles[case_id], reference, spec.modalities)
        for name, swap in swaps.items():
            naming = {m: swap.get(m, m) for m in spec.modalities}
            swap_caught[name] += best_renaming(renamed(profiles[case_id], naming, spec.modalities), reference,
                                               spec.modalities)[0] > SWAP_MARGIN

    y = np.array([dice[c] for c in ids])
    table_signals = {name: np.array([np.nan if signals[c].get(name) is None else signals[c][name] for c in ids])
                     for name in CANDIDATES}
    x = np.column_stack([table_signals[f] for f in FEATURES])
    if np.isnan(x).any():
        raise SystemExit(f"cases without a value of {FEATURES} (no tumour found?): "
                         f"{[c for c, row in zip(ids, x, strict=True) if np.isnan(row).any()]}")
    loo = loo_scores(x, y)
    # The product's own verdict, with every threshold set without the case (the swap margin is a constant).
    flagged, why = [], []
    for i, c in enumerate(ids):
        reasons = review_reasons(signals[c], loo[i], input_thresholds([signals[o] for o in ids if o != c]),
                                 FLAG_BELOW)
        flagged.append(bool(reasons))
        why.append("; ".join(r.split(":")[0] for r in reasons))
    flagged = np.array(flagged)
    poor = y < POOR
    rho = float(spearmanr(loo, y).statistic)
    intercept, coef = fit_line(x, y)
    in_sample = float(spearmanr(predict_line(intercept, coef, x), y).statistic)
    per_signal = {name: float(spearmanr(v, y, nan_policy="omit").statistic) for name, v in table_signals.items()}
    validation = {
        "n": len(ids), "loo_spearman": round(rho, 3),
        "loo_spearman_95ci": [round(v, 3) for v in bootstrap_interval(loo, y)],
        "in_sample_spearman": round(in_sample, 3),
        "poor_below": POOR, "poor_cases": int(poor.sum()), "poor_flagged": int((flagged & poor).sum()),
        "good_cases": int((~poor).sum()), "good_flagged": int((flagged & ~poor).sum()),
        "loo_mean_abs_error": round(float(np.mean(np.abs(loo - y))), 3),
        "signal_spearman": {k: round(v, 3) for k, v in per_signal.items()},
        "swapped_files_caught": {k: int(v) for k, v in swap_caught.items()},
        "exploratory_loo_spearman": {k: round(v, 3) for k, v in exploratory(table_signals, y).items()},
    }
    calibration = {
        "recipe": next(iter(recipes)),
        "recipe_name": cfg.name,
        "fitted_on": f"out-of-fold predictions of {cfg.name} ({len(folds)} folds, {len(ids)} cases)",
        "docs": "docs/experiments/quality_score.md",
        "command": f"python scripts/fit_quality.py {args.run} -o {args.output}",
        "model": {"kind": "linear, clipped to [0, 1]", "target": f"mean region Dice ({', '.join(regions)})",
                  "features": list(FEATURES), "intercept": round(intercept, 5), "coef": [round(c, 5) for c in coef]},
        "flag_below": FLAG_BELOW,
        "reference": {"intensity": reference_of(list(profiles.values())),
                      **input_thresholds([signals[c] for c in ids])},
        "validation": validation,
    }
    write_bytes_atomic(args.output, (json.dumps(calibration, indent=1) + "\n").encode(), overwrite=True)

    print(f"n = {len(ids)} held-out cases ({len(folds)} folds); features {list(FEATURES)}: "
          f"Dice ~ {intercept:.3f} + {' + '.join(f'{c:.3f} x {f}' for c, f in zip(coef, FEATURES, strict=True))}")
    low, high = validation["loo_spearman_95ci"]
    print(f"leave-one-out Spearman(score, true mean Dice) = {rho:.3f} (bootstrap 95% {low:.2f} to {high:.2f}; "
          f"in sample {in_sample:.3f}); "
          f"mean |score - Dice| = {validation['loo_mean_abs_error']:.3f}")
    print(f"flag (LOO): poor cases (Dice < {POOR}) caught {validation['poor_flagged']}/{validation['poor_cases']}, "
          f"good cases flagged {validation['good_flagged']}/{validation['good_cases']}")
    print("Spearman of each signal with true Dice: "
          + ", ".join(f"{k} {v:+.2f}" for k, v in per_signal.items()))
    print("exploratory, not shipped: LOO Spearman of other lines: "
          + ", ".join(f"{k} {v:+.2f}" for k, v in validation["exploratory_loo_spearman"].items()))
    margins, distances = table_signals["swap_margin"], table_signals["intensity_distance"]
    print(f"intensity check: held-out distances {distances.min():.2f}-{distances.max():.2f}, fires above "
          f"{calibration['reference']['intensity_distance_max']:.2f}; swap check: held-out margins "
          f"{margins.min():.1f} to {margins.max():.1f}, fires above {SWAP_MARGIN:g}, clean cases flagged "
          f"{int(np.sum(margins > SWAP_MARGIN))}/{len(ids)}; the same cases with files swapped, caught: "
          + ", ".join(f"{k} {v}/{len(ids)}" for k, v in swap_caught.items()))
    print("\n| case | fold | true mean Dice | LOO score | flag | why | " + " | ".join(CANDIDATES) + " |")
    print("|" + "---|" * (6 + len(CANDIDATES)))
    for i in np.argsort(y):
        c = ids[i]
        print(f"| {c} | {fold_of[c].removeprefix('fold_')} | {y[i]:.3f} | {loo[i]:.3f} | "
              f"{'review' if flagged[i] else 'ok'} | {why[i]} | "
              + " | ".join(f"{table_signals[k][i]:.3f}" for k in CANDIDATES) + " |")
    print(f"\nwall {time.perf_counter() - started:.0f} s, CPU {time.process_time() - cpu_started:.0f} s; "
          f"wrote {args.output}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
