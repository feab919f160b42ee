"""How fast are LGG kaggle_3m patient folders read? Every shared patient from folder to volume (discovery,
naming checks, every slice and mask decoded and checked, plausibility rules), against a reference measured in the
same run: tifffile decoding the same files and nothing else. Median of N runs after a warm-up (page cache warm).

    python benchmarks/lgg_load.py [--root DIR] [--runs 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import tifffile
from machine import cpu_info

from neuromap.io.layouts import discover_cases

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = ROOT.parent / "shared" / "data" / "lgg_kaggle_3m"


def load_all(root: Path) -> int:
    slices = 0
    for case in discover_cases(root):
        slices += case.layout.load(case).image.shape[-1]
    return slices


def decode_only(root: Path) -> int:
    files = sorted(root.glob("*/*.tif"))
    for path in files:
        tifffile.imread(path)
    return len(files)


def median_seconds(step, root: Path, runs: int) -> float:
    step(root)  # warm-up: page cache and imports
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step(root)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "lgg_load.json")
    args = parser.parse_args()
    patients = sum(1 for p in args.root.iterdir() if p.is_dir())
    slices = load_all(args.root)
    neuromap = median_seconds(load_all, args.root, args.runs)
    reference = median_seconds(decode_only, args.root, args.runs)
    result = {"cpu": cpu_info(), "patients": patients, "slices": slices, "runs": args.runs,
              "neuromap_s": round(neuromap, 3), "tifffile_decode_s": round(reference, 3),
              "ratio_to_decode": round(neuromap / reference, 2)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{patients} patients, {slices} slices: NeuroMap {neuromap:.2f} s, tifffile decode alone {reference:.2f} s "
          f"({neuromap / reference:.2f}x) on {result['cpu'].get('model', '?')}")


if __name__ == "__main__":
    main()
