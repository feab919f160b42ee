"""`neuromap` command line: thin over the Python API; user mistakes print one message and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.options import DEFAULT_APP_WORKERS, FOLD, PORT, SLICE, THREADS, UPLOAD_MB, VOXEL_SIZE, WORKERS

EXIT_USER_ERROR = 2


def _parse_map(items: list[str] | None) -> dict[str, str] | None:
    """``--map t1ce=a.nii.gz flair=b.nii.gz`` or ``--map mapping.yaml``."""
    if not items:
        return None
    from neuromap.io import read_mapping_file

    if len(items) == 1 and "=" not in items[0]:
        return read_mapping_file(items[0])
    mapping = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise NeuroMapError(f"--map entry '{item}' is not MODALITY=FILE (e.g. t1ce=scan_t1c.nii.gz).")
        mapping[key] = value
    return mapping


def _model_arg(models: list[str] | None) -> str | list[str] | None:
    """``--model`` values as `Segmenter` takes them: one name or path, a list (an ensemble), or None (automatic)."""
    return models if models and len(models) > 1 else (models[0] if models else None)


def _runnable_models(case, models: list[str] | None) -> str:
    """Which models can segment ``case`` (for `validate`); a NeuroMapError naming the missing sequences when
    none can. Named models must each find their sequences; otherwise the shipped models of the case's task."""
    from neuromap.zoo import default_model, shipped_models, usable_models

    if not models:
        usable = usable_models(case.modalities, case.layout.task)
        if not usable:
            default_model(case.modalities, case.layout.task)  # raises the message `segment` would give
        return "shipped models that can segment it: " + ", ".join(m.name for m in usable)
    shipped = shipped_models()
    for name in models:
        if name in shipped:
            needs = list(shipped[name].modalities)
        else:
            from neuromap.checkpoint import ModelSpec, read_checkpoint

            needs = ModelSpec.from_dict(read_checkpoint(name)["spec"]).modalities
        missing = [m for m in needs if m not in case.modalities]
        if missing:
            raise NeuroMapError(
                f"model {name} needs {', '.join(needs)}; the case lacks {', '.join(missing)}. "
                "Fix: add the missing sequence files, or choose a model that needs only the sequences present."
            )
    return f"model{'s' if len(models) > 1 else ''} {', '.join(models)} can segment it"


def cmd_validate(args: argparse.Namespace) -> int:
    from neuromap.config import canonical_modality
    from neuromap.io import cases_from_inputs, validate_case

    modalities = [canonical_modality(m) for m in args.modalities.split(",")] if args.modalities else None
    failures = 0
    with cases_from_inputs(args.paths, _parse_map(args.map)) as cases:
        for case in cases:
            try:
                if args.raw:  # each sequence checked on its own grid
                    from neuromap.prepare_raw import RawOptions, as_raw

                    case = as_raw(case, RawOptions())
                warnings = validate_case(case, modalities)
                models = _runnable_models(case, args.model)
                seg = f", segmentation {case.seg.path.name}" if case.seg else ""
                naming = f"{case.naming}, raw" if args.raw else case.naming
                print(f"OK   {case.case_id} [{naming}] {', '.join(case.modalities)}{seg}\n     {models}")
                for warning in warnings:
                    print(f"     warning: {warning}")
            except NeuroMapError as exc:
                failures += 1
                print(f"FAIL {case.case_id}:\n  " + str(exc).replace("\n", "\n  "), file=sys.stderr)
    return EXIT_USER_ERROR if failures else 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from neuromap.config import PreprocessConfig, parse_config
    from neuromap.io import cases_from_inputs, load_case
    from neuromap.preprocess import prepare

    cfg = parse_config({
        "modalities": args.modalities.split(",") if args.modalities else PreprocessConfig().modalities,
        "n4": args.n4, "spacing": args.spacing, "mode": args.mode, "slice_range": args.slice_range,
        "normalize": not args.no_zscore,
    }, PreprocessConfig, source="preprocess options")
    with cases_from_inputs(args.paths, _parse_map(args.map)) as cases:
        for case in cases:
            volume = load_case(case, cfg.modalities)
            prepared = prepare(volume, cfg)
            inv = prepared.inverse
            print(json.dumps({
                "case": case.case_id, "layout": case.naming, "input_shape": list(inv.original_shape),
                "input_spacing_mm": list(volume.spacing), "orientation": "reoriented to RAS",
                "crop_bbox_ras": [list(b) for b in inv.bbox], "prepared_shape": list(prepared.image.shape),
                "prepared_spacing_mm": [round(s, 3) for s in prepared.spacing], "z_score": cfg.normalize,
                "n4": cfg.n4, "warnings": volume.warnings,
            }))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from neuromap.config import TrainConfig, load_yaml
    from neuromap.training import train

    cfg = load_yaml(args.config, TrainConfig)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.fold is not None:
        from neuromap.training.crossval import fold_config

        cfg = fold_config(cfg, args.fold)
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    scored = f"validation Dice {result.best_dice:.4f}" if result.best_dice >= 0 else "no validation cases"
    print(f"kept epoch {result.best_epoch} ({scored}); stopped by {result.stopped}; "
          f"checkpoint {result.best_checkpoint}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from neuromap.config import TrainConfig, load_yaml
    from neuromap.evaluation_tables import format_table
    from neuromap.training.crossval import out_of_fold, run_root, train_folds

    cfg = load_yaml(args.config, TrainConfig)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    folds = args.folds if args.folds is not None else list(range(cfg.split.folds))
    bad = [f for f in folds if not 0 <= f < cfg.split.folds]
    if bad:
        raise NeuroMapError(f"--folds {bad}: folds are 0..{cfg.split.folds - 1} (split.folds in {args.config}).")
    if not args.evaluate_only:
        train_folds(cfg, folds, progress=not args.quiet)
    summary = out_of_fold(cfg, folds, hd95=not args.no_hd95)
    print(format_table(summary))
    print(f"out-of-fold table: {run_root(cfg) / 'oof_table.md'} (n = {summary['n_cases']})")
    return 0


def _volumes_text(report: dict) -> str:
    """The task's headline volumes ('WT 12.3 mL, TC ...', or 'abnormality ...'); voxels where spacing is unknown."""
    from neuromap.tasks import get_task

    volumes, voxels = report["volumes_ml"], report["volume_voxels"]
    return ", ".join(
        f"{k} {volumes[k]:.1f} mL" if volumes[k] is not None else f"{k} {voxels[k]} voxels"
        for k in get_task(report["model"]["task"]).headline
    )


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from neuromap.cohort import Part
    from neuromap.config import InferenceConfig, parse_config
    from neuromap.io import cases_from_inputs
    from neuromap.quality import quality_text
    from neuromap.segmenter import Segmenter

    options = {"tta": args.tta, "device": args.device, "threads": args.threads, "workers": args.workers,
               "engine": args.engine, "uncertainty": args.uncertainty, "probabilities": args.probabilities,
               "skip_slices": False if args.all_slices else None,
               "picture_convention": "neurological" if args.neurological else None}
    cfg = parse_config({k: v for k, v in options.items() if v is not None}, InferenceConfig,
                       source="neuromap segment options")
    raw = _raw_options(args)
    part = Part.of(args.num_parts, args.part_id)
    with cases_from_inputs(args.inputs, _parse_map(args.map)) as cases:
        segmenter = Segmenter(_model_arg(args.model), cfg, args.labels, dicom_seg=args.dicom_seg, raw=raw)
        # Printed as each case is written (above the progress bar); results are not kept, so a cohort of any
        # size holds one case's labels at a time.
        for r in segmenter.iter_segment(cases, args.output_dir, args.overwrite, not args.quiet, part, args.resume):
            if r.skipped:
                tqdm.write(f"{r.case_id}: outputs complete, skipped (--continue) -> {r.labels_output}")
                continue
            lines = [f"{r.case_id}: {_volumes_text(r.report)} ({r.report['timings_s']['total_s']:.1f} s); "
                     f"{quality_text(r.report['quality'])} -> {r.labels_output}",
                     *(f"  review: {reason}" for reason in r.report["quality"]["reasons"]),
                     *(f"  warning: {w}" for w in r.report["warnings"])]
            tqdm.write("\n".join(lines))
    if part is not None:
        print(f"part {part.part_id} of {part.num_parts}: summary {part.summary_file(Path(args.output_dir))}")
    print("Research use only.")
    return 0


def _raw_options(args: argparse.Namespace):
    """``--raw`` and its companions as `RawOptions` (None without ``--raw``; companions alone are a mistake)."""
    companions = {"--reference": args.reference, "--skull-stripped": args.skull_stripped, "--n4": args.n4,
                  "--save-brain-mask": args.save_brain_mask, "--save-prepared": args.save_prepared}
    if not args.raw:
        given = [name for name, value in companions.items() if value]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise NeuroMapError(f"{', '.join(given)} only {verb} to raw scans. Fix: add --raw, or leave them out.")
        return None
    from neuromap.prepare_raw import RawOptions

    return RawOptions(reference=args.reference, skull_stripped=args.skull_stripped, n4=args.n4,
                      save_brain_mask=args.save_brain_mask, save_prepared=args.save_prepared, threads=args.threads)


def cmd_export(args: argparse.Namespace) -> int:
    from neuromap.engines.onnx_export import export_command

    print(export_command(args.model, args.format, args.output, args.overwrite))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from neuromap.evaluation import evaluate
    from neuromap.evaluation_tables import format_table

    summary = evaluate(args.pred_dir, args.gt_dir, args.output_dir, pred_labels=args.pred_labels,
                       gt_labels=args.gt_labels, hd95=not args.no_hd95, overwrite=args.overwrite,
                       allow_missing=args.allow_missing, task=args.task, lesion_wise=args.lesion_wise,
                       lesion_rules=args.lesion_rules)
    print(format_table(summary))
    print(f"wrote {', '.join(Path(p).name for p in summary['files'].values())} to {args.output_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Segment a generated case (always possible) and, when the team's data folder is there, a real one."""
    from neuromap.io import discover_cases
    from neuromap.labels import region_masks
    from neuromap.segmenter import segment
    from neuromap.synthetic import synthetic_arrays, write_synthetic_case

    out = Path(args.output_dir)
    shape = (160, 192, 144)
    synthetic = write_synthetic_case(out / "input" / "Synthetic_001", "Synthetic_001", shape=shape, seed=1)
    print(f"Demo input 1: a SYNTHETIC case generated by NeuroMap ({synthetic}; not anatomy, a smoke test of the "
          "whole pipeline on data the repo can make itself).")
    inputs = [synthetic]
    real_root = Path(args.data) / "brats2018"
    if real_root.is_dir():
        real = discover_cases(real_root)[0].root
        inputs.append(real)
        print(f"Demo input 2: the real BraTS 2018 case {real} from the team's data folder.")
    else:
        print(f"(No real case: {real_root} not found; pass --data to point at a data folder.)")
    results = segment(inputs, out / "output", model=args.model, overwrite=True)
    _, truth = synthetic_arrays(shape, seed=1)
    for r in results:
        v = r.report["volumes_ml"]
        print(f"  {r.case_id}: WT {v['WT']:.1f} mL, TC {v['TC']:.1f} mL, ET {v['ET']:.1f} mL in "
              f"{r.report['timings_s']['total_s']:.1f} s; files: {', '.join(str(p) for p in r.files.values())}")
    pred = region_masks(np.asarray(results[0].labels.dataobj) > 0)["WT"]
    wt = truth > 0
    print(f"  Synthetic case, whole-tumour Dice against its generated truth: "
          f"{2 * (pred & wt).sum() / max(pred.sum() + wt.sum(), 1):.3f} (synthetic data: not a measure of accuracy)")
    print("Research use only.")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """Run ``streamlit run neuromap/app.py`` on localhost; settings travel to the app as environment variables."""
    import importlib.util
    import math
    import os
    import signal
    import subprocess

    from neuromap.zoo import is_model, shipped_models

    if importlib.util.find_spec("streamlit") is None:
        raise NeuroMapError("the web app needs Streamlit. Fix: pip install 'neuromap[app]'.")
    env = {**os.environ, "NEUROMAP_APP_MAX_UPLOAD_MB": str(args.max_upload_mb),
           "NEUROMAP_APP_WORKERS": str(args.workers)}
    if args.model:
        if not is_model(args.model):
            raise NeuroMapError(f"--model {args.model}: not a shipped model name nor a checkpoint file.")
        env["NEUROMAP_APP_MODEL"] = args.model if args.model in shipped_models() else str(Path(args.model).resolve())
    app = Path(__file__).with_name("app.py")
    command = [
        sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
        "--server.address", "127.0.0.1", "--server.port", str(args.port),
        "--server.maxUploadSize", str(math.ceil(args.max_upload_mb)), "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
    ]
    print(f"NeuroMap web app: http://localhost:{args.port} (Ctrl+C stops it). Research use only.", flush=True)
    with subprocess.Popen(command, env=env) as server:
        # Stopping this command (Ctrl+C or kill) must stop the server too, never leave it running orphaned.
        previous = signal.signal(signal.SIGTERM, lambda *_: server.terminate())
        try:
            return server.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if server.poll() is None:
                server.terminate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuromap", description="Brain tumour segmentation in multimodal MRI. Research use only."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check case folders (files, shapes, affines, values, labels)")
    p.add_argument("paths", nargs="*", default=["."])
    p.add_argument("--modalities", help="comma list the cases must have, e.g. t1ce,flair")
    p.add_argument("--map", nargs="+", help="MODALITY=FILE pairs or a YAML mapping file (relative to the case "
                   "folder when one is given); DICOM: MODALITY=SERIES")
    p.add_argument("--model", nargs="+", help="check that these models (shipped names or checkpoints) can run, "
                   "instead of the shipped ones")
    p.add_argument("--raw", action="store_true", help="raw scans: check each sequence alone (grids may differ)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("preprocess", help="run preprocessing and print what it did (no files written)")
    p.add_argument("paths", nargs="*", default=["."])
    p.add_argument("--modalities")
    p.add_argument("--map", nargs="+")
    p.add_argument("--n4", action="store_true", help="N4 bias-field correction (SimpleITK)")
    p.add_argument("--spacing", nargs=3, type=VOXEL_SIZE, metavar=("X", "Y", "Z"), help="resample to this voxel "
                   "size in mm (0.1-10)")
    p.add_argument("--mode", choices=["3d", "2d"], default="3d")
    p.add_argument("--slice-range", nargs=2, type=SLICE, metavar=("START", "STOP"),
                   help="2D mode: axial slices [START, STOP) of the RAS volume (the seed design used 60 135)")
    p.add_argument("--no-zscore", action="store_true", help="skip z-scoring (data already normalised)")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="train a model from a YAML config (see configs/)")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue the run in the config's output_dir")
    p.add_argument("--output-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--fold", type=FOLD, help="train this cross-validation fold (k-fold split, folder fold_K)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="cross-validation: train every fold (resumable), score every case out of fold")
    p.add_argument("config")
    p.add_argument("--folds", type=FOLD, nargs="+", help="only these folds (default: all)")
    p.add_argument("--output-dir")
    p.add_argument("--evaluate-only", action="store_true", help="skip training; score the trained folds")
    p.add_argument("--no-hd95", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("segment", help="segment case(s): label NIfTI (LGG slice folders: per-slice mask TIFFs), "
                       "report JSON and overlay PNG per case")
    p.add_argument("inputs", nargs="*", help="case folder(s), a folder of cases, or a DICOM study folder")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--model", nargs="+", help="shipped model name or checkpoint path; several = ensemble")
    p.add_argument("--map", "--modalities", dest="map", nargs="+",
                   help="MODALITY=FILE pairs or a YAML mapping file (one case; relative to the case folder "
                   "when one is given); with a DICOM study MODALITY=SERIES (SeriesInstanceUID, series number or "
                   "exact description)")
    p.add_argument("--dicom-seg", action="store_true", help="DICOM input: also write <case>_seg.dcm (DICOM SEG)")
    raw = p.add_argument_group("raw scans (sequences on their own grids, skull on, thick slices)")
    raw.add_argument("--raw", action="store_true", help="co-register to a reference sequence, extract the brain "
                     "(deepbet), resample to 1 mm, segment, and write the labels on the reference's own grid")
    raw.add_argument("--reference", metavar="MOD", help="reference sequence (default t1ce, else flair)")
    raw.add_argument("--skull-stripped", action="store_true", help="inputs are already skull-stripped: brain = "
                     "non-zero voxels, no deepbet")
    raw.add_argument("--n4", action="store_true", help="N4 bias-field correction inside the brain")
    raw.add_argument("--save-brain-mask", action="store_true", help="also write <case>_brain_mask.nii.gz "
                     "(reference grid)")
    raw.add_argument("--save-prepared", action="store_true", help="also write <case>_<mod>_prepared.nii.gz "
                     "(co-registered, 1 mm)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation by flips")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write <case>_uncertainty.nii.gz (input grid): per-voxel entropy of the probabilities, "
                   "uint8 = round(255 x), the measure named in the report")
    p.add_argument("--probabilities", action="store_true",
                   help="also write <case>_probabilities.nii.gz (input grid, 4D): each region's (or tumour class's) "
                   "probability, uint8 = round(255 p)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--labels", choices=["brats", "internal", "brats2023", "msd"], default="brats",
                   help="output labels: brats = 1,2,4 (default); internal = 1,2,3")
    p.add_argument("--threads", type=THREADS)
    p.add_argument("--workers", type=int, metavar="N", help="batches: cases read ahead in background threads "
                   "while the model runs (default 1, 0 = none; each holds one case in memory)")
    p.add_argument("--engine", choices=["auto", "torch", "torch-compile", "onnxruntime", "openvino"], default="auto",
                   help="what runs the network; auto = fastest installed CPU engine, else PyTorch (default)")
    p.add_argument("--all-slices", action="store_true", help="2D models: run the network on every axial slice "
                   "(default: a coarse pass, then only the slices near tumour; measured free on the shared cases, "
                   "docs/experiments/skip_slices.md)")
    cluster = p.add_argument_group("cohorts on a cluster (nnU-Net's convention; see the README's SLURM example)")
    cluster.add_argument("--num-parts", type=int, metavar="N", help="split the cases into N parts (case ids sorted, "
                         "every N-th) and segment only --part-id's; writes summary_part_K_of_N.json")
    cluster.add_argument("--part-id", type=int, metavar="K", help="which part, 0..N-1 (e.g. $SLURM_ARRAY_TASK_ID)")
    cluster.add_argument("--continue", dest="resume", action="store_true", help="skip cases whose outputs are "
                         "complete; redo the others (replacing partial outputs of an interrupted run)")
    p.add_argument("--neurological", action="store_true",
                   help="overlay PNG in neurological convention (patient's right on the image's right); "
                   "default radiological (patient's right on the left, as PACS show it)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("export", help="write a model as ONNX (spec in its metadata; checked against PyTorch)")
    p.add_argument("model", help="shipped model name or checkpoint path")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("-o", "--output", help="output file (default: ./<model>.onnx)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="metrics per case, class and region (Dice, IoU, HD95, ...) + summary")
    p.add_argument("pred_dir")
    p.add_argument("gt_dir")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--pred-labels", default="auto", help="label convention of the predictions (auto = guess)")
    p.add_argument("--gt-labels", default="auto", help="label convention of the ground truth (auto = guess)")
    p.add_argument("--task", choices=["brats", "binary"], default="brats")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    p.add_argument("--allow-missing", action="store_true", help="evaluate matched cases, warn about the rest")
    p.add_argument("--lesion-wise", action="store_true",
                   help="also score lesion by lesion as BraTS does: lesion_metrics.csv + summary 'lesion_wise'")
    p.add_argument("--lesion-rules", metavar="RULES",
                   help="brats-eval (default: the organisers' brats-evaluation package) or brats2023 (2023 rules)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="segment a generated case (and a real one if ../shared/data is present)")
    p.add_argument("-o", "--output-dir", default="demo_out")
    p.add_argument("--data", default="../shared/data", help="team data folder (optional)")
    p.add_argument("--model", help="shipped model name or checkpoint (default: the shipped model)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("app", help="start the web app (Streamlit) on localhost")
    p.add_argument("--port", type=PORT, default=8501)
    p.add_argument("--max-upload-mb", type=UPLOAD_MB, default=300, help="upload limit per case in MB (default 300)")
    p.add_argument("--model", help="also offer this checkpoint path (or shipped model name) in the model list")
    p.add_argument("--workers", type=WORKERS, default=DEFAULT_APP_WORKERS,
                   help="segmentations run at a time, for all users together; the others wait in a queue and their "
                        f"pages show their place (default {DEFAULT_APP_WORKERS}: one case in memory at a time)")
    p.set_defaults(func=cmd_app)
    return parser


def _warning_printer(command: str):
    """Warnings as one line each, said once, in the CLI's own voice: Python's default format shows the source line
    that raised them, which reads like the start of a traceback to a user."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text not in seen:
            seen.add(text)
            print(f"neuromap {command}: warning: {text}", file=sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _warning_printer(args.command)
    try:
        return args.func(args)
    except NeuroMapError as exc:
        print(f"neuromap {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
