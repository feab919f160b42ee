"""Re-choose the region thresholds of a region-output recipe on its out-of-fold predictions (issue 16).

For every held-out case of every finished fold of ``RUN`` (``neuromap cv``), the fold's model predicts WT/TC/ET
probabilities in prepared space; Dice per region is computed at each candidate threshold against the case's expert
labels (same grid), and the mean over cases is printed per threshold. Only the held-out cases are used, so the
choice is made out of fold, like the model's own estimate.

    python scripts/oof_thresholds.py runs/brats_unet25d --folds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from neuromap.checkpoint import load_model
from neuromap.config import InferenceConfig
from neuromap.inference import predict_probs
from neuromap.io import discover_cases, load_case
from neuromap.labels import REGIONS
from neuromap.metrics import binary_case_metrics
from neuromap.preprocess import prepare

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/brats2018"))
    args = parser.parse_args()
    cases = {c.case_id: c for c in discover_cases(args.data)}
    scores: dict[str, dict[float, list[float]]] = {r: {t: [] for t in THRESHOLDS} for r in REGIONS}
    for fold in args.folds:
        model, spec = load_model(args.run / f"fold_{fold}" / "best.pt")
        for case_id in json.loads((args.run / f"fold_{fold}" / "split.json").read_text())["val"]:
            prepared = prepare(load_case(cases[case_id], spec.modalities, with_seg=True), spec.preprocess)
            probs = predict_probs([(model, spec)], prepared.image, InferenceConfig()).numpy()
            for index, region in enumerate(REGIONS):
                truth = np.isin(prepared.seg, REGIONS[region])
                for t in THRESHOLDS:  # the region's own channel thresholded at t
                    row = binary_case_metrics(probs[index] > t, truth, prepared.spacing, hd95=False)[0]
                    scores[region][t].append(row["dice"])
    n = len(next(iter(scores["WT"].values())))
    print(f"out-of-fold mean Dice per region and threshold (prepared space, n = {n})")
    print("threshold " + " ".join(f"{t:>6}" for t in THRESHOLDS))
    for region, by_t in scores.items():
        print(f"{region:<9} " + " ".join(f"{np.mean(v):6.3f}" for v in by_t.values()))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
