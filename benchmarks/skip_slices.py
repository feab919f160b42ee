"""Skipping axial slices that cannot hold tumour (issue 13 item 2): labels, Dice and model-stage time of the
default model with ``InferenceConfig.skip_slices`` on (coarse pass, then the tumour's slice range:
`neuromap.inference.near_tumour`) against off (every slice), on every shared BraTS 2018 case.

Per case, both settings go through the normal `Segmenter.segment_case` path (shipped default model, engine auto,
``--threads`` threads), in alternating order so drifting load hits both. Measured:
  - the model stage: wall and CPU seconds of `predict_probs` (the network calls plus the skip's own work; CPU
    seconds, all threads of this process, are the robust number on a shared machine), and how many axial slices
    the network ran; the same for the quality estimate's second pass (the mirrored scan, `neuromap.quality`),
    and its score and flag with each setting;
  - the labels (input grid, after postprocessing): voxels that differ between the two settings, Dice per region
    (WT/TC/ET) of each against the expert labels; and voxels that differ before postprocessing (prepared space:
    tumour the skip left out that postprocessing would have removed);
  - what preprocessing already does: the prepared (brain-cropped) volume's slices, and how many of them have no
    brain signal in their whole 2.5D input stack (the "background-only slices" a skip could still save);
  - the thinnest run of consecutive slices on which the full pass finds tumour (prepared space, before
    postprocessing): the skip's guarantee covers runs at least ``skip_stride_mm`` thick;
  - a sweep of ``skip_stride_mm`` x ``skip_margin_mm`` replayed on the full pass's own probabilities (slices the sweep
    setting would skip become background, then the same labels and postprocessing as `segment`), for choosing
    the default: slices run, voxels that differ, Dice change. The replay of the shipped setting is checked against
    the real run (``replay_vs_real_voxels``).
The 22 cases trained the shipped model (its card), so the Dice values are training-set fits; what this measures
is the change between the settings, not the model's quality.

    python benchmarks/skip_slices.py [--cases 22] [--threads 2] [--json benchmarks/results/skip_slices.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from machine import cpu_info, load_now
from timed import Timed

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brats2018"
RESULT = ROOT / "benchmarks" / "results" / "skip_slices.json"
REGIONS = ("WT", "TC", "ET")
SWEEP_STRIDES_MM = (2.0, 4.0, 8.0)
SWEEP_MARGINS_MM = (1.0, 2.0, 4.0)


class StageRecorder:
    """Stands in for `neuromap.segmenter.predict_probs`, which `segment` calls once for the labels and again for
    the quality estimate (the mirrored scan): calls it and keeps, per call since `reset`, its wall and CPU seconds
    and the slices given to the network, and the probabilities and prepared image of the first (the labels')."""

    def __init__(self, predict) -> None:
        self.predict = predict
        self.reset()

    def reset(self) -> None:
        self.calls: list[dict] = []
        self.probs = self.image = None

    def __call__(self, models, image, cfg, device="cpu", spacing=None):
        counted = [(Timed(runner), spec) for runner, spec in models]
        wall, cpu = time.perf_counter(), time.process_time()
        probs = self.predict(counted, image, cfg, device=device, spacing=spacing)
        call = {"slices": sum(timed.slices for timed, _ in counted), "wall": time.perf_counter() - wall,
                "cpu": time.process_time() - cpu}
        if not self.calls:
            self.probs, self.image = probs, image
        self.calls.append(call)
        return probs


class RecordingSegmenter:
    """A `Segmenter` whose last prepared case is kept (for the sweep's inverse mapping)."""

    def __new__(cls, cfg):
        from neuromap.segmenter import Segmenter

        class Recording(Segmenter):
            def _read(self, *args, **kwargs):
                read = super()._read(*args, **kwargs)
                self.last = read
                return read

        return Recording(None, cfg, "internal")


def slice_runs(per_slice) -> list[int]:
    """Lengths of the runs of consecutive True in a 1D bool array."""
    import numpy as np

    padded = np.concatenate([[False], np.asarray(per_slice, bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return (edges[1::2] - edges[::2]).tolist()


def sweep(read, probs, truth, full_labels, cfg) -> dict:
    """Each stride x margin (mm) replayed on the full pass's probabilities: slices run, voxels off, Dice."""
    from neuromap.export import labels_in_input_grid
    from neuromap.inference import near_tumour, skip_steps
    from neuromap.metrics import dice_per_region
    from neuromap.postprocess import postprocess
    from neuromap.tasks import task_of

    task = task_of(read.models[0][1])
    depth = probs.shape[-1]
    out = {}
    for stride_mm in SWEEP_STRIDES_MM:
        for margin_mm in SWEEP_MARGINS_MM:
            setting = cfg.model_copy(update={"skip_stride_mm": stride_mm, "skip_margin_mm": margin_mm})
            steps = skip_steps(setting, read.prepared.spacing)
            replay, ran = near_tumour(lambda index: probs[..., index], depth, task, *steps)
            labels, _ = postprocess(labels_in_input_grid(replay, read.prepared.inverse, task), read.volume.voxel_ml,
                                    cfg, task.postprocess_steps())
            out[f"{stride_mm:g}/{margin_mm:g}"] = {"slices_run": int(ran.sum()),
                                                   "voxels_differ": int((labels != full_labels).sum()),
                                                   "dice_vs_truth": dice_per_region(labels, truth), "labels": labels}
    return out


def measure_case(case, segmenters, recorder, order, truth) -> dict:
    import numpy as np

    from neuromap.metrics import dice_per_region
    from neuromap.tasks import task_of

    rows, labels, kept = {}, {}, {}
    for setting in order:
        segmenter = segmenters[setting]
        load = load_now()
        recorder.reset()
        result = segmenter.segment_case(case)
        labels[setting] = np.asarray(result.labels.dataobj)
        main, *quality = recorder.calls
        rows[setting] = {"model_wall_s": main["wall"], "model_cpu_s": main["cpu"], "slices_run": main["slices"],
                         "quality_passes_cpu_s": sum(c["cpu"] for c in quality),
                         "quality_passes_slices": sum(c["slices"] for c in quality),
                         "all_passes_cpu_s": sum(c["cpu"] for c in recorder.calls), "load": load,
                         "dice_vs_truth": dice_per_region(labels[setting], truth),
                         "quality": {k: result.report["quality"][k] for k in ("score", "flag")} |
                         {"flip_dice": result.report["quality"]["signals"]["flip_dice"]}}
        kept[setting] = (segmenter.last, recorder.probs, recorder.image)
    read, probs, image = kept["full"]
    task = task_of(read.models[0][1])
    tumour = task.labels(probs).any(axis=(0, 1))
    context = read.models[0][1].preprocess.context_slices
    signal = np.abs(image).sum(axis=(0, 1, 2)) > 0
    stacks = np.convolve(signal, np.ones(2 * context + 1), mode="same") > 0
    skip_cfg = segmenters["skip"].cfg
    replay = sweep(read, probs, truth, labels["full"], skip_cfg)
    shipped = replay[f"{skip_cfg.skip_stride_mm:g}/{skip_cfg.skip_margin_mm:g}"]
    info = {
        "prepared_slices": int(probs.shape[-1]),
        "slices_without_signal_in_stack": int((~stacks).sum()),
        "full_pass_tumour_on_those": int((tumour & ~stacks).sum()),
        "full_pass_tumour_slice_runs": slice_runs(tumour),
        "voxels_differ": int((labels["skip"] != labels["full"]).sum()),
        "voxels_differ_before_postprocess": int((task.labels(kept["skip"][1]) != task.labels(probs)).sum()),
        "tumour_voxels_full": int((labels["full"] > 0).sum()),
        "replay_vs_real_voxels": int((shipped["labels"] != labels["skip"]).sum()),
    }
    for entry in replay.values():
        del entry["labels"]
    return {**info, **rows, "sweep": replay}


def summarize(cases: dict, cfg) -> dict:
    rows = list(cases.values())
    full = [c["full"] for c in rows]
    skip = [c["skip"] for c in rows]
    pairs = list(zip(skip, full, strict=True))
    prepared = sum(c["prepared_slices"] for c in rows)

    def total(key: str, items=rows) -> int:
        return sum(c[key] for c in items)

    def mean_dice(items, region):
        return statistics.fmean(r["dice_vs_truth"][region] for r in items)

    def ratio(key: str) -> dict:
        """skip / full of a per-setting number: the median of the per-case ratios, and of the sums."""
        return {"median_of_cases": round(statistics.median(s[key] / f[key] for s, f in pairs), 3),
                "sum": round(sum(s[key] for s, _ in pairs) / sum(f[key] for _, f in pairs), 3)}

    sweep = {}
    for key in rows[0]["sweep"]:
        entries = [c["sweep"][key] for c in rows]
        sweep[key] = {
            "slices_run_share": round(total("slices_run", entries) / prepared, 3),
            "cases_with_differences": sum(e["voxels_differ"] > 0 for e in entries),
            "voxels_differ_total": total("voxels_differ", entries),
            "mean_dice_change": {r: round(mean_dice(entries, r) - mean_dice(full, r), 5) for r in REGIONS},
            "max_abs_case_dice_change": {r: round(max(abs(e["dice_vs_truth"][r] - f["dice_vs_truth"][r])
                                                      for e, f in zip(entries, full, strict=True)), 5)
                                         for r in REGIONS},
        }
    return {
        "n_cases": len(rows),
        "setting": {"skip_stride_mm": cfg.skip_stride_mm, "skip_margin_mm": cfg.skip_margin_mm},
        "mean_dice_full": {r: round(mean_dice(full, r), 4) for r in REGIONS},
        "mean_dice_skip": {r: round(mean_dice(skip, r), 4) for r in REGIONS},
        "max_abs_case_dice_change": {r: round(max(abs(s["dice_vs_truth"][r] - f["dice_vs_truth"][r])
                                                  for s, f in pairs), 5) for r in REGIONS},
        "cases_with_label_differences": sum(c["voxels_differ"] > 0 for c in rows),
        "voxels_differ_total": total("voxels_differ"),
        "before_postprocess": {"cases_with_differences": sum(c["voxels_differ_before_postprocess"] > 0 for c in rows),
                               "voxels_differ_total": total("voxels_differ_before_postprocess")},
        "slices_run_share": round(total("slices_run", skip) / prepared, 3),
        "cpu_ratio_skip_over_full": ratio("model_cpu_s"),
        "wall_ratio_skip_over_full": ratio("model_wall_s"),
        "model_cpu_s_median": {"full": round(statistics.median(f["model_cpu_s"] for f in full), 2),
                               "skip": round(statistics.median(s["model_cpu_s"] for s in skip), 2)},
        "with_quality_pass": {
            "cpu_ratio_skip_over_full": ratio("all_passes_cpu_s"),
            "score_max_abs_change": round(max(abs(s["quality"]["score"] - f["quality"]["score"]) for s, f in pairs), 4),
            "flags_differ": sum(s["quality"]["flag"] != f["quality"]["flag"] for s, f in pairs),
            "review_flags": {"full": sum(f["quality"]["flag"] == "review" for f in full),
                             "skip": sum(s["quality"]["flag"] == "review" for s in skip)}},
        "slices_without_signal_in_stack": {"total": total("slices_without_signal_in_stack"),
                                           "of_prepared_slices": prepared,
                                           "full_pass_tumour_on_those": total("full_pass_tumour_on_those")},
        "thinnest_full_pass_tumour_run": min(min(c["full_pass_tumour_slice_runs"], default=0) for c in rows),
        "replay_vs_real_voxels_total": total("replay_vs_real_voxels"),
        "sweep_stride/margin": sweep,
    }


def markdown(summary: dict, cases: dict) -> str:
    """Per-case and mean table for docs/experiments/skip_slices.md, then the sweep."""
    lines = ["| case | slices run / prepared | voxels differ | Dice full WT/TC/ET | Dice skip WT/TC/ET "
             "| CPU s labels' pass, full -> skip | with the quality pass | quality score full -> skip |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in cases.items():
        full, skip = c["full"], c["skip"]
        dice = {k: " / ".join(f"{row['dice_vs_truth'][r]:.4f}" for r in REGIONS) for k, row in
                (("full", full), ("skip", skip))}
        lines.append(f"| {name} | {skip['slices_run']} / {c['prepared_slices']} | {c['voxels_differ']} "
                     f"| {dice['full']} | {dice['skip']} | {full['model_cpu_s']:.1f} -> {skip['model_cpu_s']:.1f} "
                     f"| {full['all_passes_cpu_s']:.1f} -> {skip['all_passes_cpu_s']:.1f} "
                     f"| {full['quality']['score']:.3f} -> {skip['quality']['score']:.3f} |")
    mean = {k: " / ".join(f"{summary[f'mean_dice_{k}'][r]:.4f}" for r in REGIONS) for k in ("full", "skip")}
    quality = summary["with_quality_pass"]
    lines.append(f"| **mean (n={summary['n_cases']})** | {summary['slices_run_share']:.0%} "
                 f"| {summary['voxels_differ_total']} | {mean['full']} | {mean['skip']} "
                 f"| ratio {summary['cpu_ratio_skip_over_full']['median_of_cases']} (median) "
                 f"| ratio {quality['cpu_ratio_skip_over_full']['median_of_cases']} (median) "
                 f"| max change {quality['score_max_abs_change']} |")
    lines += ["", "| stride / margin (mm) | slices run | cases with differences | voxels differ "
              "| mean Dice change WT/TC/ET |", "|---|---|---|---|---|"]
    for key, s in summary["sweep_stride/margin"].items():
        change = " / ".join(f"{s['mean_dice_change'][r]:+.5f}" for r in REGIONS)
        lines.append(f"| {key} | {s['slices_run_share']:.0%} | {s['cases_with_differences']} "
                     f"| {s['voxels_differ_total']} | {change} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=22, help="the first N shared BraTS cases (sorted)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(RESULT))
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: the benchmark needs the shared BraTS 2018 cases.")
    import nibabel as nib
    import numpy as np
    import torch

    import neuromap.segmenter as segmenter_module
    from neuromap.config import InferenceConfig
    from neuromap.io import discover_cases
    from neuromap.labels import to_internal

    torch.set_num_threads(args.threads)
    recorder = StageRecorder(segmenter_module.predict_probs)
    segmenter_module.predict_probs = recorder  # the one change to the segment path: the model stage is timed
    base = {"threads": args.threads, "device": "cpu", "workers": 0}
    segmenters = {"full": RecordingSegmenter(InferenceConfig(**base, skip_slices=False)),
                  "skip": RecordingSegmenter(InferenceConfig(**base, skip_slices=True))}
    names = sorted(p.name for p in DATA.iterdir() if p.is_dir())[: args.cases]
    out = {"machine": cpu_info(), "threads": args.threads, "torch": torch.__version__,
           "engine": segmenters["skip"].engine, "cases": {}}
    segmenters["full"].segment_case(discover_cases(DATA / names[0])[0])  # untimed: fills the engine cache
    for index, name in enumerate(names):
        case = discover_cases(DATA / name)[0]
        truth = to_internal(np.asarray(nib.load(case.seg.path).dataobj), "brats")
        order = ("full", "skip") if index % 2 == 0 else ("skip", "full")
        out["cases"][name] = measure_case(case, segmenters, recorder, order, truth)
        c = out["cases"][name]
        print(f"{name}: slices {c['skip']['slices_run']}/{c['prepared_slices']}, voxels differ {c['voxels_differ']}, "
              f"cpu {c['full']['model_cpu_s']:.1f} -> {c['skip']['model_cpu_s']:.1f} s", flush=True)
    out["machine"]["load_end"] = load_now()
    out["summary"] = summarize(out["cases"], segmenters["skip"].cfg)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    print(markdown(out["summary"], out["cases"]))


if __name__ == "__main__":
    main()
