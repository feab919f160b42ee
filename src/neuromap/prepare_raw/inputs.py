"""Reading the sequences of a raw case, each on its own grid, and choosing the reference sequence.

A raw case is any case NeuroMap can discover (NIfTI files in a supported naming, a `--map`, or a DICOM study):
only the check that every sequence shares one grid is dropped. Each sequence is still checked on its own
(readable, 3D, finite, not empty) and all problems are reported together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.io.cases import Case
from neuromap.prepare_raw.grid import to_sitk

REFERENCE_ORDER = ("t1ce", "flair")  # the sharpest tumour contrast first; as DICOM studies choose theirs


@dataclass
class Sequence:
    """One sequence on its own grid: the array (X, Y, Z), its RAS affine, where it came from."""

    modality: str
    array: np.ndarray
    affine: np.ndarray
    source: str
    header: object = None  # the nibabel image whose header the outputs copy (the reference's is used)

    def sitk(self):
        return to_sitk(self.array, self.affine, self.source)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def choose_reference(modalities: list[str], requested: str | None = None) -> str:
    """T1ce, else FLAIR, else the first sequence; ``requested`` (``--reference``) overrides."""
    if requested:
        from neuromap.config import canonical_modality

        wanted = canonical_modality(requested)
        if wanted not in modalities:
            raise NeuroMapError(
                f"--reference {requested}: the model reads {', '.join(modalities)}, not {wanted}. "
                f"Fix: choose one of {', '.join(modalities)}."
            )
        return wanted
    return next((m for m in REFERENCE_ORDER if m in modalities), modalities[0])


def read_sequences(case: Case, modalities: list[str]) -> dict[str, Sequence]:
    """Read and check every requested sequence of ``case`` (NIfTI files or DICOM series)."""
    missing = [m for m in modalities if m not in case.images]
    if missing:
        raise NeuroMapError(
            f"case '{case.case_id}' ({case.root}): missing modality {missing} (found: {case.modalities}). "
            "Fix: add the file(s), map them with --map, or choose a model that needs only the sequences present."
        )
    sequences, problems = {}, []
    for modality in modalities:
        try:
            sequences[modality] = _read(case, modality)
        except NeuroMapError as exc:
            problems.append(str(exc))
            continue
        seq = sequences[modality]
        if seq.array.ndim != 3:
            problems.append(f"{seq.source}: image is {seq.array.ndim}D with shape {seq.array.shape}; a 3D volume "
                            "is required.")
        elif not np.all(np.isfinite(seq.array)):
            problems.append(f"{seq.source}: contains NaN or infinite values. Fix: re-export the {modality} image.")
        elif not np.any(seq.array):
            problems.append(f"{seq.source}: the {modality} image is all zero (empty).")
        elif min(seq.array.shape) < 2:
            problems.append(f"{seq.source}: a single slice ({seq.array.shape}); a volume is required.")
    if problems:
        raise NeuroMapError("\n".join(problems))
    for seq in sequences.values():
        seq.sitk()  # geometry an ITK image can carry (orthogonal axes), checked before any work
    return sequences


def _read(case: Case, modality: str) -> Sequence:
    ref = case.images[modality]
    series = getattr(ref, "series", None)
    if series is not None:  # a DICOM series
        from neuromap.io.dicom import read_series, reference_image

        if series.problem:
            raise NeuroMapError(f"DICOM series {series.label()}: {series.problem}.")
        return Sequence(modality, read_series(series), series.affine, str(ref), reference_image(series))
    from neuromap.io.nifti import open_nifti, read_nifti, spatial_shape

    image = open_nifti(ref, f"{modality} image")
    spatial_shape(image, ref)  # a 4D file is accepted only as one channel
    return Sequence(modality, read_nifti(image, ref), image.affine, str(ref), image)
