"""Reading the sequences of a raw case, each on its own grid, and choosing the reference sequence.

A raw case is any case NeuroMap can discover as 3D scans (NIfTI files in a supported naming, a `--map`, or a DICOM
study): its layout reads each sequence alone (`Layout.read_sequence`), and only the check that every sequence
shares one grid is dropped. Each sequence is still checked on its own (readable, 3D, more than one slice, and a
plausible MRI sequence: `neuromap.io.plausibility.check_sequence`) and all problems are reported together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.io.case import Case
from neuromap.io.layout import Layout
from neuromap.io.plausibility import check_sequence
from neuromap.prepare_raw.grid import to_sitk
from neuromap.prepare_raw.register import too_small_to_register

REFERENCE_ORDER = ("t1ce", "flair")  # the sharpest tumour contrast first; as DICOM studies choose theirs


@dataclass
class Sequence:
    """One sequence on its own grid: the array (X, Y, Z), its RAS affine, where it came from."""

    modality: str
    array: np.ndarray
    affine: np.ndarray
    source: str
    header: nib.Nifti1Image  # its grid's image: the reference sequence's header and affine are the outputs'
    warnings: list[str] = field(default_factory=list)  # what is odd about its values (`check_sequence`)

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


def read_sequences(case: Case, modalities: list[str], layout: Layout) -> dict[str, Sequence]:
    """Read and check every requested sequence of ``case`` alone, through the ``layout`` that found it
    (`Layout.read_sequence`: NIfTI files or DICOM series); every problem is reported together."""
    layout.require(case, modalities)
    sequences, problems = {}, []
    for modality in modalities:
        source = str(case.images[modality])
        try:
            array, image = layout.read_sequence(case, modality)
        except NeuroMapError as exc:
            problems.append(str(exc))
            continue
        sequences[modality] = seq = Sequence(modality, array, image.affine, source, image)
        if seq.array.ndim != 3:
            problems.append(f"{seq.source}: image is {seq.array.ndim}D with shape {seq.array.shape}; a 3D volume "
                            "is required.")
        elif min(seq.array.shape) < 2:
            problems.append(f"{seq.source}: a single slice ({seq.array.shape}); a volume is required.")
        elif len(modalities) > 1 and (small := too_small_to_register(seq.array.shape, seq.spacing)):
            problems.append(f"{seq.source}: {small}. Fix: give the whole scan of the head, not a slab or a crop.")
        else:
            findings = check_sequence(seq.array, modality, seq.source)
            problems += findings.problems
            seq.warnings = findings.warnings
    if problems:
        raise NeuroMapError("\n".join(problems))
    for seq in sequences.values():
        seq.sitk()  # geometry an ITK image can carry (orthogonal axes), checked before any work
    return sequences
