"""A segmentation result in a Jupyter notebook: ``neuromap.show(result)`` or ``result.show()``.

With ipyniivue installed (``pip install 'neuromap[app]'``) this is the same NiiVue viewer as the web app's, as a
widget: the sequences and the label map in their own grid, linked multiplanar views with crosshair, the task's
label colours, radiological convention by default, orientation letters on all sides and a 3D render tile. Without
it, or when the result's sequences are not NIfTI files on disk, the static overlay picture is shown instead.
What is shown comes from `neuromap.viewer`, shared with the web app. tests/test_notebook_browser.py draws it in
JupyterLab (headless Chromium) and checks the pixels.
"""

from __future__ import annotations

import functools
import gzip
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from neuromap.errors import NeuroMapError
from neuromap.tasks import get_task
from neuromap.viewer import ViewerScene, viewer_scene

if TYPE_CHECKING:
    from neuromap.segmenter import SegmentResult

DEFAULT_OPACITY = 0.45


def result_scene(result: SegmentResult) -> ViewerScene:
    report = result.report
    return viewer_scene(report["inputs"], result.labels, report["label_convention"], get_task(report["model"]["task"]))


def label_lut(scene: ViewerScene) -> dict:
    """The scene's label colours as the colormap dict ipyniivue's ``Volume.set_colormap_label`` takes."""
    rgb = [[int(s.colour[i:i + 2], 16) for i in (1, 3, 5)] for s in scene.styles]
    return {"R": [0] + [c[0] for c in rgb], "G": [0] + [c[1] for c in rgb], "B": [0] + [c[2] for c in rgb],
            "A": [0] + [255] * len(rgb), "I": [0] + [s.value for s in scene.styles],
            "labels": [""] + [s.name for s in scene.styles]}


def niivue_widget(scene: ViewerScene, radiological: bool = True, height: int = 480):
    """An ipyniivue widget of ``scene``: FLAIR (else the first sequence) under the label map; the others can be
    added with ``widget.add_volume({"path": ...})``.

    Every setting and both volumes are in the state each widget opens with, so the browser draws them even when
    it drops later messages: anywidget's front end (0.11.0, the newest) gives a widget's JavaScript 2 s to load and
    ignores every kernel-to-browser message of that widget forever when it takes longer, which ipyniivue's 5 MB
    module does on a loaded machine. Opened the usual way (volumes assigned after the widget's comm is open) the
    viewer then stays at "loading ..." (seen in JupyterLab 4.6 in headless Chromium; tests/test_notebook_browser.py).
    """
    from ipyniivue import DragMode, MultiplanarType, ShowRender, SliceType

    viewer_class, volume_class = _opened_when_complete()
    shown = "flair" if "flair" in scene.sequences else next(iter(scene.sequences))
    background = volume_class(path=scene.sequences[shown], colormap="gray")
    # Gzipped: the label map shrinks ~100-fold (8.9 MB -> ~0.1 MB for a BraTS case) on its way to the browser.
    labels = volume_class(data=gzip.compress(scene.labels.to_bytes(), compresslevel=1), name="labels.nii.gz",
                          opacity=DEFAULT_OPACITY)
    labels.set_colormap_label(label_lut(scene))
    widget = viewer_class(height=height, is_radiological_convention=radiological, slice_type=SliceType.MULTIPLANAR,
                          multiplanar_show_render=ShowRender.ALWAYS, multiplanar_layout=MultiplanarType.GRID,
                          show_all_orientation_markers=True, sagittal_nose_left=True, drag_mode=DragMode.WINDOWING,
                          crosshair_color=(1.0, 1.0, 0.0, 0.8), back_color=(0.0, 0.0, 0.0, 1.0),
                          tile_margin=8)  # as the web app: without it side-by-side views' letters touch ("LA")
    widget.scene.crosshair_pos = crosshair_fraction(scene.start_mm, scene.sequences[shown])  # on the tumour
    for volume in (background, labels):  # the viewer's state names the volumes' models: they must exist first
        volume.open_complete()
    widget.volumes = [background, labels]
    return widget.open_complete()


def crosshair_fraction(mm: tuple[float, float, float], background: Path) -> list[float]:
    """Where NiiVue puts a crosshair at scanner position ``mm``: fractions of the background volume's extent along
    R, A and S, voxel centres at (index + 0.5) / size, as NiiVue's ``crosshairPos`` (the web app sets it in mm)."""
    import nibabel as nib
    import numpy as np

    image = nib.load(background)  # its header: no voxel is read
    voxel = (np.linalg.inv(image.affine) @ np.array([*mm, 1.0]))[:3]
    fraction = [0.5, 0.5, 0.5]
    for axis, (ras_axis, flip) in enumerate(nib.orientations.io_orientation(image.affine)):
        size = image.shape[axis]
        index = voxel[axis] if flip > 0 else size - 1 - voxel[axis]
        fraction[int(ras_axis)] = float(np.clip((index + 0.5) / size, 0.0, 1.0))
    return fraction


@functools.cache
def _opened_when_complete() -> tuple[type, type]:
    """ipyniivue's NiiVue and Volume, opening their comm (which sends the widget's whole state to the browser) only
    when `open_complete` is called instead of at construction; until then a change sends nothing (ipywidgets skips
    widgets without a comm). The model id is chosen at construction, as NiiVue stores its own id in a trait."""
    from ipyniivue import NiiVue, Volume

    class OpenWhenComplete:
        _complete = False

        def open(self):
            if self._complete:
                return super().open()
            if self._model_id is None:
                self._model_id = uuid.uuid4().hex  # the comm opened later takes this id

        def open_complete(self):
            self._complete = True
            self.open()
            return self

    return (type("NiiVue", (OpenWhenComplete, NiiVue), {"__module__": __name__}),
            type("Volume", (OpenWhenComplete, Volume), {"__module__": __name__}))


def show(result: SegmentResult, radiological: bool = True, height: int = 480):
    """Display ``result`` in a notebook: the NiiVue widget, or the static overlay PNG as the fallback (no
    ipyniivue, or sequences that are not NIfTI files, e.g. a DICOM study). Returns the object Jupyter shows."""
    scene = result_scene(result)
    try:
        if scene.sequences:
            return niivue_widget(scene, radiological, height)
    except ImportError:
        pass
    return static_picture(result, radiological)


def static_picture(result: SegmentResult, radiological: bool = True):
    """The overlay PNG the segmenter wrote (or a new one drawn from the result when none was written) as an
    IPython image."""
    from IPython.display import Image

    written = result.files.get("overlay.png")
    if written is not None and written.is_file():
        return Image(data=written.read_bytes(), format="png")
    return Image(data=draw_overlay(result, radiological), format="png")


def draw_overlay(result: SegmentResult, radiological: bool = True) -> bytes:
    """The three-view overlay of a result segmented without an output folder, from its NIfTI sequences."""
    import nibabel as nib
    import numpy as np

    from neuromap.labels import to_internal
    from neuromap.pictures import overlay_png

    scene = result_scene(result)
    if not scene.sequences:
        raise NeuroMapError(f"{result.case_id}: no NIfTI sequence to draw the picture on. Fix: segment with an "
                            "output folder (the overlay PNG is written there).")
    shown = "flair" if "flair" in scene.sequences else next(iter(scene.sequences))
    image = nib.as_closest_canonical(nib.load(scene.sequences[shown]))
    labels = nib.as_closest_canonical(result.labels)
    task = get_task(result.report["model"]["task"])
    internal = to_internal(np.asanyarray(labels.dataobj), result.report["label_convention"])
    return overlay_png(np.asarray(image.dataobj, dtype=np.float32), internal, image.header.get_zooms()[:3],
                       f"{result.case_id} ({shown})", task.legend, task.colours, ras_affine=labels.affine,
                       file_affine=result.labels.affine, radiological=radiological)
