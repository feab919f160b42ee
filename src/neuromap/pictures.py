"""Pictures a person reads at a glance: three views through the tumour centre, or a montage of slices for slice
stacks without a known spacing. Legend text and colours come from the model's task (`neuromap.tasks`)."""

from __future__ import annotations

import io as _io

import numpy as np

from neuromap.glyphs import drawable
from neuromap.report import RESEARCH_NOTICE

TRUTH_COLOUR = (0.2, 0.9, 1.0)
Colours = dict[int, tuple[float, float, float]]


def intensity_window(background: np.ndarray) -> tuple[float, float]:
    """Display range: 0.5-99.5th percentile of the nonzero background, so a few bright voxels do not wash it out."""
    if not np.any(background):
        return 0.0, 1.0
    lo, hi = np.percentile(background[background != 0], [0.5, 99.5])
    return float(lo), float(hi)


def _rgba(labels: np.ndarray, colours: Colours, alpha: float) -> np.ndarray:
    rgba = np.zeros(labels.shape + (4,))
    for value, colour in colours.items():
        rgba[labels == value] = (*colour, alpha)
    return rgba


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _suptitle(fig, text: str, fontsize: float) -> None:
    """The figure title in fonts that draw every character of it (case names may be in any script)."""
    shown, families = drawable(text)
    fig.suptitle(shown, fontsize=fontsize, fontfamily=families)


def tumour_centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Centre of mass of the tumour, or the volume centre when nothing was found."""
    idx = np.argwhere(labels > 0)
    if len(idx) == 0:
        return tuple(s // 2 for s in labels.shape)
    return tuple(int(round(v)) for v in idx.mean(axis=0))


def overlay_png(background: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float], title: str,
                legend: dict[int, str], colours: Colours, alpha: float = 0.45) -> bytes:
    """Axial, coronal and sagittal slices through the tumour centre with a colour legend.

    Inputs are RAS-ordered arrays (x right, y anterior, z superior) so the pictures have a fixed, radiological-free
    layout: anterior up in axial views, superior up in the others.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cx, cy, cz = tumour_centre(labels)
    lo, hi = intensity_window(background)
    views = [
        ("axial", background[:, :, cz], labels[:, :, cz], spacing[1] / spacing[0]),
        ("coronal", background[:, cy, :], labels[:, cy, :], spacing[2] / spacing[0]),
        ("sagittal", background[cx, :, :], labels[cx, :, :], spacing[2] / spacing[1]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for ax, (name, img, lab, aspect) in zip(axes, views, strict=True):
        ax.imshow(img.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        ax.imshow(_rgba(lab.T, colours, alpha), origin="lower", aspect=aspect)
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=colours[k], label=text) for k, text in legend.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9)
    _suptitle(fig, f"{title}\n{RESEARCH_NOTICE}", 10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _png(fig)


def montage_slices(labels: np.ndarray, truth: np.ndarray | None, limit: int) -> list[int]:
    """Slice indices (last axis) worth showing: those with predicted or true abnormality, evenly thinned to
    ``limit``; the middle slices when no slice has any."""
    present = labels.any(axis=(0, 1))
    if truth is not None:
        present |= truth.any(axis=(0, 1))
    chosen = np.flatnonzero(present)
    if len(chosen) == 0:
        middle, depth = labels.shape[-1] // 2, labels.shape[-1]
        chosen = np.arange(max(0, middle - limit // 4), min(depth, middle + limit // 4))
    if len(chosen) > limit:
        chosen = chosen[np.linspace(0, len(chosen) - 1, limit).round().astype(int)]
    return [int(z) for z in chosen]


def montage_png(background: np.ndarray, labels: np.ndarray, slice_names: list[str], title: str,
                legend: dict[int, str], colours: Colours, truth: np.ndarray | None = None, limit: int = 20,
                alpha: float = 0.45) -> bytes:
    """A grid of slices (last axis) with the prediction filled and the ground truth, if given, outlined.

    For slice stacks whose spacing is unknown (LGG kaggle_3m), where coronal and sagittal views would be
    distorted. Slices are drawn as their files appear (array rows down, columns right), so a picture can be
    compared with the .tif it came from.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    shown = montage_slices(labels, truth, limit)
    cols = min(5, len(shown))
    rows = -(-len(shown) // cols)
    lo, hi = intensity_window(background)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows + 0.9), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, z in zip(axes.flat, shown, strict=False):
        ax.imshow(background[:, :, z], cmap="gray", vmin=lo, vmax=hi)
        ax.imshow(_rgba(labels[:, :, z], colours, alpha))
        if truth is not None and truth[:, :, z].any():
            ax.contour(truth[:, :, z] > 0, levels=[0.5], colors=[TRUTH_COLOUR], linewidths=0.8)
        ax.set_title(slice_names[z], fontsize=8)
    handles = [Patch(color=colours[k], label=text) for k, text in legend.items()]
    if truth is not None:
        handles.append(Line2D([], [], color=TRUTH_COLOUR, label="ground truth (outline)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=8)
    with_abnormality = "with abnormality" if labels.any() or (truth is not None and truth.any()) else "(middle)"
    _suptitle(fig, f"{title}\n{len(shown)} slices {with_abnormality} of {labels.shape[-1]}. {RESEARCH_NOTICE}", 9)
    return _png(fig)
