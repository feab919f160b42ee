"""Measure what real MRI sequences look like, the numbers behind `neuromap.io.plausibility` and
`neuromap.io.header_checks`, and check that every real case passes them.

For each NIfTI file of the shared data folder: stored dtype, header-vs-file size (gzip trailer), distinct values,
share of nonzero voxels, intensity percentiles, coefficient of variation and most common value inside the nonzero
voxels, negative share; per case, the largest correlation between two sequences; then what `check_sequences` says
about each case. Results: docs/experiments/plausibility.md.

    PYTHONPATH=src python scripts/plausibility_survey.py [--data ../shared/data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import numpy as np

from neuromap.io import ImageRef
from neuromap.io.nifti import nifti_files
from neuromap.io.nifti_files import open_nifti, read_nifti
from neuromap.io.plausibility import check_sequences, signal_correlation


def file_stats(path: Path) -> tuple[dict, np.ndarray]:
    """Statistics of one file (its header checked on the way, as the loader does) and its voxels as float32."""
    img = open_nifti(path, "image")
    data = read_nifti(img, ImageRef(path))
    values = data[data != 0].astype(np.float64)
    levels, counts = np.unique(values, return_counts=True)
    return {
        "file": path.name, "dtype": str(img.get_data_dtype()), "distinct": int(levels.size + (values.size < data.size)),
        "nonzero_share": round(values.size / data.size, 3), "max": float(values.max()),
        "p1_p50_p99": [round(float(v), 1) for v in np.percentile(values, [1, 50, 99])],
        "cv": round(float(values.std() / values.mean()), 3),
        "dominant_share": round(float(counts.max() / values.size), 4),
        "negative_share": round(float(np.mean(values < 0)), 4),
    }, data


def case_stats(folder: Path) -> dict:
    images = [p for p in nifti_files(folder) if not any(t in p.name for t in ("seg", "mask"))]
    rows, channels = zip(*(file_stats(p) for p in images), strict=True)
    labels = [file_stats(p)[0] for p in nifti_files(folder) if "seg" in p.name]
    shapes = {c.shape for c in channels}
    result = {"case": folder.name, "sequences": list(rows), "labels": labels}
    names = [r["file"] for r in rows]
    if len(shapes) == 1:  # sequences on one grid: compare them and ask the plausibility checks
        correlation = signal_correlation(channels)
        pairs = combinations(range(len(rows)), 2)
        result["max_correlation"] = round(max(float(correlation[i, j]) for i, j in pairs), 3)
        checked = [check_sequences(list(channels), names, names)]
    else:  # raw scans, each on its own grid: each sequence alone
        checked = [check_sequences([c], [n], [n]) for c, n in zip(channels, names, strict=True)]
    result["problems"] = [p for findings in checked for p in findings.problems]
    result["warnings"] = [w for findings in checked for w in findings.warnings]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args()
    root = Path(args.data)
    folders = sorted(p for sub in ("brats2018", "unlabelled", "raw") for p in (root / sub).glob("*") if p.is_dir())
    cases = [case_stats(folder) for folder in folders]
    sequences = [s for c in cases for s in c["sequences"]]
    labels = [s for c in cases for s in c["labels"]]
    stripped = [s for s in sequences if s["nonzero_share"] < 0.5]

    def span(rows: list[dict], key: str) -> str:
        values = [r[key] for r in rows]
        return f"{min(values):g} - {max(values):g}"

    print(f"{len(cases)} cases, {len(sequences)} sequences, {len(labels)} label maps")
    print(f"distinct values: sequences {span(sequences, 'distinct')}, label maps {span(labels, 'distinct')}")
    print(f"max intensity: {span(sequences, 'max')}; negative share: {span(sequences, 'negative_share')}")
    print(f"nonzero share: skull-stripped {span(stripped, 'nonzero_share')}, all {span(sequences, 'nonzero_share')}")
    print(f"cv inside nonzero: skull-stripped {span(stripped, 'cv')}, all {span(sequences, 'cv')}")
    print(f"most common nonzero value: sequences {span(sequences, 'dominant_share')}, "
          f"label maps {span(labels, 'dominant_share')}")
    compared = [c for c in cases if "max_correlation" in c]
    print(f"largest correlation between two sequences of a case: {span(compared, 'max_correlation')}")
    for case in cases:
        verdict = "; ".join(case["problems"]) or "passes"
        notes = f" (warnings: {'; '.join(case['warnings'])})" if case["warnings"] else ""
        print(f"  {case['case']}: {verdict}{notes}")
    if args.json:
        Path(args.json).write_text(json.dumps(cases, indent=1))


if __name__ == "__main__":
    main()
