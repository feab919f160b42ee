"""Pictures a person reads at a glance: three views through the tumour centre, or a montage of slices for slice
stacks without a known spacing. Legend text and colours come from the model's task (`neuromap.tasks`)."""

from __future__ import annotations

import io as _io
import threading

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


def preload() -> None:
    """Import matplotlib's figure machinery in a background thread and return at once. A `segment` run draws its
    picture last, and this import costs about as much CPU as drawing it (~0.6 s); started while the case is read
    (one core busy decompressing, the other idle) it costs no wall time. Importing is thread-safe: a later import
    waits for this one."""
    def load() -> None:
        from matplotlib.figure import Figure  # noqa: F401
        from matplotlib.patches import Patch  # noqa: F401

    threading.Thread(target=load, name="neuromap-preload", daemon=True).start()


def _png(fig) -> bytes:
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
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


# The plane an axis code belongs to: an axial slice is one index along the file axis that runs inferior-superior.
PLANE_OF_CODE = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "R": "sagittal", "L": "sagittal"}
CONVENTIONS = ("radiological", "neurological")


def plane_axes(affine: np.ndarray) -> dict[str, int]:
    """Which file axis each anatomical plane indexes, from the axis codes of the affine (oblique scans: the
    closest axis, as nibabel's orientation code takes it)."""
    import nibabel as nib

    return {PLANE_OF_CODE[code]: axis for axis, code in enumerate(nib.aff2axcodes(affine))}


def view_letters(plane: str, radiological: bool) -> tuple[str, str, str, str]:
    """Orientation letters (left, right, top, bottom) of a view as `overlay_png` draws it. Radiological puts the
    patient's right on the image's left (as PACS do), neurological on its right; sagittal views face left
    (anterior on the left) in both, as radiology reading software shows them."""
    if plane == "sagittal":
        return "A", "P", "S", "I"
    left, right = ("R", "L") if radiological else ("L", "R")
    return (left, right, "A", "P") if plane == "axial" else (left, right, "S", "I")


def overlay_png(background: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float], title: str,
                legend: dict[int, str], colours: Colours, alpha: float = 0.45, *, ras_affine: np.ndarray | None = None,
                file_affine: np.ndarray | None = None, volumes_text: str = "", radiological: bool = True) -> bytes:
    """Axial, coronal and sagittal slices through the tumour centre with orientation letters and a colour legend.

    Inputs are RAS-ordered arrays (x right, y anterior, z superior). ``radiological`` (the default) mirrors the
    axial and coronal views so the patient's right is on the image's left. With ``ras_affine`` (voxel -> mm of
    the RAS arrays) each view is titled with its position in mm, and with ``file_affine`` also with its slice
    number in the file as other viewers count it; ``volumes_text`` is printed under the title.
    """
    # A bare Figure, as matplotlib's web-server example does: no pyplot (its import is about a tenth of a
    # `segment` run's CPU), no global figure registry to close, safe in the app's worker threads.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    centre = tumour_centre(labels)
    cx, cy, cz = centre
    lo, hi = intensity_window(background)
    views = [  # name, RAS axis held, picture (rows = second in-plane axis), pixel aspect, mirror left-right
        ("axial", 2, background[:, :, cz], labels[:, :, cz], spacing[1] / spacing[0], radiological),
        ("coronal", 1, background[:, cy, :], labels[:, cy, :], spacing[2] / spacing[0], radiological),
        ("sagittal", 0, background[cx, :, :], labels[cx, :, :], spacing[2] / spacing[1], True),
    ]
    positions = _slice_positions(centre, labels.shape, ras_affine, file_affine)
    fig = Figure(figsize=(12, 4.9))
    axes = fig.subplots(1, 3)
    for ax, (name, axis, img, lab, aspect, mirror) in zip(axes, views, strict=True):
        img, lab = img.T, lab.T
        if mirror:
            img, lab = img[:, ::-1], lab[:, ::-1]
        ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax.imshow(_rgba(lab, colours, alpha), origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(f"{name}{positions[axis]}", fontsize=10)
        ax.axis("off")
        left, right, top, bottom = view_letters(name, radiological)
        letter = {"color": "yellow", "fontsize": 12, "fontweight": "bold", "transform": ax.transAxes}
        ax.text(0.02, 0.5, left, ha="left", va="center", **letter)
        ax.text(0.98, 0.5, right, ha="right", va="center", **letter)
        ax.text(0.5, 0.98, top, ha="center", va="top", **letter)
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **letter)
    handles = [Patch(color=colours[k], label=text) for k, text in legend.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9)
    convention = ("radiological: patient's right on the image's left" if radiological
                  else "neurological: patient's right on the image's right")
    lines = [title, f"{volumes_text}  ({convention})" if volumes_text else f"({convention})", RESEARCH_NOTICE]
    _suptitle(fig, "\n".join(lines), 10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _png(fig)


def _slice_positions(centre: tuple[int, int, int], shape: tuple[int, ...], ras_affine: np.ndarray | None,
                     file_affine: np.ndarray | None) -> list[str]:
    """Per RAS axis, the title suffix of the view that holds it: ', z = 12.0 mm (slice 78/155)'."""
    if ras_affine is None:
        return [""] * 3
    mm = (ras_affine @ np.array([*centre, 1.0]))[:3]
    texts = [f", {letter} = {mm[axis]:.1f} mm" for axis, letter in enumerate("xyz")]
    if file_affine is not None:
        voxel = np.rint(np.linalg.solve(file_affine, np.array([*mm, 1.0]))[:3]).astype(int)
        file_axis = plane_axes(file_affine)
        for axis, plane in enumerate(("sagittal", "coronal", "axial")):
            k = file_axis[plane]
            texts[axis] += f" (slice {voxel[k] + 1}/{shape[axis]})"
    return texts


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
    from matplotlib.figure import Figure  # no pyplot: see overlay_png
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    shown = montage_slices(labels, truth, limit)
    cols = min(5, len(shown))
    rows = -(-len(shown) // cols)
    lo, hi = intensity_window(background)
    fig = Figure(figsize=(2.4 * cols, 2.6 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, z in zip(axes.flat, shown, strict=False):
        ax.imshow(background[:, :, z], cmap="gray", vmin=lo, vmax=hi)
        ax.imshow(_rgba(labels[:, :, z], colours, alpha))
        if truth is not None and truth[:, :, z].any():
            ax.contour(truth[:, :, z] > 0, levels=[0.5], colors=[TRUTH_COLOUR], linewidths=0.8)
        name, families = drawable(slice_names[z])  # file names may be in any script
        ax.set_title(name, fontsize=8, fontfamily=families)
    handles = [Patch(color=colours[k], label=text) for k, text in legend.items()]
    if truth is not None:
        handles.append(Line2D([], [], color=TRUTH_COLOUR, label="ground truth (outline)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=8)
    with_abnormality = "with abnormality" if labels.any() or (truth is not None and truth.any()) else "(middle)"
    _suptitle(fig, f"{title}\n{len(shown)} slices {with_abnormality} of {labels.shape[-1]}. {RESEARCH_NOTICE}", 9)
    return _png(fig)
