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

    python scripts/oof_choices.py runs/brats_unet25d --choice postprocess --folds 0 1 2 3 4
    python scripts/oof_choices.py runs/lgg_unet2d_cv --choice postprocess --data ../shared/data/lgg_kaggle_3m
    python scripts/oof_choices.py runs/arch_resunet --choice tta
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


def held_out_predictions(run: Path, folds: list[int], data: Path, tta: bool = False) -> Iterator[
        tuple[Volume, Prepared, dict[str, torch.Tensor], ModelSpec]]:
    """(volume with expert labels, prepared volume, out-of-fold probabilities, spec) of every held-out case; the
    probabilities by name: the single pass, and with ``tta`` the other entries of ``TTA``."""
    cases = {c.case_id: c for c in discover_cases(data)}
    for fold in folds:
        model, spec = load_model(run / f"fold_{fold}" / "best.pt")
        for case_id in json.loads((run / f"fold_{fold}" / "split.json").read_text())["val"]:
            volume = load_case(cases[case_id], spec.modalities, with_seg=True)
            prepared = prepare(volume, spec.preprocess)
            # Every slice: thresholds other than the default's 0.5 are scored here, and the skip decides which
            # slices run at 0.5 (`neuromap.inference.near_tumour`).
            single = InferenceConfig(skip_slices=False)
            probs = {TTA[0]: predict_probs([(model, spec)], prepared.image, single)}
            if tta:
                mirrored = np.ascontiguousarray(np.flip(prepared.image, LEFT_RIGHT))
                flipped = predict_probs([(model, spec)], mirrored, single).flip(LEFT_RIGHT)
                probs[TTA[1]] = (probs[TTA[0]] + flipped) / 2
                probs[TTA[2]] = predict_probs([(model, spec)], prepared.image, single.model_copy(update={"tta": True}))
            yield volume, prepared, probs, spec


def _dice(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    return binary_case_metrics(pred, truth, spacing, hd95=False)[0]["dice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--choice", choices=("thresholds", "postprocess", "tta"), required=True)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/brats2018"))
    args = parser.parse_args()
    candidates = {"thresholds": THRESHOLDS, "postprocess": tuple(POSTPROCESS), "tta": TTA}[args.choice]
    scores: dict[str, dict] = {}
    for volume, prepared, passes, spec in held_out_predictions(args.run, args.folds, args.data, args.choice == "tta"):
        task = task_of(spec)
        probs = passes[TTA[0]]
        if args.choice == "thresholds":
            if task.out != "regions":
                raise SystemExit(f"{args.run}: --choice thresholds needs a region-output (WT/TC/ET) model.")
            for index, region in enumerate(REGIONS):  # the region's own channel thresholded at t
                truth = np.isin(prepared.seg, REGIONS[region])
                for t in THRESHOLDS:
                    scores.setdefault(region, {}).setdefault(t, []).append(
                        _dice(probs[index].numpy() > t, truth, prepared.spacing))
            continue
        structures = [s for s in task.structures if s.key in task.headline]
        voxel_ml = volume.voxel_ml if volume.spacing_known else None  # as `segment`: voxels when unknown
        if args.choice == "tta":  # each way of passing, then the default postprocessing
            outputs = {name: postprocess(labels_in_input_grid(p, prepared.inverse, task), voxel_ml, InferenceConfig(),
                                         task.postprocess_steps())[0] for name, p in passes.items()}
        else:
            raw = labels_in_input_grid(probs, prepared.inverse, task)
            outputs = {name: postprocess(raw, voxel_ml, InferenceConfig(**(change or {})),
                                         () if change is None else task.postprocess_steps())[0]
                       for name, change in POSTPROCESS.items()}
        for name, labels in outputs.items():
            for s in structures:
                scores.setdefault(s.key, {}).setdefault(name, []).append(
                    _dice(np.isin(labels, s.labels), np.isin(volume.seg, s.labels), volume.spacing))
    keys = list(scores)
    n = len(next(iter(scores[keys[0]].values())))
    space = "prepared space" if args.choice == "thresholds" else "input grid"
    print(f"out-of-fold mean Dice per structure and candidate ({space}, n = {n})")
    print(f"| {args.choice} | " + " | ".join(keys) + " | mean |\n|---|" + "---|" * (len(keys) + 1))
    for candidate in candidates:
        means = [np.mean(scores[k][candidate]) for k in keys]
        print(f"| {candidate} | " + " | ".join(f"{m:.4f}" for m in means) + f" | {np.mean(means):.4f} |")

if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
