"""The `Layout` interface: one object per kind of input (NIfTI cases, LGG slice folders) owns every decision that
depends on it, like nnU-Net v2's reader/writer classes: which folders it recognises, how a case is loaded and
validated, which files a result becomes, and how label files are found and read back for evaluation.

The rest of the package holds a layout object (``case.layout``, ``LabelFile.layout``) and calls these methods;
it never asks which layout it has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.io.case import Case, Volume

if TYPE_CHECKING:
    from neuromap.checkpoint import ModelSpec
    from neuromap.tasks import Task


# Optional per-voxel maps in the input grid (`neuromap.uncertainty`), written by layouts whose outputs are NIfTI
# on the input's grid; output keys as `Layout.output_files` names them.
UNCERTAINTY = "uncertainty.nii.gz"
PROBABILITIES = "probabilities.nii.gz"
MAP_OUTPUTS = (UNCERTAINTY, PROBABILITIES)


@dataclass(frozen=True)
class LabelFile:
    """A label map of one case found for evaluation: a NIfTI file or a slice folder, read by its ``layout``.
    ``convention`` is fixed by the dataset naming (MSD, BraTS 2023), or None to decide per file."""

    case_id: str
    path: Path
    layout: Layout
    convention: str | None = None


@dataclass
class LabelPair:
    """A prediction and its ground truth read back as arrays for scoring, ``task``'s labels on one grid.

    ``spacing`` is the voxel size in mm, None where the files store none; ``slice_numbers`` is set for slice
    stacks, whose slices are also scored one by one."""

    pred: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, ...] | None
    conventions: dict[str, str]  # "prediction" / "ground_truth" -> convention used
    slice_numbers: list[int] | None = None


@dataclass
class Prediction:
    """What the segmenter computed for one case: all a layout's outputs are made from."""

    case: Case
    volume: Volume
    spec: ModelSpec  # the model that made it
    internal: np.ndarray  # internal labels in the input grid
    labels: nib.Nifti1Image  # ``internal`` in the output label convention, input grid and header
    task: Task
    # An array on the grid the model's input was loaded on -> RAS at that resolution (for pictures). That grid is
    # the input grid, except for raw scans, whose pictures are drawn on their 1 mm working grid.
    ras: Callable[[np.ndarray], np.ndarray]
    ras_spacing: tuple[float, float, float]


class Layout:
    """Base class; subclasses implement every method. ``name`` is stable (shown in messages), ``task`` is the
    task its annotations are for (it picks the default shipped model), ``scored_as`` the evaluation tasks its
    label files can be scored as, ``label_key`` the name of the label output in `output_files`."""

    name: str
    description: str  # e.g. "label NIfTIs", for messages that compare kinds of files
    task: str
    scored_as: tuple[str, ...]
    label_key: str
    spacing_known: bool = True
    scores_slices: bool = False  # evaluation also scores each slice in 2D (slice stacks)
    # outputs written only on request: the MAP_OUTPUTS (NIfTI and DICOM), "seg.dcm" (DICOM SEG, DICOM only)
    optional_outputs: tuple[str, ...] = ()

    # ---- discovery and loading
    def claims(self, folder: Path) -> bool:
        """True when ``folder`` is (or holds, without going deeper) cases of this layout."""
        raise NotImplementedError

    def discover(self, folder: Path) -> list[Case]:
        """The cases of a folder this layout claims."""
        raise NotImplementedError

    def load(self, case: Case, modalities: list[str] | None = None, with_seg: bool | None = None) -> Volume:
        """Validate and load; every problem is raised together in one NeuroMapError, what is merely odd goes to
        the volume's ``warnings``. ``with_seg`` None loads the segmentation when there is one, True requires it,
        False skips it."""
        raise NotImplementedError

    def check(self, case: Case, modalities: list[str] | None = None) -> list[str]:
        """Validate without segmenting (``neuromap validate``): every problem raised together, the warnings a
        segmentation would report returned. A full `load` by default, since the values are part of what is
        checked; layouts whose loading does more than reading (raw scans: registration) check less."""
        return self.load(case, modalities).warnings

    def off_grid(self, case: Case, modalities: list[str]) -> list[str]:
        """The sequences among ``modalities`` that lie on another voxel grid than the reference one, one line
        each (headers only, no voxels read): raw scans, which `load` refuses with the fix (``--raw``) and the
        web app offers to prepare. Empty for layouts without grids to compare."""
        return []

    def require(self, case: Case, modalities: list[str]) -> None:
        """Raise the user's message when ``case`` lacks any of ``modalities``."""
        missing = [m for m in modalities if m not in case.images]
        if missing:
            raise NeuroMapError(
                f"case '{case.case_id}' ({case.root}): missing modality {missing} (found: {case.modalities}). "
                "Fix: add the file(s), map them with --map, or choose a model that needs only the sequences present."
            )

    def read_sequence(self, case: Case, modality: str) -> tuple[np.ndarray, nib.Nifti1Image]:
        """One sequence alone, on its own grid: its (X, Y, Z) array and an image whose affine and header describe
        that grid. Raw-scan preparation (`neuromap.prepare_raw`) reads sequences this way, as each may lie on its
        own grid; `load` instead checks that they share one."""
        raise NotImplementedError

    def notes(self, case: Case) -> list[str]:
        """What a reader of the results must know about how the case was found (e.g. the sequences a DICOM study
        lacks); `load` puts them into the volume's warnings."""
        return []

    # ---- outputs of a segmentation
    def output_grid(self, volume: Volume, internal: np.ndarray) -> tuple[Volume, np.ndarray]:
        """The volume whose grid the outputs are written on, and the labels on it, from the loaded volume and the
        (postprocessed) labels on its grid. The loaded grid is the input grid for every layout that reads cases
        as they are; raw-scan preparation maps its 1 mm working grid back to the reference sequence's grid."""
        return volume, internal

    def output_maps(self, volume: Volume, maps: dict[str, nib.Nifti1Image]) -> dict[str, nib.Nifti1Image]:
        """The uncertainty/probability maps on the output grid, from the maps on the loaded volume's grid (the same
        grid for every layout that reads cases as they are)."""
        return maps

    def output_files(self, case: Case, out: Path, optional: tuple[str, ...] = ()) -> dict[str, Path]:
        """The outputs by name (``label_key``, "report.json", "overlay.png" and the requested ``optional`` ones),
        as `SegmentResult.files` gives them."""
        raise NotImplementedError

    def planned_writes(self, case: Case, out: Path, optional: tuple[str, ...] = ()) -> list[Path]:
        """Every file that will be created, checked against inputs and existing files before any work."""
        raise NotImplementedError

    def stage_labels(self, prediction: Prediction, files: dict[str, Path], stack: contextlib.ExitStack,
                     overwrite: bool) -> None:
        """Write the labels under temporary names that ``stack`` renames together with the other outputs."""
        raise NotImplementedError

    def picture(self, prediction: Prediction, background: np.ndarray, title: str,
                radiological: bool = True) -> tuple[bytes, list[str]]:
        """The overview PNG (left-right as ``radiological`` says, where the layout knows the orientation) and any
        warnings about it."""
        raise NotImplementedError

    def report_extra(self, prediction: Prediction) -> dict:
        """Layout-specific report entries."""
        return {}

    # ---- reading labels back
    def label_files(self, root: Path, predicted: bool) -> list[LabelFile]:
        """Label files of this layout in ``root`` or one level below: predictions as ``neuromap segment`` writes
        them (``predicted``), else ground truth."""
        raise NotImplementedError

    def check_pair(self, pred: LabelFile, truth: LabelFile) -> None:
        """Cheap checks (headers, slice numbers) that the two can be compared, so a mismatch in the last case
        fails before minutes of work."""
        raise NotImplementedError

    def read_pair(self, pred: LabelFile, truth: LabelFile, pred_labels: str, gt_labels: str, task: Task) -> LabelPair:
        """Both label maps as ``task`` scores them; ``pred_labels``/``gt_labels`` are conventions or "auto"."""
        raise NotImplementedError
