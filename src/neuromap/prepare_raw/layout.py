"""`RawLayout`: the raw scans of a case another layout found (NIfTI files, a mapping or a DICOM study), as the
`Segmenter` and ``validate --raw`` see them. Like every layout it owns loading and its output files, so nothing
else branches on ``--raw``:

- loading prepares the case (`prepare_raw`: co-register, 1 mm working grid, brain mask) instead of requiring
  one shared grid; a check reads each sequence alone;
- `output_grid` maps the labels from the working grid onto the reference sequence's own grid;
- outputs are the found layout's own (label NIfTI, and for a DICOM study its DICOM SEG on the reference series)
  plus, on request, ``<case>_brain_mask.nii.gz`` (reference grid) and ``<case>_<mod>_prepared.nii.gz``
  (co-registered, 1 mm working grid); the report gains a ``raw_preparation`` section; the overlay is drawn on the
  working grid, where coronal and sagittal views are not thick-slice stairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.export import uint8_image
from neuromap.io.atomic import atomic_path
from neuromap.io.case import Case, Volume
from neuromap.io.layout import Layout, Prediction
from neuromap.prepare_raw.inputs import read_sequences
from neuromap.prepare_raw.pipeline import RawOptions, RawPreparation, RawVolume, prepare_raw

BRAIN_MASK = "brain_mask.nii.gz"


def prepared_key(modality: str) -> str:
    """The output name of a co-registered sequence (``--save-prepared``), as `SegmentResult.files` holds it."""
    return f"{modality}_prepared.nii.gz"


def as_raw(case: Case, options: RawOptions, modalities: list[str] | None = None,
           on_step: Callable[[str], None] | None = None) -> Case:
    """``case`` read as raw scans: the same files, a `RawLayout` over the layout that found them. ``modalities``
    are the sequences the model reads (they name the ``--save-prepared`` files); default: the case's. ``on_step``
    hears each preparation step as it starts (`prepare_raw`)."""
    return dataclasses.replace(case, layout=RawLayout(case.layout, options, modalities, on_step))


class RawLayout(Layout):
    """See the module docstring. One per case and model: ``base`` is the layout that found the case."""

    def __init__(self, base: Layout, options: RawOptions, modalities: list[str] | None = None,
                 on_step: Callable[[str], None] | None = None) -> None:
        self.base, self.options, self.modalities, self.on_step = base, options, modalities, on_step
        self.name = f"{base.name} (raw)"
        self.description = base.description
        self.task = base.task
        self.scored_as = ()
        self.label_key = base.label_key
        self.spacing_known = base.spacing_known
        self.optional_outputs = base.optional_outputs  # the maps are brought to the reference grid (output_maps)

    # ------------------------------------------------------------------------------------- loading

    def load(self, case: Case, modalities: list[str] | None = None, with_seg: bool | None = None) -> RawVolume:
        modalities = list(modalities or self.modalities or case.modalities)
        if with_seg:
            raise NeuroMapError(f"case '{case.case_id}': raw scans are segmented, not used as ground truth.")
        return prepare_raw(case, modalities, self.options, self.base, self.on_step).volume

    def check(self, case: Case, modalities: list[str] | None = None) -> list[str]:
        """Each sequence read and checked alone, without registration or brain extraction."""
        sequences = read_sequences(case, list(modalities or self.modalities or case.modalities), self.base)
        return [*self.base.notes(case), *(w for s in sequences.values() for w in s.warnings)]

    def output_grid(self, volume: RawVolume, internal: np.ndarray) -> tuple[RawVolume, np.ndarray]:
        """The reference sequence's own grid (its array, header and affine) and the labels on it."""
        prep = volume.preparation
        sequence = prep.sequences[prep.reference]
        on_reference = RawVolume(case=volume.case, image=sequence.array[None], modalities=[prep.reference],
                                 reference=prep.reference_image, warnings=volume.warnings, preparation=prep)
        return on_reference, prep.to_reference(internal)

    def output_maps(self, volume: RawVolume, maps: dict[str, nib.Nifti1Image]) -> dict[str, nib.Nifti1Image]:
        """The maps, computed on the 1 mm working grid, on the reference sequence's grid and header: linear
        interpolation of the uint8 codes (the encoding stays value / 255), as the labels take nearest neighbour."""
        prep = volume.preparation
        return {key: uint8_image(np.rint(np.clip(prep.values_to_reference(np.asarray(image.dataobj, np.float32)),
                                                 0, 255)), prep.reference_image,
                                 image.header["descrip"].item().decode("ascii", "replace"))
                for key, image in maps.items()}

    # ------------------------------------------------------------------------------------- outputs

    def _extra(self, case: Case, out: Path) -> dict[str, Path]:
        files = {BRAIN_MASK: out / f"{case.case_id}_{BRAIN_MASK}"} if self.options.save_brain_mask else {}
        if self.options.save_prepared:
            for m in self.modalities or case.modalities:
                files[prepared_key(m)] = out / f"{case.case_id}_{prepared_key(m)}"
        return files

    def output_files(self, case: Case, out: Path, optional: tuple[str, ...] = ()) -> dict[str, Path]:
        return {**self.base.output_files(case, out, optional), **self._extra(case, out)}

    def planned_writes(self, case: Case, out: Path, optional: tuple[str, ...] = ()) -> list[Path]:
        return [*self.base.planned_writes(case, out, optional), *self._extra(case, out).values()]

    def stage_labels(self, prediction: Prediction, files: dict[str, Path], stack: contextlib.ExitStack,
                     overwrite: bool) -> None:
        self.base.stage_labels(prediction, files, stack, overwrite)
        prep = _preparation(prediction.volume)
        if BRAIN_MASK in files:
            mask = uint8_image(prep.brain_mask_on_reference(), prep.reference_image)
            nib.save(mask, str(stack.enter_context(atomic_path(files[BRAIN_MASK], overwrite))))
        for m, image in (prep.prepared_images().items() if self.options.save_prepared else ()):
            nib.save(image, str(stack.enter_context(atomic_path(files[prepared_key(m)], overwrite))))

    def picture(self, prediction: Prediction, background: np.ndarray, title: str,
                radiological: bool = True) -> tuple[bytes, list[str]]:
        """The found layout's picture of the working-grid labels over ``background``, a working-grid sequence: with
        the working grid's volume too, whose affine gives the positions in mm and whose voxel size the volumes in
        mL (the reference grid's thick voxels gave 4.4x the volumes and positions far outside the head)."""
        prep = _preparation(prediction.volume)
        on_working_grid = dataclasses.replace(prediction, internal=prep.working_labels, volume=prep.volume)
        return self.base.picture(on_working_grid, background,
                                 f"{title} - raw scans co-registered to {prep.reference}, 1 mm", radiological)

    def report_extra(self, prediction: Prediction) -> dict:
        prep = _preparation(prediction.volume)
        report = prep.report()
        voxel_ml = self.options.spacing ** 3 / 1000
        report["working_grid"]["volumes_ml"] = {  # the report's main volumes are those of the labels file
            k: round(n * voxel_ml, 3) for k, n in prediction.task.volume_voxels(prep.working_labels).items()}
        return {**self.base.report_extra(prediction), "raw_preparation": report}


def _preparation(volume: Volume) -> RawPreparation:
    """The preparation behind a raw case's volume (`RawLayout.output_grid` made it a `RawVolume`)."""
    assert isinstance(volume, RawVolume), "a raw case's outputs are made from the volume RawLayout gave"
    return volume.preparation
