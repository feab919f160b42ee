"""The web app's viewer: NiiVue (WebGL2) in a small Streamlit component whose HTML, JavaScript and the NiiVue bundle
ship inside the package (``neuromap/viewer_web``), so the page works offline and never loads code from a CDN.

It shows every uploaded sequence and the label map in their own grid with linked axial/coronal/sagittal views and
a crosshair (click to move it), zoom and pan, window/level (numbers or right-drag), per-label colour,
visibility and opacity, the radiological convention by default with a toggle, orientation letters on all
four sides, the crosshair's slice numbers and positions in mm, a 3D render of the tumour labels, and the
result's uncertainty map as an overlay to switch on. Why a custom component rather than ``niivue-streamlit``: see
``viewer_web/viewer.js``. What is shown is decided by `neuromap.viewer`, shared with the notebook viewer.
"""

from __future__ import annotations

from pathlib import Path

import streamlit.components.v1 as components

from neuromap.io.layout import UNCERTAINTY
from neuromap.tasks import Task, get_task
from neuromap.viewer import ViewerScene, viewer_scene

WEB_DIR = Path(__file__).with_name("viewer_web")
# The extra overlay a result may carry, the per-voxel uncertainty map (`neuromap.uncertainty`, which the app's
# Segmenter writes): offered as a toggle in the viewer when the result's files have it.
EXTRA_OVERLAY_KEY = UNCERTAINTY
EXTRA_OVERLAY_NAME = "Uncertainty (entropy)"
DEFAULT_OPACITY = 0.45

_component = components.declare_component("neuromap_viewer", path=str(WEB_DIR))


def result_task(result: dict) -> Task:
    """The task of the model that made ``result``: it decides the legend, colours and table."""
    return get_task(result["report"]["model"]["task"])


def result_scene(result: dict) -> ViewerScene:
    """The viewer scene of a result kept in the session (the files the segmenter wrote, read back)."""
    import nibabel as nib

    return viewer_scene(result["inputs"], nib.load(result["labels_output"]), result["report"]["label_convention"],
                        result_task(result))


def component_args(result: dict, sequence_names: dict[str, str], radiological: bool = True) -> dict:
    """Everything the component needs, as Streamlit sends it: JSON values plus the files as top-level bytes
    arguments (Streamlit passes those to the browser as binary, not as base64 text)."""
    scene = result_scene(result)
    files = {f"seq_{m}": path.read_bytes() for m, path in scene.sequences.items()}
    shown = "flair" if "flair" in scene.sequences else next(iter(scene.sequences))
    extra = result["files"].get(EXTRA_OVERLAY_KEY)
    return {
        "run": result["run"],
        "sequences": [{"key": m, "label": sequence_names.get(m, m)} for m in scene.sequences],
        "shown": shown,
        **files,
        "labels": Path(result["labels_output"]).read_bytes(),
        "label_info": [{"value": s.value, "name": s.name, "colour": s.colour, "visible": True,
                        "opacity": DEFAULT_OPACITY} for s in scene.styles],
        "inv_affine": scene.inv_affine,
        "shape": list(scene.labels.shape[:3]),
        "plane_axes": scene.plane_axes,
        "start_mm": list(scene.start_mm),
        "radiological": radiological,
        "extra_name": EXTRA_OVERLAY_NAME if extra else None,
        "extra": Path(extra).read_bytes() if extra else None,
    }


def viewer(result: dict, sequence_names: dict[str, str]) -> None:
    """Draw the viewer for ``result``; all its controls run in the browser, so using them never reruns the page."""
    _component(**component_args(result, sequence_names), key=f"viewer_{result['run']}", default=None)
