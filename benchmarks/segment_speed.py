"""End to end per case and cohort throughput of NeuroMap's default path, its PyTorch-eager path and a plain MONAI
pipeline of the same network and weights, in one run, with peak memory and the model stage's achieved GFLOP/s
against the CPU's measured fp32 matmul rate.

Variants, each in its own processes (so start-up and peak RSS are its own), interleaved run by run so drifting
load hits all of them:
  - default:     ``neuromap segment`` as shipped: engine auto (OpenVINO when installed), the next case read while
                 the model runs (``--workers 1``).
  - torch-eager: ``neuromap segment --engine torch --workers 0``: today's code without issue 13's engine and
                 overlapped reading (PyTorch eager, channels_last, cases read in turn).
  - release:     ``neuromap segment`` of the product as it was when issue 13 was filed (commit RELEASE_COMMIT,
                 extracted with ``git archive`` from this repository's history into a temporary folder and run with
                 the same Python environment): its own default model and code, i.e. "today's default" of the
                 issue's goal (at least 2x faster end to end on the same machine in the same run).
  - monai:       the pipeline a MONAI user writes for this model from the tutorials: LoadImaged,
                 EnsureChannelFirstd, ConcatItemsd, Orientationd(RAS), Spacingd(the model's spacing),
                 NormalizeIntensityd(nonzero, channel-wise), DivisiblePadd(the network's divisor, in-plane), the
                 model's 2.5D input (each sequence's slice and its neighbours as channels, zero beyond the ends),
                 SliceInferer over whole axial slices (NeuroMap's slice batch), sigmoid regions -> BraTS labels
                 (WT ⊇ TC ⊇ ET), Invertd, SaveImage. No brain crop, no postprocessing, no report or picture.
Measured:
  - per case (``--case``, a 240x240x155 BraTS case; ``--runs`` processes per variant): wall time of the whole
    process (Python start to files written: what a user waits), its CPU seconds (user + system, all threads: the
    work, which waiting for a busy CPU does not inflate) and its peak RSS;
  - cohort (the first ``--cohort`` cases of the shared BraTS 2018 folder, linked into a temporary folder): one
    process per variant segments the folder: cases per minute (wall and per CPU minute), peak RSS;
  - the model stage alone, in this process (nothing else running in it): each variant's network on the case as
    that variant feeds it (NeuroMap: the brain crop through `predict_probs` with the variant's engine; MONAI:
    its SliceInferer over whole slices), ``--runs`` times interleaved: wall and CPU seconds, and the achieved
    GFLOP per CPU second (network FLOPs from torch.utils.flop_counter) against the CPU's fp32 peak per CPU second
    (a 2048^2 torch.matmul, same threads). Per CPU second, because on a shared machine wall rates mostly measure
    the other jobs;
  - the load average and CPU pressure before and after every process, and per-region Dice of each variant's
    labels against the default's on the per-case case.
One untimed default run first fills the engine cache (the ONNX export and OpenVINO's compiled blob, made once per
machine and checkpoint), so the timed runs measure what every later run costs.

``--isa avx2`` runs everything (every variant's processes and the in-process model stage) with oneDNN and ATen
capped at AVX2 (`machine.ISA_ENV`), like the team's CPU; the default is the CPU's native ISA.

    python benchmarks/segment_speed.py [--case DIR] [--cohort 6] [--runs 3] [--threads 2] [--isa native|avx2]
                                       [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import ISA_ENV, cpu_info, load_now, matmul_peak_gflops, slice_model_flops

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brats2018"
DEFAULT_CASE = DATA / "Brats18_2013_2_1"
RESULT = ROOT / "benchmarks" / "results" / "segment_speed.json"
NEUROMAP_OPTIONS = {"default": [], "torch-eager": ["--engine", "torch", "--workers", "0"], "release": []}
IN_PROCESS = ("default", "torch-eager", "monai")  # the variants whose network the model stage times here
VARIANTS = (*IN_PROCESS, "release")  # the release's network runs only in its own processes
RELEASE_COMMIT = "ca06df9"  # the last commit before issue 13's work (138aef9 added the engines)


# ---------------------------------------------------------------------------------------------- child processes

def shipped_default():
    """The shipped model for four-sequence BraTS cases (what every variant runs): its file, network and spec."""
    from neuromap.checkpoint import load_model
    from neuromap.zoo import default_model

    path = default_model(["t1", "t1ce", "t2", "flair"], "brats").file
    return path, *load_model(path)


def monai_transform(spec):
    """The MONAI pre-transforms of the reference (module docstring), invertible by Invertd."""
    from monai import transforms as mt


    keys = spec.modalities
    return mt.Compose([
        mt.LoadImaged(keys), mt.EnsureChannelFirstd(keys), mt.ConcatItemsd(keys, "image"),
        mt.Orientationd("image", axcodes="RAS"), mt.Spacingd("image", pixdim=spec.preprocess.spacing),
        mt.NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        mt.DivisiblePadd("image", k=(spec.divisor,) * 2 + (1,)),
    ])


def monai_probabilities(net, spec, image):
    """The reference's model stage: the model's 2.5D input built from the (C, X, Y, Z) image (each sequence's
    slice and its neighbours as channels, zero beyond the ends), SliceInferer over whole axial slices in batches
    of 16, sigmoid regions (K, X, Y, Z)."""
    import torch
    from monai.inferers import SliceInferer

    context = spec.preprocess.context_slices
    padded = torch.nn.functional.pad(image, (context, context))
    stack = torch.stack([padded[..., k: k + image.shape[-1]] for k in range(2 * context + 1)], dim=1)
    x = stack.reshape(-1, *image.shape[1:])[None]
    inferer = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=16, progress=False)  # whole slices
    with torch.no_grad():
        return torch.sigmoid(inferer(x, lambda batch: net(batch.contiguous(memory_format=torch.channels_last))))[0]


def monai_reference(inputs: str, out: str) -> dict:
    """The plain MONAI pipeline (module docstring) on a case folder or a folder of cases, model loaded once.
    Returns the model stage's wall seconds."""
    import numpy as np
    import torch
    from monai import transforms as mt
    from monai.data import MetaTensor

    from neuromap.io import discover_cases

    _, net, spec = shipped_default()
    net = net.to(memory_format=torch.channels_last)
    transform = monai_transform(spec)
    model_s = 0.0
    for case in discover_cases(inputs):  # only to find each case's four files
        data = transform({k: str(case.images[k].path) for k in spec.modalities})
        start = time.perf_counter()
        probs = monai_probabilities(net, spec, data["image"].as_tensor().float())
        model_s += time.perf_counter() - start
        wt, tc, et = (probs > 0.5).numpy()
        labels = np.zeros(wt.shape, np.uint8)
        labels[wt], labels[wt & tc], labels[wt & tc & et] = 2, 1, 4
        data["pred"] = MetaTensor(torch.from_numpy(labels[None]), meta=data["image"].meta,
                                  applied_operations=data["image"].applied_operations)
        inverted = mt.Invertd("pred", transform, orig_keys="image", nearest_interp=True)(data)
        mt.SaveImage(output_dir=out, output_postfix="seg", output_dtype=np.uint8, separate_folder=False,
                     print_log=False)(inverted["pred"].astype(torch.uint8), meta_data=inverted["pred"].meta)
    return {"model_s": model_s}


def child(args: argparse.Namespace) -> None:
    """One measured process: the NeuroMap CLI (``--child cli -- ARGS``) or the MONAI reference; prints its peak
    RSS (and what it measured itself) as the last line."""
    if args.child == "cli":
        from neuromap.cli import main as neuromap_main

        code = neuromap_main(args.rest)
        if code:
            sys.exit(code)
        measured = {}
    else:
        import torch

        torch.set_num_threads(args.threads)
        measured = monai_reference(args.inputs, args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": round(peak, 1), **measured}))


# ---------------------------------------------------------------------------------------------- parent

def extract_release(folder: Path) -> Path | None:
    """The source tree of RELEASE_COMMIT in ``folder`` (its ``src`` goes first on the child's PYTHONPATH), or None
    when this checkout cannot provide it (no git, or a shallow clone without that commit)."""
    folder.mkdir()
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", RELEASE_COMMIT, "src"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"release variant skipped: commit {RELEASE_COMMIT} is not available here ({exc}); fetch the full "
              "history (git fetch --unshallow) to measure it", flush=True)
        return None
    return folder / "src"


def run(variant: str, inputs: Path, out: Path, threads: int, release_src: Path | None = None) -> dict:
    """One process of ``variant`` on ``inputs`` (a case or a folder of cases) writing into ``out``."""
    me = [sys.executable, __file__, "--threads", str(threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if variant == "release":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(release_src), env.get("PYTHONPATH")]))
    if variant == "monai":
        cmd = [*me, "--child", "monai", "--inputs", str(inputs), "--out", str(out)]
    else:
        cmd = [*me, "--child", "cli", "--", "segment", str(inputs), "-o", str(out), "--threads", str(threads),
               "--quiet", *NEUROMAP_OPTIONS[variant]]
    before, used = load_now(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # sums over waited children: the difference is this one
    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    if proc.returncode:
        raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*_report.json"))]
    if reports:
        result["model_s"] = sum(r["timings_s"]["inference_s"] for r in reports)
        result["engine"] = reports[0].get("engine", "torch").split(":")[0]  # the release's reports name none
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), **result, "load_before": before,
            "load_after": load_now()}


def model_stage(case: Path, runs: int) -> dict:
    """The model stage of each variant on ``case``, in this process (module docstring): wall and CPU seconds
    (median of ``runs``, interleaved) and the network FLOPs each variant spends."""
    import torch
    from timed import Timed  # here: the release's processes import this script, and its source has no engines

    from neuromap.config import InferenceConfig
    from neuromap.engines import resolve_engine, wrap_model
    from neuromap.engines.torch_runner import TorchModel
    from neuromap.inference import predict_probs
    from neuromap.io import discover_cases, load_case
    from neuromap.preprocess import prepare

    path, net, spec = shipped_default()
    default = wrap_model(net, spec, resolve_engine("auto"), path, fallback=True)
    net = net.to(memory_format=torch.channels_last)  # after wrap_model: an ONNX export leaves it contiguous
    volume = load_case(discover_cases(case)[0], spec.modalities)
    prepared = prepare(volume, spec.preprocess).image
    monai_image = monai_transform(spec)({k: str(volume.case.images[k].path) for k in spec.modalities})["image"]
    monai_image = monai_image.as_tensor().float()
    runners = {"default": default, "torch-eager": TorchModel(net)}
    cfg = InferenceConfig(device="cpu")
    flops = {"default": slice_model_flops(net, spec, prepared.shape[1:3], prepared.shape[-1])}
    flops["torch-eager"] = flops["default"]
    flops["monai"] = slice_model_flops(net, spec, monai_image.shape[1:3], monai_image.shape[-1])
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in IN_PROCESS}
    n = len(IN_PROCESS)
    for i in range(runs):
        for variant in IN_PROCESS[i % n:] + IN_PROCESS[: i % n]:
            if variant == "monai":
                timed = Timed(net)
                monai_probabilities(timed, spec, monai_image)
            else:
                timed = Timed(runners[variant])
                predict_probs([(timed, spec)], prepared, cfg)
            times[variant].append((timed.wall, timed.cpu))
    return {v: {"wall_s": round(statistics.median(w for w, _ in t), 2),
                "cpu_s": round(statistics.median(c for _, c in t), 2), "gflop": round(flops[v] / 1e9, 1),
                "network_input_shape": list((monai_image if v == "monai" else prepared).shape[1:])}
            for v, t in times.items()}


def agreement(outs: dict[str, Path]) -> dict:
    """Per-region Dice of each variant's labels against the default's (one case)."""
    import nibabel as nib
    import numpy as np

    from neuromap.labels import to_internal
    from neuromap.metrics import dice_per_region

    labels = {v: to_internal(np.asarray(nib.load(next(o.glob("*_seg.nii.gz"))).dataobj), "brats")
              for v, o in outs.items()}
    return {v: {k: round(d, 4) for k, d in dice_per_region(labels[v], labels["default"]).items()} for v in labels}


def summarize(per_case: dict, cohort: dict, stage: dict, peak: dict, n_cohort: int) -> dict:
    """One row per variant measured (``per_case``'s keys): medians over the per-case runs, cohort rates,
    model-stage rates, and how many times faster (less CPU) the default is than each."""
    variants = list(per_case)

    def median(v: str, key: str) -> float:
        return statistics.median(r[key] for r in per_case[v])

    rows = {}
    for v in variants:
        # variants outside IN_PROCESS (the release) have no model stage timed here
        stage_v = stage.get(v, {"wall_s": None, "cpu_s": None, "gflop": None})
        rows[v] = {
            "case_wall_s": round(median(v, "wall_s"), 2), "case_cpu_s": round(median(v, "cpu_s"), 2),
            "case_peak_rss_mb": max(r["peak_rss_mb"] for r in per_case[v]),
            "cohort_cases_per_min": round(n_cohort / cohort[v]["wall_s"] * 60, 2),
            "cohort_cases_per_cpu_min": round(n_cohort / cohort[v]["cpu_s"] * 60, 2),
            "cohort_peak_rss_mb": cohort[v]["peak_rss_mb"],
            "model_stage_wall_s": stage_v["wall_s"], "model_stage_cpu_s": stage_v["cpu_s"],
            "network_gflop": stage_v["gflop"],
            "gflop_per_cpu_s": round(stage_v["gflop"] / stage_v["cpu_s"], 1) if stage_v["gflop"] else None,
            "share_of_matmul_peak": round(stage_v["gflop"] / stage_v["cpu_s"] / peak["gflops_per_cpu_s_best"], 2)
            if stage_v["gflop"] else None,
        }
    for v in variants:
        rows[v]["default_faster_by"] = {
            "case_wall": round(rows[v]["case_wall_s"] / rows["default"]["case_wall_s"], 2),
            "case_cpu": round(rows[v]["case_cpu_s"] / rows["default"]["case_cpu_s"], 2),
            "cohort_wall": round(rows["default"]["cohort_cases_per_min"] / rows[v]["cohort_cases_per_min"], 2),
            "cohort_cpu": round(rows["default"]["cohort_cases_per_cpu_min"] / rows[v]["cohort_cases_per_cpu_min"], 2),
            "model_stage_cpu": round(rows[v]["model_stage_cpu_s"] / rows["default"]["model_stage_cpu_s"], 2)
            if rows[v]["model_stage_cpu_s"] else None,
        }
    return rows


def markdown(rows: dict, peak: dict) -> str:
    """The tables for the README."""
    lines = ["| variant | per case: wall s / CPU s (median) | peak RSS MB | cohort: cases/min (wall) / per CPU min "
             "| cohort peak RSS MB | model stage CPU s | GFLOP per CPU s (share of matmul peak) |",
             "|---|---|---|---|---|---|---|"]
    for v, r in rows.items():
        rate = f"{r['gflop_per_cpu_s']} ({r['share_of_matmul_peak']:.0%})" if r["gflop_per_cpu_s"] else "n/a"
        lines.append(f"| {v} | {r['case_wall_s']} / {r['case_cpu_s']} | {r['case_peak_rss_mb']:.0f} "
                     f"| {r['cohort_cases_per_min']} / {r['cohort_cases_per_cpu_min']} | {r['cohort_peak_rss_mb']:.0f} "
                     f"| {r['model_stage_cpu_s'] or 'n/a'} | {rate} |")
    lines += ["", "| default faster than | per case, wall / CPU | cohort, wall / CPU | model stage, CPU |",
              "|---|---|---|---|"]
    for v, r in rows.items():
        f = r["default_faster_by"]
        stage_cell = f"{f['model_stage_cpu']}x" if f["model_stage_cpu"] else "n/a"
        lines.append(f"| {v} | {f['case_wall']}x / {f['case_cpu']}x | {f['cohort_wall']}x / {f['cohort_cpu']}x "
                     f"| {stage_cell} |")
    lines.append(f"\nmatmul peak: {peak['gflops_per_cpu_s_best']:.1f} GFLOP per CPU s, {peak['gflops_wall_best']:.1f} "
                 f"GFLOP/s wall ({peak['threads']} threads)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default=str(DEFAULT_CASE))
    parser.add_argument("--cohort", type=int, default=6, help="cases of the shared BraTS 2018 folder (in name order)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", choices=sorted(ISA_ENV), default="native")
    parser.add_argument("--json", default=str(RESULT))
    parser.add_argument("--child", choices=["cli", "monai"], help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        child(args)
        return
    case = Path(args.case)
    if not case.is_dir() or not DATA.is_dir():
        sys.exit(f"{case} or {DATA} not found: the benchmark needs the shared BraTS 2018 cases (--case).")
    if any(os.environ.get(k) != v for k, v in ISA_ENV[args.isa].items()):  # libraries read it when they load:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_ENV[args.isa]})  # restart
    import torch

    torch.set_num_threads(args.threads)
    result = {"machine": cpu_info(), "isa": args.isa, "isa_env": ISA_ENV[args.isa], "threads": args.threads,
              "runs": args.runs, "case": str(case),
              "matmul_peak": matmul_peak_gflops()}
    with tempfile.TemporaryDirectory(prefix="neuromap-bench-") as tmp:
        tmp = Path(tmp)
        run("default", case, tmp / "warm-up", args.threads)  # fills the engine cache; not counted
        release = extract_release(tmp / "release")
        variants = VARIANTS if release else IN_PROCESS
        per_case: dict[str, list] = {v: [] for v in variants}
        outs = {}
        n = len(variants)
        for i in range(args.runs):
            for variant in variants[i % n:] + variants[: i % n]:
                outs[variant] = tmp / f"case-{variant}-{i}"
                per_case[variant].append(run(variant, case, outs[variant], args.threads, release))
                print(f"case run {i + 1}/{args.runs} {variant}: {per_case[variant][-1]['wall_s']} s", flush=True)
        result["per_case"] = per_case
        result["agreement_vs_default"] = agreement(outs)
        cohort_dir = tmp / "cohort"
        cohort_dir.mkdir()
        names = sorted(p.name for p in DATA.iterdir() if p.is_dir())[: args.cohort]
        for name in names:
            (cohort_dir / name).symlink_to(DATA / name)
        result["cohort_cases"] = names
        cohort = {}
        for variant in variants:
            cohort[variant] = run(variant, cohort_dir, tmp / f"cohort-{variant}", args.threads, release)
            print(f"cohort {variant}: {cohort[variant]['wall_s']} s for {len(names)} cases", flush=True)
        result["cohort"] = cohort
    result["model_stage"] = model_stage(case, args.runs)
    print(f"model stage: {result['model_stage']}", flush=True)
    result["machine"]["load_avg_end"] = os.getloadavg()
    result["summary"] = summarize(per_case, cohort, result["model_stage"], result["matmul_peak"], len(names))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["agreement_vs_default"]))
    print(markdown(result["summary"], result["matmul_peak"]))


if __name__ == "__main__":
    main()
