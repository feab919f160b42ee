"""Evaluate a folder of predicted label maps against ground truth: metrics.csv, summary.json, boxplot.png.

Pairing is by case id. The ground truth is a dataset folder (anything `discover_cases` reads; cases with a
segmentation count) or a flat folder of label NIfTIs. Predictions are label NIfTIs named ``<case_id>_seg.nii.gz``
(what ``neuromap segment`` writes), ``<case_id>.nii.gz``, or case folders holding one ``*_seg.nii.gz``. The id of
a label file is its name without the NIfTI extension and a trailing ``_seg``, ``-seg`` or ``_pred``; the id of a
case folder is the folder name.

LGG kaggle_3m slice folders (task "binary"): the ground truth is the patient folders' ``<case>_<N>_mask.tif``,
the predictions are ``<case_id>/`` folders of ``<case>_<N>_pred_mask.tif`` (what ``neuromap segment`` writes),
paired slice by slice on N. Each patient is scored in 3D over its slice stack (metrics.csv) and each slice in
2D (metrics_per_slice.csv). The spacing is unknown, so HD95 is in voxels (pixels within a slice) and sizes are
voxel counts. Per slice, the empty-mask conventions of `neuromap.metrics` apply: a slice where both masks are
empty scores Dice 1; since most slices are empty, the summary also gives the mean over the slices whose
ground truth has abnormality, the number that says how well abnormality is delineated.

Label conventions are per file: "auto" takes the convention of the dataset layout when it fixes one (MSD, BraTS
2023) and otherwise guesses from the values present (`neuromap.labels.guess_convention`). A BraTS 2012-2016 file
that happens to contain 3 but no 4 is read as BraTS 2023 by the guess, so name such datasets explicitly
(``gt_labels="brats2012"``). The conventions used are counted in summary.json.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from neuromap import lesionwise
from neuromap.config import MODALITY_ALIASES
from neuromap.errors import NeuroMapError
from neuromap.io import ImageRef, discover_cases, write_bytes_atomic
from neuromap.io.cases import nifti_stem, split_name_token
from neuromap.io.lgg import PRED_NAME, lgg_mask_files, read_lgg_masks
from neuromap.io.nifti import AFFINE_TOLERANCE, open_nifti, read_nifti, spatial_shape
from neuromap.labels import CONVENTIONS, as_integral, guess_convention, to_internal
from neuromap.metrics import CONVENTIONS_TEXT, binary_case_metrics, case_metrics
from neuromap.report import RESEARCH_NOTICE

LABEL_SUFFIXES = ("_seg", "-seg", "_pred")
OUTPUT_NAMES = ("metrics.csv", "summary.json", "boxplot.png")
SLICE_OUTPUT = "metrics_per_slice.csv"
ID_COLUMNS = ("case_id", "slice", "structure", "kind")
# task -> metrics function producing one row per structure; evaluation never lists structures itself.
TASKS: dict[str, Callable[..., list[dict]]] = {"brats": case_metrics, "binary": binary_case_metrics}
TABLE_METRICS = (("dice", "Dice"), ("iou", "IoU"), ("sensitivity", "Sens"), ("precision", "Prec"),
                 ("specificity", "Spec"), ("accuracy", "Acc"), ("hd95", "HD95"))
BOXPLOT_METRICS = (("dice", "Dice"), ("hd95", "HD95"))
HD95_UNITS = {False: "mm", True: "voxels (spacing unknown; pixels within a slice)"}  # keyed by "slice folders"
SLICE_CONVENTION = (
    "Per slice: 2D metrics on each slice, HD95 in pixels. Empty masks follow the conventions above: a slice "
    "where prediction and ground truth are both empty scores dice/iou/sensitivity/precision/specificity 1 and "
    "hd95 0; a false positive on an empty slice scores dice 0 and hd95 = the slice diagonal. Most slices are "
    "empty, which inflates the mean over all slices: 'slices_with_ground_truth' averages only the slices whose "
    "ground truth has abnormality."
)


@dataclass(frozen=True)
class LabelFile:
    """A label map for one case; ``convention`` is fixed by the dataset layout, or None to decide per file.
    ``path`` is a label NIfTI, or a slice folder (LGG) of binary mask TIFFs."""

    case_id: str
    path: Path
    convention: str | None = None

    @property
    def is_slice_folder(self) -> bool:
        return self.path.is_dir()


@dataclass
class PairResult:
    """Metric rows of one matched pair: per case, per slice for slice folders, per region's lesions (else empty)."""

    rows: list[dict]
    conventions: dict[str, str]
    slice_rows: list[dict]
    lesion_rows: list[dict] = field(default_factory=list)


def case_id_of(path: Path) -> str:
    """'Brats18_x_1_seg.nii.gz' -> 'Brats18_x_1': the name without NIfTI extension and label suffix."""
    stem = nifti_stem(path) or path.name
    for suffix in LABEL_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and nifti_stem(p))


def _is_mri_image(path: Path) -> bool:
    """True for an MRI sequence file (t1, t1ce, flair, ... in any supported naming), i.e. not a label map."""
    return split_name_token(nifti_stem(path) or "")[1] in MODALITY_ALIASES


def _index(files: list[LabelFile], side: str) -> dict[str, LabelFile]:
    by_id: dict[str, LabelFile] = {}
    for item in files:
        if item.case_id in by_id:
            raise NeuroMapError(
                f"{side}: two files for case '{item.case_id}': {by_id[item.case_id].path} and {item.path}. "
                "Fix: keep one label map per case."
            )
        by_id[item.case_id] = item
    return by_id


def _folder(root: str | Path, side: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise NeuroMapError(f"{root}: {side} folder does not exist (or is a file). Fix: give a folder.")
    return root


def prediction_files(root: str | Path) -> dict[str, LabelFile]:
    """Predicted label maps by case id: NIfTIs directly in ``root``, one ``*_seg``/``_pred`` per case folder, or
    case folders of per-slice ``*_pred_mask.tif`` (LGG)."""
    root = _folder(root, "prediction")
    found = [LabelFile(case_id_of(p), p) for p in _nifti_files(root)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        labels = [p for p in _nifti_files(sub) if case_id_of(p) != nifti_stem(p)]
        if len(labels) > 1:
            raise NeuroMapError(
                f"{sub}: several label maps ({', '.join(p.name for p in labels)}). "
                "Fix: keep one *_seg.nii.gz per case folder."
            )
        found += [LabelFile(sub.name, p) for p in labels]
        if not labels and any(PRED_NAME.match(p.name) for p in sub.iterdir()):
            found.append(LabelFile(sub.name, sub, "binary"))
    if not found:
        raise NeuroMapError(
            f"{root}: no predictions found (expected <case_id>_seg.nii.gz files, case folders holding one, or case "
            "folders of <slice>_pred_mask.tif). Fix: point to the output folder of `neuromap segment`."
        )
    return _index(found, "predictions")


def ground_truth_files(root: str | Path) -> dict[str, LabelFile]:
    """Ground-truth label maps by case id, from a flat folder of label NIfTIs or a dataset folder."""
    root = _folder(root, "ground-truth")
    flat = _nifti_files(root)
    if flat and not any(_is_mri_image(p) for p in flat):
        return _index([LabelFile(case_id_of(p), p) for p in flat], "ground truth")
    cases = [c for c in discover_cases(root) if c.seg is not None]
    if not cases:
        raise NeuroMapError(
            f"{root}: no case has a segmentation file. Fix: point to labelled data (e.g. <case>_seg.nii.gz next to "
            "the images) or to a folder of label NIfTIs."
        )
    for case in cases:
        if case.seg.channel is not None:
            raise NeuroMapError(f"{case.seg}: a 4D label file is not supported. Fix: give one 3D label map per case.")
    return _index([LabelFile(c.case_id, c.seg.path, c.label_convention) for c in cases], "ground truth")


def pair_cases(
    predictions: dict[str, LabelFile], truths: dict[str, LabelFile], allow_missing: bool = False
) -> tuple[list[tuple[LabelFile, LabelFile]], dict[str, list[str]]]:
    """Matched (prediction, ground truth) pairs sorted by case id, and the unmatched ids of each side.

    Unmatched ids are an error unless ``allow_missing``; then they are a warning (and still an error when
    nothing matches at all).
    """
    common = sorted(predictions.keys() & truths.keys())
    unmatched = {
        "predictions_without_ground_truth": sorted(predictions.keys() - truths.keys()),
        "ground_truth_without_prediction": sorted(truths.keys() - predictions.keys()),
    }
    if any(unmatched.values()):
        text = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v)}" for k, v in unmatched.items() if v)
        if not common or not allow_missing:
            raise NeuroMapError(
                f"case ids do not match ({text}). Fix: name predictions <case_id>_seg.nii.gz after the ground-truth "
                "case ids" + ("" if not common else ", or pass allow_missing=True (--allow-missing) to evaluate "
                f"only the {len(common)} matched case(s)") + "."
            )
        warnings.warn(f"evaluating {len(common)} matched case(s) only; unmatched: {text}", stacklevel=2)
    return [(predictions[i], truths[i]) for i in common], unmatched


def _check_convention(name: str, what: str) -> None:
    if name != "auto" and name not in CONVENTIONS:
        raise NeuroMapError(
            f"{what}: unknown label convention '{name}'. Fix: use 'auto' or one of {sorted(CONVENTIONS)}."
        )


def pair_grid(pred: LabelFile, gt: LabelFile) -> tuple[float, ...] | None:
    """Check from the headers that the prediction lies on the ground truth's voxel grid; return the voxel size in mm.

    Shape and voxel size must match (within AFFINE_TOLERANCE). A different affine with the same shape and voxel
    size (e.g. another origin or axis flip) is only warned about: metrics compare the arrays voxel by voxel.
    Slice folders must hold the same slice numbers (their size is checked when read); their spacing is unknown,
    so None is returned.
    """
    if pred.is_slice_folder or gt.is_slice_folder:
        if not (pred.is_slice_folder and gt.is_slice_folder):
            raise NeuroMapError(
                f"case '{gt.case_id}': {pred.path} and {gt.path} are not both slice folders or both label NIfTIs. "
                "Fix: compare LGG slice predictions with the LGG patient folders."
            )
        pred_numbers, gt_numbers = set(lgg_mask_files(pred.path, True)), set(lgg_mask_files(gt.path, False))
        if pred_numbers != gt_numbers:
            raise NeuroMapError(
                f"slice mismatch for case '{gt.case_id}': prediction {pred.path} lacks slices "
                f"{sorted(gt_numbers - pred_numbers)}, ground truth {gt.path} lacks masks for slices "
                f"{sorted(pred_numbers - gt_numbers)}. Fix: segment the complete patient folder."
            )
        return None
    pred_img, gt_img = open_nifti(pred.path, "prediction"), open_nifti(gt.path, "ground truth")
    pred_shape, gt_shape = spatial_shape(pred_img, ImageRef(pred.path)), spatial_shape(gt_img, ImageRef(gt.path))
    if pred_shape != gt_shape:
        raise NeuroMapError(
            f"shape mismatch for case '{gt.case_id}': prediction {pred.path} is {pred_shape}, ground truth "
            f"{gt.path} is {gt_shape}. Fix: write predictions in the ground truth's voxel grid."
        )
    ndim = len(gt_shape)
    zooms_gt = tuple(float(z) for z in gt_img.header.get_zooms()[:ndim])
    zooms_pred = tuple(float(z) for z in pred_img.header.get_zooms()[:ndim])
    if not np.allclose(zooms_pred, zooms_gt, atol=AFFINE_TOLERANCE, rtol=0):
        raise NeuroMapError(
            f"voxel size mismatch for case '{gt.case_id}': prediction {pred.path} has {zooms_pred} mm, "
            f"ground truth {gt.path} has {zooms_gt} mm. Fix: resample the prediction to the ground-truth grid."
        )
    if not np.allclose(pred_img.affine, gt_img.affine, atol=AFFINE_TOLERANCE):
        warnings.warn(
            f"case '{gt.case_id}': the affine of {pred.path} differs from {gt.path} (origin or orientation); "
            "voxels are compared as stored.", stacklevel=2,
        )
    return zooms_gt


def _load_labels(item: LabelFile, requested: str, task: str) -> tuple[np.ndarray, str]:
    """(labels for the task's metrics function, convention used) for one file."""
    raw = read_nifti(open_nifti(item.path, "label map"), ImageRef(item.path), integral=True)
    convention = item.convention if requested == "auto" else requested
    if task == "binary" and convention is None:
        return as_integral(raw, str(item.path)) != 0, "nonzero"
    convention = convention or guess_convention(np.unique(raw))
    labels = to_internal(raw, convention, source=str(item.path))
    return (labels != 0 if task == "binary" else labels), convention


def _load_slices(pred: LabelFile, gt: LabelFile) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Binary (rows, cols, N) stacks of a pair of slice folders and their slice numbers."""
    gt_files = lgg_mask_files(gt.path, predicted=False)
    gt_arr = read_lgg_masks(gt_files)
    pred_arr = read_lgg_masks(lgg_mask_files(pred.path, predicted=True))
    if pred_arr.shape != gt_arr.shape:
        raise NeuroMapError(
            f"shape mismatch for case '{gt.case_id}': predicted masks in {pred.path} are {pred_arr.shape[:2]}, "
            f"ground-truth masks in {gt.path} {gt_arr.shape[:2]}. Fix: predict on the original slices."
        )
    return pred_arr, gt_arr, list(gt_files)


def evaluate_pair(
    pred: LabelFile, gt: LabelFile, pred_labels: str = "auto", gt_labels: str = "auto", hd95: bool = True,
    task: str = "brats", lesion_rules: str | None = None,
) -> PairResult:
    """Metric rows (with case_id) for one matched pair, the label conventions used for each side, for slice
    folders one row per slice (with its slice number), scored in 2D by the same metrics function, and with
    ``lesion_rules`` the lesion-wise rows of `neuromap.lesionwise`."""
    spacing = pair_grid(pred, gt)
    metrics = TASKS[task]
    if not gt.is_slice_folder:
        pred_arr, pred_conv = _load_labels(pred, pred_labels, task)
        gt_arr, gt_conv = _load_labels(gt, gt_labels, task)
        rows = [{"case_id": gt.case_id, **row} for row in metrics(pred_arr, gt_arr, spacing, hd95=hd95)]
        lesions = []
        if lesion_rules:
            lesions = lesionwise.case_rows(gt.case_id, pred_arr, gt_arr, spacing, lesion_rules, hd95)
        return PairResult(rows, {"prediction": pred_conv, "ground_truth": gt_conv}, [], lesions)
    pred_arr, gt_arr, numbers = _load_slices(pred, gt)
    rows = [{"case_id": gt.case_id, **row} for row in metrics(pred_arr, gt_arr, None, hd95=hd95)]
    slice_rows = [
        {"case_id": gt.case_id, "slice": number, **row}
        for z, number in enumerate(numbers) for row in metrics(pred_arr[..., z], gt_arr[..., z], None, hd95=hd95)
    ]
    return PairResult(rows, {"prediction": "binary", "ground_truth": "binary"}, slice_rows)


def _stats(values: list[float]) -> dict[str, float | int]:
    """mean, sample standard deviation (0 for a single case), median and n."""
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "median": float(np.median(arr)), "n": int(arr.size)}


def metric_names(rows: list[dict]) -> list[str]:
    """The metric columns of metrics rows, in the order the metrics functions produce them."""
    return [k for k in rows[0] if k not in ID_COLUMNS]


def summarise(rows: list[dict]) -> list[dict]:
    """Per structure (in row order) and metric: mean, std, median, n over cases."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["structure"], row["kind"]), []).append(row)
    return [
        {"structure": name, "kind": kind, "metrics": {m: _stats([r[m] for r in group]) for m in metric_names(group)}}
        for (name, kind), group in groups.items()
    ]


def _label(entry: dict) -> str:
    return f"{entry['structure']} ({entry['kind']})"


def _hd95_short(summary: dict) -> str:
    return "HD95 (mm)" if summary.get("hd95_unit", "mm") == "mm" else "HD95 (vox)"


def format_table(summary: dict) -> str:
    """Fixed-width tables: one line per structure with mean±std of Dice, IoU, sensitivity, precision,
    specificity, accuracy, HD95 and n; for slice folders also per slice, over all slices and over the slices
    with ground-truth abnormality."""
    hd95_title = _hd95_short(summary)
    if "per_slice" not in summary:
        table, lesions = _table(summary["structures"], hd95_title), summary.get("lesion_wise")
        return f"{table}\n\n{lesionwise.format_table(lesions)}" if lesions else table
    slices = summary["per_slice"]
    tables = [("per case (3D over the slice stack)", summary["structures"]),
              ("per slice, all slices (both empty = Dice 1)", slices["all_slices"]),
              ("per slice, only slices with ground-truth abnormality", slices["slices_with_ground_truth"])]
    return "\n\n".join(f"{name}:\n{_table(entries, hd95_title)}" for name, entries in tables if entries)


def _table(entries: list[dict], hd95_title: str) -> str:
    width = max(len("structure"), *(len(_label(e)) for e in entries))
    titles = [hd95_title if key == "hd95" else title for key, title in TABLE_METRICS]
    header = f"{'structure':<{width}}  " + "  ".join(f"{title:>13}" for title in titles) + "    n"
    lines = [header, "-" * len(header)]
    for entry in entries:
        cells = []
        for key, _ in TABLE_METRICS:
            stat = entry["metrics"].get(key)
            digits = 2 if key == "hd95" else 3
            cells.append(f"{stat['mean']:.{digits}f}±{stat['std']:.{digits}f}" if stat else "-")
        n = next(iter(entry["metrics"].values()))["n"]
        lines.append(f"{_label(entry):<{width}}  " + "  ".join(f"{c:>13}" for c in cells) + f"  {n:>3}")
    return "\n".join(lines)


def _csv_bytes(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    ids = [k for k in ID_COLUMNS if k in rows[0]]
    writer = csv.DictWriter(buffer, fieldnames=[*ids, *metric_names(rows)], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _boxplot_png(rows: list[dict], n_cases: int, hd95_title: str) -> bytes:
    """Box plots of Dice and HD95 per region, with each case as a dot (samples are small)."""
    regions = list(dict.fromkeys(r["structure"] for r in rows if r["kind"] == "region"))
    metrics = [(key, hd95_title if key == "hd95" else title) for key, title in BOXPLOT_METRICS if key in rows[0]]
    fig = Figure(figsize=(max(5.0 * len(metrics), 6.5), 4.2))  # wide enough for the notice in the title
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)  # fixed jitter: the same inputs give the same picture
    for i, (key, title) in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        data = [[r[key] for r in rows if r["kind"] == "region" and r["structure"] == name] for name in regions]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(regions) + 1), regions)
        for pos, values in enumerate(data, start=1):
            ax.scatter(pos + rng.uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.7, color="tab:blue")
        ax.set_title(f"{title} per region (n = {n_cases} case{'s' if n_cases != 1 else ''})")
        ax.set_xlabel("region")
        ax.set_ylabel(title)
        ax.set_ylim(*((-0.02, 1.02) if key == "dice" else (0, None)))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"NeuroMap evaluation. {RESEARCH_NOTICE}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def evaluate(
    pred_dir: str | Path, gt_dir: str | Path, out_dir: str | Path, pred_labels: str = "auto", gt_labels: str = "auto",
    hd95: bool = True, overwrite: bool = False, allow_missing: bool = False, task: str = "brats",
    lesion_wise: bool = False, lesion_rules: str | None = None,
) -> dict:
    """Score every prediction in ``pred_dir`` against ``gt_dir`` and write metrics.csv, summary.json and
    boxplot.png into ``out_dir`` (for LGG slice folders also metrics_per_slice.csv); returns the summary (as
    written to summary.json). ``lesion_wise`` adds lesion_metrics.csv and summary["lesion_wise"] under
    ``lesion_rules`` ("brats-eval" by default, or "brats2023"; see `neuromap.lesionwise`).

    ``task`` "brats" scores the regions WT/TC/ET and classes NCR/ED/ET; "binary" scores one "abnormality"
    mask (nonzero voxels). Pairing, voxel grids and existing outputs are checked before any metric is
    computed; nothing is written unless every case was scored.
    """
    if task not in TASKS:
        raise NeuroMapError(f"unknown evaluation task '{task}'. Fix: use one of {list(TASKS)}.")
    _check_convention(pred_labels, "predictions")
    _check_convention(gt_labels, "ground truth")
    lesion_rules = lesionwise.check_request(lesion_wise, lesion_rules, task)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NeuroMapError(f"{out}: output path is a file. Fix: give a folder for the evaluation results.")
    pairs, unmatched = pair_cases(prediction_files(pred_dir), ground_truth_files(gt_dir), allow_missing)
    slice_folders = {gt.is_slice_folder for _, gt in pairs}
    if len(slice_folders) > 1:
        raise NeuroMapError("the ground truth mixes LGG slice folders and label NIfTIs. Fix: evaluate them apart.")
    per_slice = slice_folders == {True}
    if per_slice and task != "binary":
        raise NeuroMapError("LGG slice folders hold binary abnormality masks. Fix: pass --task binary.")
    extra_outputs = (*((SLICE_OUTPUT,) if per_slice else ()), *((lesionwise.OUTPUT_NAME,) if lesion_rules else ()))
    targets = {name: out / name for name in (*OUTPUT_NAMES, *extra_outputs)}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise NeuroMapError(f"output exists: {', '.join(existing)}. Fix: choose another output folder or --overwrite.")
    for pred, gt in pairs:  # headers only: a grid mismatch in the last case fails before minutes of work
        pair_grid(pred, gt)

    rows: list[dict] = []
    slice_rows: list[dict] = []
    lesion_rows: list[dict] = []
    used: dict[str, Counter] = {"prediction": Counter(), "ground_truth": Counter()}
    for pred, gt in pairs:
        result = evaluate_pair(pred, gt, pred_labels, gt_labels, hd95, task, lesion_rules)
        rows += result.rows
        slice_rows += result.slice_rows
        lesion_rows += result.lesion_rows
        for side, name in result.conventions.items():
            used[side][name] += 1

    summary = {
        "research_use_only": True,
        "notice": RESEARCH_NOTICE,
        "task": task,
        "n_cases": len(pairs),
        "cases": [gt.case_id for _, gt in pairs],
        "unmatched": unmatched,
        "label_conventions": {side: dict(counts) for side, counts in used.items()},
        "conventions": CONVENTIONS_TEXT,
        "hd95_unit": HD95_UNITS[per_slice],
        "std": "sample standard deviation (ddof=1) over cases; 0 for a single case",
        "structures": summarise(rows),
    }
    if per_slice:
        summary["per_slice"] = {
            "convention": SLICE_CONVENTION,
            "n_slices": len({(r["case_id"], r["slice"]) for r in slice_rows}),
            "std": "sample standard deviation (ddof=1) over slices",
            "all_slices": summarise(slice_rows),
            "slices_with_ground_truth": summarise([r for r in slice_rows if r["vol_gt_voxels"] > 0]),
        }
    if lesion_rules:
        summary["lesion_wise"] = lesionwise.summarise(lesion_rows, lesion_rules)
    summary["files"] = {name: str(path) for name, path in targets.items()}
    write_bytes_atomic(targets["metrics.csv"], _csv_bytes(rows), overwrite)
    if per_slice:
        write_bytes_atomic(targets[SLICE_OUTPUT], _csv_bytes(slice_rows), overwrite)
    if lesion_rules:
        write_bytes_atomic(targets[lesionwise.OUTPUT_NAME], lesionwise.csv_bytes(lesion_rows), overwrite)
    write_bytes_atomic(targets["summary.json"], json.dumps(summary, indent=2).encode(), overwrite)
    write_bytes_atomic(targets["boxplot.png"], _boxplot_png(rows, len(pairs), _hd95_short(summary)), overwrite)
    return summary
