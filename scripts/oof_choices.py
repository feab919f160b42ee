"""Re-choose inference decisions of a cross-validated recipe on its out-of-fold predictions (issue 16).

For every held-out case of the given folds of ``RUN`` (``neuromap cv``), the fold's model predicts probabilities
once; each candidate decision is then scored against the case's expert labels, and the mean Dice per region over
the held-out cases is printed per candidate. Only held-out cases are used, so the choice is made out of fold, like
the model's own estimate.

- ``--choice thresholds``: each region channel (WT/TC/ET outputs) thresholded at several values, prepared space.
- ``--choice postprocess``: the postprocessing rules (component removal, small-ET relabelling) with several
  settings, in each case's own grid after the product's own steps (``neuromap.postprocess``), as `segment` does;
  scored on the task's headline structures (WT/TC/ET for BraTS, abnormality for LGG slice stacks, where "largest
  only" is Buda et al.'s protocol: the largest 3D component, Dice per patient over the slice stack).
- ``--choice tta``: the single pass against the mean with the left-right mirrored pass (the pass the quality
  estimate runs anyway) and against every in-plane flip (``--tta``), in each case's own grid after the default
  postprocessing.
- ``--choice ensemble --partner RUN2``: a second run of the same folds (another seed): each run's fold model
  alone, the mean of the two (two passes), and the mean of RUN's pass with RUN2's pass on the mirrored scan (two
  passes that are also the quality estimate's pair), in each case's own grid after the default postprocessing.
  Both fold models of a case were trained without it, so the ensemble's score is out of fold too.

    python scripts/oof_choices.py runs/brats_unet25d --choice postprocess --folds 0 1 2 3 4
    python scripts/oof_choices.py runs/lgg_unet2d_cv --choice postprocess --data ../shared/data/lgg_kaggle_3m
    python scripts/oof_choices.py runs/arch_resunet --choice tta
    python scripts/oof_choices.py runs/brats_resunet25d_flair_t1ce --choice ensemble --partner runs/arm_seed1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from neuromap.checkpoint import ModelSpec, load_model
from neuromap.config import InferenceConfig
from neuromap.export import labels_in_input_grid
from neuromap.inference import predict_probs
from neuromap.io import discover_cases, load_case
from neuromap.io.case import Volume
from neuromap.labels import REGIONS
from neuromap.metrics import binary_case_metrics
from neuromap.postprocess import postprocess
from neuromap.preprocess import Prepared, prepare
from neuromap.quality import LEFT_RIGHT
from neuromap.tasks import task_of

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
# name -> InferenceConfig changes; "none" runs no step at all. The shipped defaults are "default".
POSTPROCESS = {
    "none": None,
    "default": {},
    "fraction 0": {"min_component_fraction": 0.0},
    "fraction 0.05": {"min_component_fraction": 0.05},
    "fraction 0.2": {"min_component_fraction": 0.2},
    "fraction 0.3": {"min_component_fraction": 0.3},
    "largest only": {"min_component_fraction": 1.0},
    "min 1 mL": {"min_component_ml": 1.0},
    "ET rule off": {"et_min_ml": 0.0},
    "ET < 0.5 mL": {"et_min_ml": 0.5},
    "ET < 1 mL": {"et_min_ml": 1.0},
}
TTA = ("single pass", "mean with left-right mirror", "every in-plane flip (--tta)")
ENSEMBLE = ("single pass", "partner alone", "mean of both", "mean with the partner on the mirror")


def on_mirror(pair: tuple[torch.nn.Module, ModelSpec], image: np.ndarray, cfg: InferenceConfig) -> np.ndarray:
    """One pass of ``pair`` on the left-right mirrored image, mirrored back: the quality estimate's second pass."""
    return np.flip(predict_probs([pair], np.ascontiguousarray(np.flip(image, LEFT_RIGHT)), cfg), LEFT_RIGHT)


def held_out_predictions(run: Path, folds: list[int], data: Path, tta: bool = False, partner: Path | None = None,
                         ) -> Iterator[tuple[str, Volume, Prepared, dict[str, np.ndarray], ModelSpec]]:
    """(case id, volume with expert labels, prepared volume, out-of-fold probabilities, spec) of every held-out
    case; the probabilities by name: the single pass, with ``tta`` the other entries of ``TTA``, with ``partner``
    those of ``ENSEMBLE``."""
    cases = {c.case_id: c for c in discover_cases(data)}
    for fold in folds:
        model, spec = load_model(run / f"fold_{fold}" / "best.pt")
        held_out = json.loads((run / f"fold_{fold}" / "split.json").read_text())["val"]
        if partner is not None:
            other = load_model(partner / f"fold_{fold}" / "best.pt")
            if json.loads((partner / f"fold_{fold}" / "split.json").read_text())["val"] != held_out:
                raise SystemExit(f"{partner}: fold {fold} holds out other cases than {run}'s.")
        for case_id in held_out:
            volume = load_case(cases[case_id], spec.modalities, with_seg=True)
            prepared = prepare(volume, spec.preprocess)
            # Every slice: thresholds other than the default's 0.5 are scored here, and the skip decides which
            # slices run at 0.5 (`neuromap.inference.near_tumour`).
            single = InferenceConfig(skip_slices=False)
            probs = {TTA[0]: predict_probs([(model, spec)], prepared.image, single)}
            if tta:
                probs[TTA[1]] = (probs[TTA[0]] + on_mirror((model, spec), prepared.image, single)) / 2
                probs[TTA[2]] = predict_probs([(model, spec)], prepared.image, single.model_copy(update={"tta": True}))
            if partner is not None:
                probs[ENSEMBLE[1]] = predict_probs([other], prepared.image, single)
                probs[ENSEMBLE[2]] = (probs[TTA[0]] + probs[ENSEMBLE[1]]) / 2
                probs[ENSEMBLE[3]] = (probs[TTA[0]] + on_mirror(other, prepared.image, single)) / 2
            yield case_id, volume, prepared, probs, spec


def _dice(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    return binary_case_metrics(pred, truth, spacing, hd95=False)[0]["dice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--choice", choices=("thresholds", "postprocess", "tta", "ensemble"), required=True)
    parser.add_argument("--partner", type=Path, help="--choice ensemble: the second run (same folds, another seed)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/brats2018"))
    args = parser.parse_args()
    if (args.choice == "ensemble") != (args.partner is not None):
        raise SystemExit("--partner RUN2 goes with --choice ensemble, and only with it.")
    candidates = {"thresholds": THRESHOLDS, "postprocess": tuple(POSTPROCESS), "tta": TTA, "ensemble": ENSEMBLE}[
        args.choice]
    scores: dict[str, dict] = {}
    case_means: dict[str, dict[str, float]] = {}  # case -> candidate -> mean Dice over the structures
    for case_id, volume, prepared, passes, spec in held_out_predictions(args.run, args.folds, args.data,
                                                                        args.choice == "tta", args.partner):
        task = task_of(spec)
        probs = passes[TTA[0]]
        if args.choice == "thresholds":
            if task.out != "regions":
                raise SystemExit(f"{args.run}: --choice thresholds needs a region-output (WT/TC/ET) model.")
            for index, region in enumerate(REGIONS):  # the region's own channel thresholded at t
                truth = np.isin(prepared.seg, REGIONS[region])
                for t in THRESHOLDS:
                    scores.setdefault(region, {}).setdefault(t, []).append(
                        _dice(probs[index] > t, truth, prepared.spacing))
            continue
        structures = [s for s in task.structures if s.key in task.headline]
        voxel_ml = volume.voxel_ml if volume.spacing_known else None  # as `segment`: voxels when unknown
        if args.choice in ("tta", "ensemble"):  # each way of passing, then the default postprocessing
            outputs = {name: postprocess(labels_in_input_grid(p, prepared.inverse, task), voxel_ml, InferenceConfig(),
                                         task.postprocess_steps())[0] for name, p in passes.items()}
        else:
            raw = labels_in_input_grid(probs, prepared.inverse, task)
            outputs = {name: postprocess(raw, voxel_ml, InferenceConfig(**(change or {})),
                                         () if change is None else task.postprocess_steps())[0]
                       for name, change in POSTPROCESS.items()}
        for name, labels in outputs.items():
            dice = [_dice(np.isin(labels, s.labels), np.isin(volume.seg, s.labels), volume.spacing)
                    for s in structures]
            for s, value in zip(structures, dice, strict=True):
                scores.setdefault(s.key, {}).setdefault(name, []).append(value)
            case_means.setdefault(case_id, {})[name] = float(np.mean(dice))
    keys = list(scores)
    n = len(next(iter(scores[keys[0]].values())))
    space = "prepared space" if args.choice == "thresholds" else "input grid"
    print(f"out-of-fold mean Dice per structure and candidate ({space}, n = {n})")
    print(f"| {args.choice} | " + " | ".join(keys) + " | mean |\n|---|" + "---|" * (len(keys) + 1))
    for candidate in candidates:
        means = [np.mean(scores[k][candidate]) for k in keys]
        print(f"| {candidate} | " + " | ".join(f"{m:.4f}" for m in means) + f" | {np.mean(means):.4f} |")
    if case_means:  # paired: on how many cases each candidate beats the first (the product's current choice)
        first = candidates[0]
        for candidate in candidates[1:]:
            diffs = [c[candidate] - c[first] for c in case_means.values()]
            print(f"{candidate} vs {first}: better on {sum(d > 0 for d in diffs)} of {len(diffs)} cases, "
                  f"worse on {sum(d < 0 for d in diffs)}, median change {np.median(diffs):+.4f}")
        print("per case (mean Dice over the structures): " + json.dumps(
            {case: {k: round(v, 4) for k, v in c.items()} for case, c in case_means.items()}))

if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
