"""`DicomLayout`: DICOM studies as cases. A study is found anywhere in a folder tree (`neuromap.io.dicom`), its
series are mapped to sequences (`neuromap.io.dicom_map`), and it is loaded into the same `Volume` a NIfTI case
gives, in the reference series' grid. Outputs are those of a NIfTI case (the label NIfTI in that grid, report,
overlay), plus the series used and ignored in the report and, on request, ``<case>_seg.dcm``: a DICOM SEG on the
reference series (`neuromap.io.dicom_seg`). Studies hold no ground truth, so evaluation finds no labels here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.io.atomic import atomic_path
from neuromap.io.case import Case, Volume
from neuromap.io.dicom import (
    Series,
    SeriesRef,
    is_dicom_tree,
    read_series,
    reference_image,
    same_grid,
    scan_dicom,
    study_ids,
)
from neuromap.io.dicom_map import StudyChoice, map_study
from neuromap.io.dicom_seg import write_dicom_seg
from neuromap.io.header_checks import header_warnings
from neuromap.io.layout import MAP_OUTPUTS, LabelFile, Prediction
from neuromap.io.nifti import NiftiLayout
from neuromap.io.plausibility import check_sequences

DICOM_SEG = "seg.dcm"


class DicomLayout(NiftiLayout):
    name = "dicom"
    description = "DICOM studies"
    scored_as = ()
    optional_outputs = (*MAP_OUTPUTS, DICOM_SEG)

    # ------------------------------------------------------------------------------------- discovery

    def claims(self, folder: Path) -> bool:
        """A folder tree with DICOM files; asked only after the folder-per-case layouts found nothing."""
        return is_dicom_tree(folder)

    def discover(self, folder: Path) -> list[Case]:
        return self.cases(folder)

    def cases(self, root: str | Path, series_map: Mapping[str, str] | None = None) -> list[Case]:
        """One case per study under ``root``; ``series_map`` (modality -> UID, number or description) overrides
        the automatic choice of series (one study only)."""
        root = Path(root)
        studies, notes = self.studies(root)
        if series_map and len(studies) > 1:
            raise NeuroMapError(f"{root}: holds {len(studies)} studies; --map describes one. Fix: point to one study.")
        return [self.study_case(root, case_id, map_study(members, dict(series_map or {}), where=str(root)), notes)
                for case_id, members in studies]

    def studies(self, root: Path) -> tuple[list[tuple[str, list[Series]]], list[str]]:
        """The image series under ``root`` grouped by study, as (case id, series in series-number order) sorted
        by case id, and the notes on the DICOM files that are not images (skipped)."""
        series, notes = scan_dicom(root)
        if not series:
            raise NeuroMapError(f"{root}: no DICOM image series found. Fix: point to the folder of a DICOM export.")
        studies: dict[str, list[Series]] = {}
        for s in sorted(series, key=lambda s: (s.number if s.number is not None else 1 << 30, s.uid)):
            studies.setdefault(s.study_uid, []).append(s)
        named = zip(study_ids(root, studies), studies.values(), strict=True)
        return sorted(named, key=lambda item: item[0]), notes

    def study_case(self, root: Path, case_id: str, choice: StudyChoice, notes: list[str]) -> Case:
        """The case of one study under ``root`` whose series were chosen as ``choice`` (`map_study`)."""
        choice.skipped = notes
        images = {m: SeriesRef(Path(os.path.commonpath([p.parent for p in s.files])), series=s)
                  for m, s in choice.used.items()}
        return Case(case_id=case_id, root=root, images=images, layout=self, naming="dicom", study=choice)

    # ------------------------------------------------------------------------------------- loading

    def load(self, case: Case, modalities: list[str] | None = None, with_seg: bool | None = None) -> Volume:
        """Check and read the series into a `Volume` in the reference series' grid; the study's mapping
        warnings (sequences not found) and the plausibility warnings (`neuromap.io.plausibility`) come with it.

        All series must share one grid: segmenting series from different grids needs raw-scan preparation
        (co-registration), which is a separate step, so it is refused here with that fix in the message."""
        choice = case.study
        modalities = list(modalities or case.modalities)
        self.require(case, modalities)
        if with_seg:
            raise NeuroMapError(f"DICOM study {case.root}: has no ground-truth segmentation to read.")
        reference = choice.reference(modalities)
        if off_grid := self.off_grid(case, modalities):
            raise NeuroMapError(
                f"DICOM study {case.root}: the series are on different voxel grids (reference "
                f"{reference.label()}; different: {'; '.join(off_grid)}). Segmenting them needs raw-scan preparation "
                "(co-registration to the reference sequence). Fix: run with --raw, or map series acquired on one grid."
            )
        series = [case.images[m].series for m in modalities]
        with ThreadPoolExecutor(max_workers=min(2, len(series))) as pool:
            channels = list(pool.map(read_series, series))
        findings = check_sequences(channels, modalities, [f"DICOM series {s.label()}" for s in series])
        if findings.problems:
            raise NeuroMapError("\n".join(findings.problems))
        grid = reference_image(reference)
        thick = header_warnings({f"DICOM series {reference.label()}": grid})  # one grid for every series
        return Volume(case=case, image=np.stack(channels), modalities=modalities, reference=grid,
                      warnings=[*self.notes(case), *thick, *findings.warnings])

    def off_grid(self, case: Case, modalities: list[str]) -> list[str]:
        """Series whose grid differs from the reference series' (see `Layout.off_grid`)."""
        self.require(case, modalities)
        reference = case.study.reference(modalities)
        return [f"{m}: {case.images[m].series.label()}" for m in modalities
                if not same_grid(case.images[m].series, reference)]

    def require(self, case: Case, modalities: list[str]) -> None:
        missing = [m for m in modalities if m not in case.images]
        if missing:
            raise NeuroMapError(
                f"DICOM study {case.root}: no series for {missing}.\n{case.study.listing()}\n"
                f"Fix: name them with --map, e.g. --map {missing[0]}=SERIES_UID (or the series number or description)."
            )

    def read_sequence(self, case: Case, modality: str) -> tuple[np.ndarray, nib.Nifti1Image]:
        self.require(case, [modality])
        series = case.images[modality].series
        return read_series(series), reference_image(series)

    def notes(self, case: Case) -> list[str]:
        return list(case.study.warnings)

    # ------------------------------------------------------------------------------------- outputs


    def report_extra(self, prediction: Prediction) -> dict:
        choice = prediction.case.study
        reference = choice.reference(prediction.volume.modalities)
        return {"dicom": {"reference_series": reference.uid, **choice.report()}}

    def stage_labels(self, prediction: Prediction, files: dict[str, Path], stack: contextlib.ExitStack,
                     overwrite: bool) -> None:
        super().stage_labels(prediction, files, stack, overwrite)
        if DICOM_SEG in files:
            choice = prediction.case.study
            numbers = [s.number for s in choice.series if s.number is not None]
            write_dicom_seg(prediction.internal, choice.reference(prediction.volume.modalities),
                            stack.enter_context(atomic_path(files[DICOM_SEG], overwrite)),
                            f"NeuroMap {prediction.spec.model.name}", max(numbers, default=0) + 1)

    # ------------------------------------------------------------------------------------- labels back

    def label_files(self, root: Path, predicted: bool) -> list[LabelFile]:
        return []
