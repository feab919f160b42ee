"""The web app's slice viewer: three orthogonal RAS slices of the chosen background sequence with the label
overlay, in the colours and legend of the model's task (`neuromap.tasks`), so a binary model's mask is drawn as
what it is. Kept apart from `neuromap.app` (the page) so the renderer is testable without a page."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import streamlit as st
from PIL import Image

from neuromap.labels import to_internal
from neuromap.pictures import intensity_window, tumour_centre
from neuromap.tasks import Task, get_task

VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # name, RAS axis held fixed
Colours = dict[int, tuple[float, float, float]]


def result_task(result: dict) -> Task:
    """The task of the model that made ``result``: it decides the legend, colours and table."""
    return get_task(result["report"]["model"]["task"])


def load_display(result: dict, modality: str) -> dict:
    """Background and labels reoriented to RAS for display (cached per run and modality: one at a time)."""
    key = (result["run"], modality)
    cached = st.session_state.get("display")
    if cached and cached["key"] == key:
        return cached
    image = nib.as_closest_canonical(nib.load(result["inputs"][modality]))
    seg = nib.as_closest_canonical(nib.load(result["labels_output"]))
    background = np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3])  # (X, Y, Z, 1) too
    labels = to_internal(np.asanyarray(seg.dataobj), result["report"]["label_convention"])
    window = intensity_window(background)
    cached = {"key": key, "background": background, "labels": labels, "window": window,
              "spacing": tuple(float(z) for z in image.header.get_zooms()[:3])}
    st.session_state.display = cached
    return cached


def render_slice(background: np.ndarray, labels: np.ndarray, axis: int, index: int, spacing: tuple[float, ...],
                 window: tuple[float, float], opacity: float, shown: set[int], colours: Colours) -> np.ndarray:
    """RGB uint8 picture of one RAS slice with coloured labels, in millimetre proportions, the second in-plane
    axis pointing up (anterior up in axial views, superior up otherwise) as in the report's overlay PNG."""
    plane = np.take(background, index, axis=axis)
    lab = np.take(labels, index, axis=axis)
    lo, hi = window
    grey = np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value in shown:
        mask = lab == value
        rgb[mask] = (1 - opacity) * rgb[mask] + opacity * np.asarray(colours[value])
    rgb = np.flipud(np.transpose(rgb, (1, 0, 2)))
    in_plane = [s for i, s in enumerate(spacing) if i != axis]
    height, width = rgb.shape[:2]
    unit = min(in_plane)
    size = (max(1, round(width * in_plane[0] / unit)), max(1, round(height * in_plane[1] / unit)))
    picture = Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.NEAREST)
    return np.asarray(picture)


def legend_html(task: Task, shown: set[int]) -> str:
    """Colour key with the exact overlay colours (Streamlit's named colours differ); hidden labels greyed."""
    items = []
    for value, colour in task.colours.items():
        hexcode = "#" + "".join(f"{round(c * 255):02x}" for c in colour)
        swatch = f"display:inline-block;width:0.9em;height:0.9em;background:{hexcode};margin-right:0.35em"
        fade = "" if value in shown else "opacity:0.35;"
        items.append(f'<span style="{fade}margin-right:1.2em;font-size:0.85rem;white-space:nowrap">'
                     f'<span style="{swatch}"></span>{task.legend[value]}</span>')
    return "".join(items)


def viewer(result: dict, sequence_names: dict[str, str]) -> None:
    """Three orthogonal slices with sliders, overlay opacity, label toggles and the background sequence."""
    run, task = result["run"], result_task(result)
    controls = st.columns([2, 2, *([1] * len(task.colours))], vertical_alignment="bottom")
    modalities = list(result["inputs"])
    default = modalities.index("flair") if "flair" in modalities else 0
    modality = controls[0].selectbox("Background sequence", modalities, index=default,
                                     format_func=sequence_names.get, key=f"bg_{run}")
    opacity = controls[1].slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key=f"opacity_{run}")
    shown = {value for value, column in zip(task.colours, controls[2:], strict=True)
             if column.checkbox(task.short_names[value], value=True, key=f"show_{value}_{run}")}
    st.markdown(legend_html(task, shown), unsafe_allow_html=True)
    data = load_display(result, modality)
    centre = tumour_centre(data["labels"])
    for column, (name, axis) in zip(st.columns(3), VIEWS, strict=True):
        size = data["labels"].shape[axis]
        number = column.slider(f"{name.capitalize()} slice (of {size})", 1, size, int(centre[axis]) + 1,
                               key=f"{name}_{run}")
        column.image(render_slice(data["background"], data["labels"], axis, number - 1, data["spacing"],
                                  data["window"], opacity, shown, task.colours), width="stretch")
