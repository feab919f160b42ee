"""The raw path (``--raw``) against the prepared input on every shared BraTS 2018 case: issue 12's bar is a
whole-tumour Dice within 0.05 of the prepared input's, on scans "turned into misaligned thick-slice scans".

Per case (seeded, so reruns are identical): `neuromap.prepare_raw.simulate.simulate_raw` makes the case raw: every
sequence in 5 mm axial slices on its own grid, T1, T2 and FLAIR each moved by a random rigid motion (up to 5
degrees about each axis and 5 mm along each), the T1ce unmoved as the reference. Then the default model segments
the raw scans with ``--raw`` (skull-stripped inputs: registration, no brain extraction) and the prepared case as
shipped; the prepared labels are put on the T1ce's thick-slice grid the same way as the expert labels (nearest
neighbour), and both are scored against the expert labels there. Reported per case: WT Dice raw and prepared,
their difference, the registration error of the FLAIR (the largest displacement of points 50 mm around the brain
centre after undoing the found transform, against the known motion), its NMI sharpness, warnings, CPU seconds.

The shipped default model was trained on these 22 cases, so both Dice values are optimistic; their difference is
what the raw path costs, which is the bar.

    python benchmarks/raw_vs_prepared.py [--cases N] [--seed 0] [--json OUT] [--model NAME_OR_CHECKPOINT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_info

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brats2018"
RESULT = ROOT / "benchmarks" / "results" / "raw_vs_prepared.json"
MOVED = ("t1", "t2", "flair")


def wt_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Whole-tumour Dice (any label) with the project's own binary metrics."""
    from neuromap.metrics import structure_metrics

    return structure_metrics(pred > 0, truth > 0, None, hd95=False)["dice"]


def one_case(case_dir: Path, work: Path, rng: np.random.Generator, model: str | None = None) -> dict:
    import nibabel as nib
    import SimpleITK as sitk

    from neuromap.prepare_raw import RawOptions
    from neuromap.prepare_raw.grid import to_array, to_sitk
    from neuromap.prepare_raw.simulate import random_motion, registration_error_mm, simulate_raw
    from neuromap.segmenter import segment

    motion = {m: random_motion(rng) for m in MOVED}
    sim = simulate_raw(case_dir, work / case_dir.name / "raw" / case_dir.name, motion, name=case_dir.name)
    cpu = time.process_time()
    raw = segment(sim.folder, work / case_dir.name / "raw_out", model=model, raw=RawOptions(skull_stripped=True))[0]
    raw_cpu = time.process_time() - cpu
    prepared = segment(case_dir, work / case_dir.name / "prepared_out", model=model)[0]
    on_ref = sitk.Resample(to_sitk(np.asarray(prepared.labels.dataobj), prepared.labels.affine), sim.reference,
                           sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    raw_labels = np.asarray(nib.load(raw.files["seg.nii.gz"]).dataobj)
    registration = raw.report["raw_preparation"]["registration"]
    return {
        "motion": {m: {"rotation_deg": list(r), "translation_mm": list(t)} for m, (r, t) in motion.items()},
        "wt_dice_raw": round(wt_dice(raw_labels, sim.truth_ref), 4),
        "wt_dice_prepared": round(wt_dice(to_array(on_ref), sim.truth_ref), 4),
        "registration_error_mm": {m: round(registration_error_mm(e, motion[m], sim.centre), 2)
                                  for m, e in registration.items()},
        "sharpness": {m: round(e["sharpness"], 3) for m, e in registration.items()},
        "warnings": raw.report["warnings"],
        "raw_cpu_s": round(raw_cpu, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=None, help="the first N cases in name order (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(RESULT))
    parser.add_argument("--model", help="a model name or checkpoint for both paths (default: the shipped default)")
    args = parser.parse_args()
    cases = sorted(p for p in DATA.iterdir() if p.is_dir())[: args.cases]
    rng = np.random.default_rng(args.seed)
    results = {}
    with tempfile.TemporaryDirectory(prefix="neuromap-raw-") as tmp:
        for case_dir in cases:
            results[case_dir.name] = row = one_case(case_dir, Path(tmp), rng, args.model)
            row["difference"] = round(row["wt_dice_raw"] - row["wt_dice_prepared"], 4)
            print(f"{case_dir.name}: WT raw {row['wt_dice_raw']:.3f} prepared {row['wt_dice_prepared']:.3f} "
                  f"(diff {row['difference']:+.3f}); registration error {row['registration_error_mm']} mm; "
                  f"{row['raw_cpu_s']} CPU s", flush=True)
    diffs = [r["difference"] for r in results.values()]
    summary = {"n": len(diffs), "mean_difference": round(statistics.mean(diffs), 4),
               "median_difference": round(statistics.median(diffs), 4), "worst_difference": round(min(diffs), 4),
               "within_0.05": sum(d >= -0.05 for d in diffs),
               "mean_wt_raw": round(statistics.mean(r["wt_dice_raw"] for r in results.values()), 4),
               "mean_wt_prepared": round(statistics.mean(r["wt_dice_prepared"] for r in results.values()), 4)}
    out = {"machine": cpu_info(), "seed": args.seed, "model": args.model or "default", "summary": summary,
           "cases": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
