"""What a user gives -> cases, by one rule for the CLI, the Python API and the web app.

Inputs are case folders, parent folders of cases (any layout), a list of those, or a mapping
``{modality or "seg"/"mask": file or nibabel image}`` for one case. A mapping may come with at most one case
folder: relative files in the mapping are then taken from that folder, otherwise from the current working
directory (a YAML mapping file has already made its entries relative to itself, see `read_mapping_file`). With a
DICOM study folder the mapping names series instead (modality -> SeriesInstanceUID, series number or exact
description).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import yaml

from neuromap.errors import NeuroMapError
from neuromap.io.case import Case
from neuromap.io.layouts import DICOM, NIFTI, discover_cases

Inputs = str | Path | Sequence[str | Path] | Mapping[str, str | Path | nib.spatialimages.SpatialImage] | None


@contextlib.contextmanager
def cases_from_inputs(inputs: Inputs, mapping: Mapping[str, str | Path] | None = None) -> Iterator[list[Case]]:
    """Yield the cases of ``inputs`` (see the module docstring). In-memory images are written once to a private
    temp folder (uncompressed: no gzip work) so the one validated loader reads them; the folder is removed
    when the ``with`` block ends, so use the cases inside it."""
    if isinstance(inputs, Mapping):
        if mapping:
            raise NeuroMapError("give the modality mapping once (as the inputs or as --map), not twice.")
        inputs, mapping = None, inputs
    paths = [] if inputs is None else [inputs] if isinstance(inputs, str | Path) else list(inputs)
    with tempfile.TemporaryDirectory(prefix="neuromap-") as scratch:
        if not mapping:
            if not paths:
                raise NeuroMapError("give a case folder, a folder of cases, or --map MODALITY=FILE ...")
            yield [case for path in paths for case in discover_cases(path)]
            return
        if len(paths) > 1:
            raise NeuroMapError("--map describes one case; give at most one case folder with it.")
        if paths and DICOM.claims(Path(paths[0])):  # a DICOM study: the mapping names its series
            yield DICOM.cases(paths[0], {k: str(v) for k, v in mapping.items()})
            return
        base = Path(paths[0]) if paths else Path()  # Path() / "a.nii.gz": relative to the working directory
        files: dict[str, Path] = {}
        for key, value in mapping.items():
            if isinstance(value, nib.spatialimages.SpatialImage):
                files[key] = Path(scratch) / f"{key}.nii"
                nib.save(value, str(files[key]))
            else:
                files[key] = base / Path(value)  # an absolute value replaces the base
        in_memory = any(isinstance(v, nib.spatialimages.SpatialImage) for v in mapping.values())
        yield [NIFTI.case_from_mapping(files, case_id="case" if in_memory else None)]


def read_mapping_file(path: str | Path) -> dict[str, str]:
    """A small YAML file: ``t1: a.nii.gz`` lines (relative paths are relative to the YAML file)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise NeuroMapError(f"{path}: cannot read modality mapping ({exc}).") from None
    if not isinstance(data, dict):
        raise NeuroMapError(f"{path}: mapping must be 'modality: file' lines, e.g. 't1ce: scan_t1c.nii.gz'.")
    return {str(k): str(path.parent / v) if not Path(str(v)).is_absolute() else str(v) for k, v in data.items()}
