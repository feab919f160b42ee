"""Turn a training run into a shipped model: weights under neuromap/weights, an index entry, a model card.

The card's numbers are measured here, not copied from the training log: every validation and test case of the
run's split is segmented with the shipped (float16-stored) weights through `neuromap.segment`, in the case's
own voxel grid, and scored with `neuromap.evaluate` against the expert labels.

    python scripts/ship_model.py runs/brats_unet2d --name brats_unet2d --config configs/brats_unet2d.yaml

A model trained on every labelled case (``split: {mode: all}``) has no held-out case of its own: pass ``--cv RUN``, the
cross-validation run of the same recipe (``neuromap cv``), and the card reports its out-of-fold results instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from neuromap.checkpoint import ModelSpec, read_checkpoint, save_checkpoint
from neuromap.evaluation import evaluate
from neuromap.io import discover_cases
from neuromap.segmenter import segment
from neuromap.tasks import get_task
from neuromap.zoo import WEIGHTS_DIR, register_shipped


def measure(weights: Path, case_dirs: list[Path], gt_root: Path, task: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pred = Path(tmp) / "pred"
        results = segment(case_dirs, pred, model=weights, labels="brats")
        summary = evaluate(pred, gt_root, Path(tmp) / "eval", task=task, allow_missing=True)
        seconds = [r.report["timings_s"]["total_s"] for r in results]
    return {"summary": summary, "seconds_per_case": seconds}


def table(summary: dict, structures: list[dict] | None = None, unit: str = "mm") -> str:
    lines = [f"| structure | Dice mean ± sd | HD95 ({unit}) mean ± sd | sensitivity | precision | n |",
             "|---|---|---|---|---|---|"]
    for row in structures or summary["structures"]:
        m = row["metrics"]
        lines.append(
            f"| {row['structure']} ({row['kind']}) | {m['dice']['mean']:.3f} ± {m['dice']['std']:.3f} | "
            f"{m['hd95']['mean']:.1f} ± {m['hd95']['std']:.1f} | {m['sensitivity']['mean']:.3f} | "
            f"{m['precision']['mean']:.3f} | {m['dice']['n']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--config", required=True, help="the YAML the run was started with (for the card)")
    parser.add_argument("--note", default="", help="extra text for the card (e.g. how it was chosen)")
    parser.add_argument("--cv", type=Path, help="cross-validation run of the same recipe (for all-data models)")
    parser.add_argument("--cv-config", help="the YAML the cross-validation was run with (for the card)")
    args = parser.parse_args()

    payload = read_checkpoint(args.run_dir / "best.pt")
    spec = ModelSpec.from_dict(payload["spec"])
    run_cfg = json.loads((args.run_dir / "config.json").read_text())
    split = json.loads((args.run_dir / "split.json").read_text())
    summary = json.loads((args.run_dir / "summary.json").read_text())
    log = list(csv.DictReader(open(args.run_dir / "log.csv")))
    target = WEIGHTS_DIR / f"{args.name}.pt"
    spec.info = {**spec.info, "name": args.name, "trained_on": split["train"], "seed": run_cfg["seed"]}
    save_checkpoint(target, spec, payload["state_dict"], half=True)

    root = Path(run_cfg["data_roots"][0])
    cases = discover_cases(root)
    by_id = {c.case_id: c.root for c in cases}
    measured = {part: measure(target, [by_id[i] for i in split[part]], root, spec.task)
                for part in ("val", "test") if split.get(part)}
    if args.cv:
        measured["out-of-fold"] = {"summary": json.loads((args.cv / "oof_eval" / "summary.json").read_text()),
                                   "seconds_per_case": []}
    held_out = measured["out-of-fold" if args.cv else "val"]["summary"]
    register_shipped(args.name, {
        "file": target.name, "modalities": spec.modalities, "task": spec.task, "architecture": spec.model.name,
        "card": f"{args.name}.md",
        # the model choice breaks ties with this Dice: out of fold for cross-validated recipes
        # 6 places: rounded again to the card's 3, it must give the card's digits (0.7915 would not)
        "val_dice": {r["structure"]: round(r["metrics"]["dice"]["mean"], 6)
                     for r in held_out["structures"] if r["kind"] == "region"},
        "n_val": held_out["n_cases"],
        "val_kind": "cross-validation, out of fold" if args.cv else "validation split",
    })

    size_mb = target.stat().st_size / 2**20
    card = [
        f"# Model card: {args.name}", "",
        "**Research use only.** Not a medical device; not for diagnosis or treatment decisions.", "",
        "## What it is",
        f"- Architecture: `{spec.model.name}` ({spec.model.spatial_dims}D), options `{spec.model.options}`, "
        f"output `{spec.model.out}`; {sum(v.numel() for v in payload['state_dict'].values()):,} parameters; "
        f"weights stored as float16 ({size_mb:.1f} MB), run in float32.",
        f"- Input sequences: {', '.join(spec.modalities)}. Preprocessing: `{spec.preprocess.model_dump()}`.",
        f"- Task: {spec.task}: {get_task(spec.task).description}", "",
        "## Data and split",
        f"- Data: `{root}`: {len(cases)} cases with expert labels ({cases[0].naming} naming"
        + ("" if cases[0].layout.spacing_known else "; pixel spacing unknown") + ")"
        + (f". Trained on all {len(split['train'])} labelled cases (no hold-out); its recipe was cross-validated "
           f"in `{args.cv}` ({run_cfg['split']['folds']} patient-level folds stratified by site, seed "
           f"{run_cfg['seed']}, `neuromap cv {args.cv_config}`)." if args.cv else
           f". Patient-level split, seed {run_cfg['seed']}, ratios {run_cfg['split']['ratios']}."),
        f"- Train ({len(split['train'])}): {', '.join(split['train'])}",
        *([] if args.cv else [
            f"- Validation ({len(split['val'])}, used for the best-checkpoint choice and learning-rate schedule): "
            f"{', '.join(split['val'])}",
            f"- Test ({len(split.get('test', []))}, never seen in training or selection): "
            f"{', '.join(split.get('test', []))}"]), "",
        "## Training",
        f"- Command: `neuromap train {args.config}` (code at this commit), then "
        f"`python scripts/ship_model.py {args.run_dir} --name {args.name} --config {args.config}`.",
        f"- Epochs run: {summary['epochs_run']} (stopped by: {summary['stopped']}); "
        f"best epoch {summary['best_epoch']}; "
        f"{int(run_cfg['iterations_per_epoch'])} iterations of batch {run_cfg['batch_size']} per epoch; "
        f"{run_cfg['optimizer']} lr {run_cfg['lr']}, loss {run_cfg['loss']}.",
        f"- Wall time: {summary['wall_seconds'] / 60:.1f} min on {summary['hardware']} "
        "(2-core CPU VM shared with other jobs: times are upper bounds)"
        + (f"; CPU time of the training process {summary['cpu_seconds'] / 60:.1f} min (budget "
           f"`cpu_minutes: {run_cfg['cpu_minutes']}`)." if "cpu_seconds" in summary else "."),
        f"- Last logged epoch: {log[-1]}", "",
        "## Measured results (in each case's original voxel grid, via `neuromap segment` + `neuromap evaluate`)",
    ]
    for part, result in measured.items():
        summ = result["summary"]
        unit = "mm" if summ["hd95_unit"] == "mm" else "pixels"
        card += ["", f"### {part} cases (n = {summ['n_cases']})", "", table(summ, unit=unit)]
        if part == "out-of-fold":
            card += ["", "Each case scored once, by the fold model that never saw it (fixed budget, last checkpoint: "
                     "the held-out fold steered nothing). Per case, worst first:", "",
                     (args.cv / "oof_table.md").read_text()]
        if "per_slice" in summ:  # slice stacks: per-patient (3D) above, per-slice below
            slices = summ["per_slice"]
            card += ["", "Per patient above (3D over each slice stack). Per slice, all slices "
                     f"(n = {slices['n_slices']}):", "", table(summ, slices["all_slices"], unit), "",
                     "Per slice, only slices with ground-truth abnormality:", "",
                     table(summ, slices["slices_with_ground_truth"], unit), "", f"_{slices['convention']}_"]
        if result["seconds_per_case"]:
            card += ["", "Segmentation time per case on this CPU (s): "
                     f"{[round(s, 1) for s in result['seconds_per_case']]}"]
    card += [
        "", "## Limits", "",
        f"- Trained on {len(split['train'])} cases from one public dataset; "
        + ("the out-of-fold estimate rests on those same few cases" if args.cv else
           "the validation and test sets are tiny")
        + " (the numbers above have wide uncertainty). Expect lower accuracy on scans from other scanners, protocols "
        "or tumour types (e.g. metastases), and on scans that are not skull-stripped and co-registered.",
    ]
    if not args.cv:
        card.append("- Validation cases steered checkpoint selection, so their scores are optimistic; the test cases "
                    "are not.")
    if args.note:
        card += ["", "## Notes", "", args.note]
    (WEIGHTS_DIR / f"{args.name}.md").write_text("\n".join(card) + "\n")
    print((WEIGHTS_DIR / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
