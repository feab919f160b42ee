"""End-to-end segmentation speed and peak memory on one real 240x240x155 case, against a plain MONAI reference.

NeuroMap: `neuromap.segment` (load + validate -> brain crop -> model -> back to the input grid -> seg NIfTI,
report JSON and overlay PNG written). Reference, same network and weights: the pipeline a MONAI user writes
from the tutorials at default settings: LoadImaged, EnsureChannelFirstd, Orientationd(RAS),
NormalizeIntensityd(nonzero, channel-wise), [Spacingd or Resized to the model's input], SliceInferer (2D
models) or sliding_window_inference (3D), Invertd, SaveImage. Each variant runs in its own process (so the peak
RSS is its own), several times; the median wall time and the max peak RSS are reported with their ratio.

    python benchmarks/segment_speed.py [--case DIR] [--model NAME|PATH] [--runs 5] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASE = ROOT.parent / "shared" / "data" / "brats2018" / "Brats18_2013_2_1"


def run_neuromap(case: str, model: str | None, out: str) -> None:
    import neuromap

    neuromap.segment(case, out, model=model, overwrite=True)


def run_monai_reference(case: str, model: str | None, out: str) -> None:
    import numpy as np
    import torch
    from monai import transforms as mt
    from monai.inferers import SliceInferer, sliding_window_inference

    from neuromap.checkpoint import load_model
    from neuromap.io import discover_cases
    from neuromap.zoo import resolve_model_paths

    (c,) = discover_cases(case)
    net, spec = load_model(resolve_model_paths(model, c.modalities, c.layout.task)[0])
    keys = spec.modalities
    pre = [
        mt.LoadImaged(keys), mt.EnsureChannelFirstd(keys), mt.ConcatItemsd(keys, "image"),
        mt.Orientationd("image", axcodes="RAS"), mt.NormalizeIntensityd("image", nonzero=True, channel_wise=True),
    ]
    if spec.model.spatial_dims == 2:
        pre.append(mt.Resized("image", spatial_size=(*spec.patch_size, -1)))
    elif spec.preprocess.spacing:
        pre.append(mt.Spacingd("image", pixdim=spec.preprocess.spacing))
    transform = mt.Compose(pre)
    data = transform({k: str(c.images[k].path) for k in keys})
    with torch.no_grad():
        x = data["image"][None].float()
        if spec.model.spatial_dims == 2:
            logits = SliceInferer(roi_size=spec.patch_size, spatial_dim=2, sw_batch_size=32)(x, net)
        else:
            logits = sliding_window_inference(x, spec.patch_size, 4, net)
    data["pred"] = logits[0].argmax(0, keepdim=True).to(torch.uint8)
    data["pred"].applied_operations = data["image"].applied_operations
    data["pred"].meta = data["image"].meta
    inverted = mt.Invertd("pred", transform, orig_keys="image", nearest_interp=True)(data)
    labels = np.asarray(inverted["pred"]).astype(np.uint8)
    mt.SaveImage(output_dir=out, output_postfix="seg", output_dtype=np.uint8, separate_folder=False,
                 print_log=False)(labels, meta_data=inverted["pred"].meta)


def child(variant: str, case: str, model: str | None, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        (run_neuromap if variant == "neuromap" else run_monai_reference)(case, model, out)
        seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def measure(variant: str, args: argparse.Namespace) -> dict:
    times, peaks = [], []
    for _ in range(args.runs):
        cmd = [sys.executable, __file__, "--child", variant, "--case", args.case, "--threads", str(args.threads)]
        if args.model:
            cmd += ["--model", args.model]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        times.append(result["seconds"])
        peaks.append(result["peak_rss_mb"])
    return {"median_s": statistics.median(times), "runs_s": [round(t, 2) for t in times],
            "peak_rss_mb": round(max(peaks), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default=str(DEFAULT_CASE))
    parser.add_argument("--model")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--child", choices=["neuromap", "monai"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.case, args.model, args.threads)
        return
    if not Path(args.case).is_dir():
        sys.exit(f"case folder {args.case} not found: pass --case (a 240x240x155 BraTS case).")
    ours, reference = measure("neuromap", args), measure("monai", args)
    result = {
        "case": args.case, "model": args.model or "shipped default", "runs": args.runs, "threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "neuromap": ours, "monai_reference": reference,
        "speedup": round(reference["median_s"] / ours["median_s"], 2),
        "memory_ratio": round(ours["peak_rss_mb"] / reference["peak_rss_mb"], 2),
        "targets": {"seconds_per_case": 10, "peak_rss_mb": 2048},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
