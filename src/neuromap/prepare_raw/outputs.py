"""What ``--raw`` changes in a segmentation: where the volume comes from, the grid the labels go back to, the
extra files (brain mask, co-registered sequences), the report section and the overlay.

`RawOutputs` wraps the layout's own outputs (NIfTI, or DICOM with its SEG), so a raw DICOM study still gets its
DICOM SEG on the reference series. The segmentation code calls three hooks: `prepare` instead of loading,
`to_reference` after post-processing, and the usual output methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.io.atomic import atomic_path
from neuromap.io.cases import Case
from neuromap.io.nifti import Volume, label_image
from neuromap.prepare_raw.inputs import choose_reference
from neuromap.prepare_raw.pipeline import RawOptions, RawPreparation, prepare_raw

if TYPE_CHECKING:  # segmentation imports this module; importing segmentation here would be circular
    from neuromap.segmentation import NiftiOutputs, Prediction


class RawOutputs:
    """The outputs of the wrapped layout plus, on request, ``<case>_brain_mask.nii.gz`` (reference grid) and
    ``<case>_<mod>_prepared.nii.gz`` (co-registered, 1 mm working grid), and a ``raw_preparation`` report."""

    def __init__(self, base: NiftiOutputs, options: RawOptions, modalities: list[str]) -> None:
        self.base, self.options, self.modalities = base, options, list(modalities)
        self.prep: RawPreparation | None = None

    # --- the hooks the segmentation path calls -------------------------------------------------------------
    def prepare(self, case: Case, modalities: list[str]) -> Volume:
        """Register, resample, extract the brain: the working-grid volume the normal pipeline segments."""
        if case.layout == "lgg":
            raise NeuroMapError(
                f"case '{case.case_id}' ({case.root}): --raw prepares 3D scans (NIfTI files or DICOM series); this is "
                "a folder of 2D slice images with no geometry to register. Fix: leave out --raw.")
        if case.layout == "dicom":  # the DICOM SEG must reference the series the labels are drawn on
            case.extra["dicom"].reference_modality = choose_reference(modalities, self.options.reference)
        self.prep = prepare_raw(case, modalities, self.options)
        return self.prep.volume

    def to_reference(self, internal: np.ndarray) -> tuple[np.ndarray, Volume]:
        """Labels on the reference sequence's grid, and a volume describing that grid (header, spacing, the
        reference image) for the label file and the report; the preparation's warnings ride on its case."""
        prep = self.prep
        sequence = prep.sequences[prep.reference]
        case = prep.case
        case = dataclasses.replace(case, extra={**case.extra, "warnings": [*case.extra.get("warnings", []),
                                                                          *prep.warnings]})
        volume = Volume(case=case, image=sequence.array[None], modalities=[prep.reference],
                        reference=prep.reference_image)
        return prep.to_reference(internal), volume

    # --- output methods (as NiftiOutputs) --------------------------------------------------------------------
    def _extra(self, case: Case, out: Path) -> dict[str, Path]:
        files = {}
        if self.options.save_brain_mask:
            files["brain_mask.nii.gz"] = out / f"{case.case_id}_brain_mask.nii.gz"
        if self.options.save_prepared:
            for m in self.modalities:
                files[f"{m}_prepared.nii.gz"] = out / f"{case.case_id}_{m}_prepared.nii.gz"
        return files

    def files(self, case: Case, out: Path) -> dict[str, Path]:
        return {**self.base.files(case, out), **self._extra(case, out)}

    def written(self, case: Case, out: Path) -> list[Path]:
        return [*self.base.written(case, out), *self._extra(case, out).values()]

    def report_extra(self, prediction: Prediction) -> dict:
        report = self.prep.report()
        report["working_grid"]["volumes_ml"] = _working_volumes(self.prep, prediction.spec.task)
        return {**self.base.report_extra(prediction), "raw_preparation": report}

    def picture(self, prediction: Prediction, background: np.ndarray, title: str) -> tuple[bytes, list[str]]:
        """Drawn on the 1 mm working grid (co-registered, brain-extracted), where coronal and sagittal views are
        not 5 mm stairs; the labels file itself is on the reference grid."""
        from neuromap.report import LEGENDS, overlay_png

        inv, volume = prediction.inverse, self.prep.volume
        shown = "flair" if "flair" in volume.modalities else volume.modalities[0]
        image = volume.image[volume.modalities.index(shown)]
        title = (f"{prediction.case.case_id} ({shown}) - {prediction.spec.model.name} - raw scans co-registered to "
                 f"{self.prep.reference}, 1 mm")  # the caller's title names the reference grid's sequence
        png = overlay_png(inv.ras(image), inv.ras(self.prep.working_labels), inv.ras_spacing, title,
                          legend=LEGENDS[prediction.spec.task])
        return png, []

    def stage_labels(self, prediction: Prediction, files: dict[str, Path], stack: contextlib.ExitStack,
                     overwrite: bool) -> None:
        self.base.stage_labels(prediction, files, stack, overwrite)
        prep = self.prep
        if "brain_mask.nii.gz" in files:
            mask = label_image(prep.brain_mask_on_reference(), prep.reference_image)
            nib.save(mask, str(stack.enter_context(atomic_path(files["brain_mask.nii.gz"], overwrite))))
        for m, image in (prep.prepared_images().items() if self.options.save_prepared else ()):
            nib.save(image, str(stack.enter_context(atomic_path(files[f"{m}_prepared.nii.gz"], overwrite))))


def _working_volumes(prep: RawPreparation, task: str) -> dict[str, float]:
    """Volumes measured on the 1 mm working grid (the report's main volumes are those of the labels file)."""
    from neuromap.report import volume_voxels

    voxel_ml = prep.options.spacing ** 3 / 1000
    return {k: round(n * voxel_ml, 3) for k, n in volume_voxels(prep.working_labels, task).items()}
