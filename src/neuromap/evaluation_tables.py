"""How evaluation results are shown: summary statistics per structure, the fixed-width tables the CLI prints,
the CSV bytes and the box plot."""

from __future__ import annotations

import csv
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from neuromap import lesionwise
from neuromap.report import RESEARCH_NOTICE

ID_COLUMNS = ("case_id", "slice", "structure", "kind")
TABLE_METRICS = (("dice", "Dice"), ("iou", "IoU"), ("sensitivity", "Sens"), ("precision", "Prec"),
                 ("specificity", "Spec"), ("accuracy", "Acc"), ("hd95", "HD95"))
BOXPLOT_METRICS = (("dice", "Dice"), ("hd95", "HD95"))


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


def hd95_short(summary: dict) -> str:
    return "HD95 (mm)" if summary.get("hd95_unit", "mm") == "mm" else "HD95 (vox)"


def format_table(summary: dict) -> str:
    """Fixed-width tables: one line per structure with mean±std of Dice, IoU, sensitivity, precision,
    specificity, accuracy, HD95 and n; for slice folders also per slice, over all slices and over the slices
    with ground-truth abnormality."""
    hd95_title = hd95_short(summary)
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


def csv_bytes(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    ids = [k for k in ID_COLUMNS if k in rows[0]]
    writer = csv.DictWriter(buffer, fieldnames=[*ids, *metric_names(rows)], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def boxplot_png(rows: list[dict], n_cases: int, hd95_title: str) -> bytes:
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
