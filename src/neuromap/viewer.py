"""What the interactive viewers show, decided once for the web app (`neuromap.app_viewer`: NiiVue in a Streamlit
component) and notebooks (`neuromap.notebook`: ipyniivue): the sequences and the label map in their own voxel grid
(NiiVue places them by their affines, nothing is resampled here), each label's file value, name and colour from
the model's task, which voxel axis of the file each anatomical plane cuts, and where the crosshair starts (the
tumour centre, in scanner mm). Imports neither torch nor Streamlit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.labels import CONVENTIONS, to_internal
from neuromap.pictures import plane_axes, tumour_centre
from neuromap.tasks import Task


@dataclass(frozen=True)
class LabelStyle:
    """One label as the viewers draw it: its value in the label file, its legend text and colour (``#rrggbb``)."""

    value: int
    name: str
    colour: str


@dataclass(frozen=True)
class ViewerScene:
    sequences: dict[str, Path]  # modality -> NIfTI file, in the model's order
    labels: nib.Nifti1Image  # in the output label convention, the sequences' grid
    styles: tuple[LabelStyle, ...]
    plane_axes: dict[str, int]  # "axial" / "coronal" / "sagittal" -> file voxel axis it indexes
    start_mm: tuple[float, float, float]  # crosshair start: tumour centre (volume centre when nothing was found)

    @property
    def inv_affine(self) -> list[list[float]]:
        """Scanner mm -> file voxel index, so a viewer can say which slice of the uploaded file it shows."""
        return np.linalg.inv(self.labels.affine).tolist()


def hex_colour(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def label_styles(task: Task, convention: str) -> tuple[LabelStyle, ...]:
    """The task's labels with the values they have in a file of ``convention`` (BraTS writes ET as 4)."""
    value_of = {internal: value for value, internal in CONVENTIONS[convention].items() if internal}
    return tuple(LabelStyle(value_of[internal], task.legend[internal], hex_colour(colour))
                 for internal, colour in task.colours.items())


def viewer_scene(inputs: dict[str, str | Path], labels: nib.Nifti1Image, convention: str, task: Task) -> ViewerScene:
    """The scene of one result: ``inputs`` are the sequence files the model read (modality -> path; ones that
    are not NIfTI files on disk, e.g. DICOM series folders, are left out), ``labels`` the label image it wrote."""
    sequences = {m: Path(p) for m, p in inputs.items() if Path(p).is_file() and ".nii" in Path(p).name}
    internal = to_internal(np.asanyarray(labels.dataobj), convention)
    centre = labels.affine @ np.array([*tumour_centre(internal), 1.0])
    return ViewerScene(sequences, labels, label_styles(task, convention), plane_axes(labels.affine),
                       tuple(float(v) for v in centre[:3]))
