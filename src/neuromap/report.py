"""What a person reads: volumes in mL, the report JSON, and an overlay picture through the tumour centre."""

from __future__ import annotations

import io as _io

import numpy as np

from neuromap.labels import CLASS_KEYS, REGIONS

RESEARCH_NOTICE = "Research use only. Not for diagnosis or treatment decisions."
# BraTS-style display colours: NCR/NET red, ED green, ET yellow.
COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.2), 3: (1.0, 0.85, 0.0)}
LEGEND = {1: "NCR/NET (necrotic / non-enhancing core)", 2: "ED (peritumoral edema)", 3: "ET (enhancing tumour)"}


def volumes_ml(labels: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """Per class (NCR, ED, ET) and region (WT, TC; ET equals the class) in mL: voxel count x voxel volume."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=4)
    out = {CLASS_KEYS[k]: float(counts[k] * voxel_ml) for k in CLASS_KEYS}
    out.update({name: float(sum(counts[m] for m in members) * voxel_ml) for name, members in REGIONS.items()})
    return out


def tumour_centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Centre of mass of the tumour, or the volume centre when nothing was found."""
    idx = np.argwhere(labels > 0)
    if len(idx) == 0:
        return tuple(s // 2 for s in labels.shape)
    return tuple(int(round(v)) for v in idx.mean(axis=0))


def overlay_png(background: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float], title: str,
                alpha: float = 0.45) -> bytes:
    """Axial, coronal and sagittal slices through the tumour centre with a colour legend.

    Inputs are RAS-ordered arrays (x right, y anterior, z superior) so the pictures have a fixed, radiological-free
    layout: anterior up in axial views, superior up in the others.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cx, cy, cz = tumour_centre(labels)
    lo, hi = np.percentile(background[background != 0], [0.5, 99.5]) if np.any(background) else (0, 1)
    views = [
        ("axial", background[:, :, cz], labels[:, :, cz], spacing[1] / spacing[0]),
        ("coronal", background[:, cy, :], labels[:, cy, :], spacing[2] / spacing[0]),
        ("sagittal", background[cx, :, :], labels[cx, :, :], spacing[2] / spacing[1]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for ax, (name, img, lab, aspect) in zip(axes, views, strict=True):
        ax.imshow(img.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        rgba = np.zeros(lab.T.shape + (4,))
        for value, colour in COLOURS.items():
            rgba[lab.T == value] = (*colour, alpha)
        ax.imshow(rgba, origin="lower", aspect=aspect)
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=COLOURS[k], label=LEGEND[k]) for k in COLOURS]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle(f"{title}\n{RESEARCH_NOTICE}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
