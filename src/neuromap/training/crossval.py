"""Cross-validation: every fold of a config trained (resumable), every case scored once, out of fold.

``neuromap cv CFG`` runs the folds one after another in ``<run>/fold_<k>/`` (a finished fold is skipped, an
interrupted one resumed from its ``last.pt``), then segments each fold's held-out cases with that fold's model
through the same code path as ``neuromap segment`` (labels in each case's own grid) and scores the pooled
predictions with ``neuromap evaluate``. With ``select: last`` in the config the held-out fold never steers the
model (no checkpoint choice, no early stopping), so the pooled table is a fair estimate for unseen patients.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from neuromap.config import TrainConfig
from neuromap.errors import NeuroMapError
from neuromap.io.atomic import write_bytes_atomic
from neuromap.tasks import get_task


def run_root(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir or f"runs/{cfg.name}")


def fold_config(cfg: TrainConfig, fold: int) -> TrainConfig:
    """The config of one fold: k-fold split with ``fold`` held out, its own folder under the run."""
    split = cfg.split.model_copy(update={"mode": "kfold", "fold": fold})
    folded = cfg.model_copy(update={"split": split, "output_dir": str(run_root(cfg) / f"fold_{fold}")})
    return TrainConfig.model_validate(folded.model_dump())  # re-validates the fold number against folds


def train_folds(cfg: TrainConfig, folds: list[int], progress: bool = True) -> None:
    """Train each fold unless it finished; resume it when it was interrupted."""
    from neuromap.training.loop import train

    for fold in folds:
        fold_cfg = fold_config(cfg, fold)
        run_dir = Path(fold_cfg.output_dir)
        if (run_dir / "summary.json").is_file():
            continue
        train(fold_cfg, resume=(run_dir / "last.pt").is_file(), progress=progress)


def out_of_fold(cfg: TrainConfig, folds: list[int], hd95: bool = True) -> dict:
    """Segment every held-out case with its fold's model, score the pool; writes ``<run>/oof/`` (predictions,
    reports, overlays), ``<run>/oof_eval/`` (metrics.csv, summary.json, boxplot.png) and ``<run>/oof_table.md``."""
    from neuromap.config import InferenceConfig
    from neuromap.segmenter import Segmenter
    from neuromap.training.data import find_training_cases

    root = run_root(cfg)
    cases = {c.case_id: c for c in find_training_cases(cfg.data_roots)}
    missing = [f for f in folds if not (root / f"fold_{f}" / "best.pt").is_file()]
    if missing:
        raise NeuroMapError(f"{root}: folds {missing} have no trained model yet. Fix: run `neuromap cv` without "
                            "--evaluate-only to train them first.")
    for fold, held_out in held_out_cases(root, folds).items():
        segmenter = Segmenter(str(root / f"fold_{fold}" / "best.pt"), InferenceConfig())
        segmenter.segment([cases[case_id] for case_id in held_out], root / "oof", overwrite=True)
    return score_out_of_fold(cfg, folds, hd95, cases)


def held_out_cases(root: Path, folds: list[int]) -> dict[int, list[str]]:
    return {fold: json.loads((root / f"fold_{fold}" / "split.json").read_text())["val"] for fold in folds}


def score_out_of_fold(cfg: TrainConfig, folds: list[int], hd95: bool = True, cases: dict | None = None) -> dict:
    """Score the predictions in ``<run>/oof/`` of the held-out cases of ``folds`` only: that folder may also hold
    other folds' predictions (folds run as parallel lanes, `neuromap cv --folds K` each, share it), which must
    neither be scored nor make the evaluation refuse predictions it has no ground truth for. ``cases`` (id -> Case)
    spares a second search of the data roots when the caller has them."""
    from neuromap.evaluation import evaluate
    from neuromap.training.data import find_training_cases

    root = run_root(cfg)
    if cases is None:
        cases = {c.case_id: c for c in find_training_cases(cfg.data_roots)}
    fold_of = {case_id: fold for fold, held_out in held_out_cases(root, folds).items() for case_id in held_out}
    with tempfile.TemporaryDirectory(prefix="neuromap-cv-") as tmp:
        # Links, nothing copied: the held-out case folders (cases from several data roots form one folder) and
        # those cases' predictions.
        truth, predictions = Path(tmp) / "truth", Path(tmp) / "predictions"
        truth.mkdir()
        predictions.mkdir()
        for case_id in fold_of:
            os.symlink(cases[case_id].root.resolve(), truth / case_id)
            for name in (f"{case_id}_seg.nii.gz", case_id):  # a label map, or a slice folder's masks
                if (root / "oof" / name).exists():
                    os.symlink((root / "oof" / name).resolve(), predictions / name)
        summary = evaluate(predictions, truth, root / "oof_eval", hd95=hd95, overwrite=True, task=cfg.task)
    table = oof_table(root / "oof_eval" / "metrics.csv", fold_of, cfg.task)
    write_bytes_atomic(root / "oof_table.md", table.encode(), overwrite=True)
    return summary


def per_case_scores(metrics_csv: Path, task: str) -> dict[str, dict[str, float]]:
    """Case -> ``dice_<region>``, ``hd95_<region>`` for the task's headline regions, plus ``dice_mean`` over them."""
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    structures = get_task(task).headline  # WT, TC, ET for BraTS; abnormality for binary: all regions
    per_case: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["structure"] in structures and row["kind"] == "region":
            per_case.setdefault(row["case_id"], {})[f"dice_{row['structure']}"] = float(row["dice"])
            per_case[row["case_id"]][f"hd95_{row['structure']}"] = float(row["hd95"]) if row.get("hd95") else np.nan
    if len(structures) > 1:
        for values in per_case.values():
            values["dice_mean"] = float(np.mean([values[f"dice_{s}"] for s in structures]))
    return per_case


def oof_table(metrics_csv: Path, fold_of: dict[str, int], task: str) -> str:
    """Markdown: one row per case (fold, Dice and HD95 per region), then mean, median, min and n per column."""
    structures = get_task(task).headline
    per_case = per_case_scores(metrics_csv, task)
    columns = [f"dice_{s}" for s in structures]
    if len(structures) > 1:
        columns.append("dice_mean")
    # HD95 columns only when the evaluation measured them (``--no-hd95`` leaves them empty, not "nan").
    columns += [f"hd95_{s}" for s in structures if any(np.isfinite(v[f"hd95_{s}"]) for v in per_case.values())]

    def cell(column: str, value: float) -> str:
        return f"{value:.3f}" if column.startswith("dice") else f"{value:.1f}"

    header = "| case | fold | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for case_id in sorted(per_case, key=lambda c: per_case[c].get("dice_mean", per_case[c][columns[0]])):
        values = per_case[case_id]
        lines.append(f"| {case_id} | {fold_of.get(case_id, '')} | "
                     + " | ".join(cell(c, values[c]) for c in columns) + " |")
    for name, func in (("mean", np.nanmean), ("median", np.nanmedian), ("min", np.nanmin)):
        cells = [func([v[c] for v in per_case.values()]) for c in columns]
        lines.append(f"| **{name}** | | " + " | ".join(cell(c, x) for x, c in zip(cells, columns, strict=True)) + " |")
    lines.append("| **n** | | " + " | ".join(str(len(per_case)) for _ in columns) + " |")
    return "\n".join(lines) + "\n"
