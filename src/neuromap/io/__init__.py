"""Reading cases and writing results: `Layout` objects (NIfTI cases, LGG slice folders, DICOM studies) own discovery,
loading, the output files and reading labels back; `neuromap.io.inputs` turns what a user gives into cases."""

from neuromap.io.atomic import atomic_path, write_bytes_atomic
from neuromap.io.case import Case, ImageRef, Volume, duplicate_ids
from neuromap.io.inputs import cases_from_inputs, read_mapping_file
from neuromap.io.layouts import DICOM, LAYOUTS, LGG, NIFTI, discover_cases, label_files, load_case, validate_case

__all__ = [
    "DICOM", "LAYOUTS", "LGG", "NIFTI", "Case", "ImageRef", "Volume", "atomic_path", "cases_from_inputs",
    "discover_cases", "duplicate_ids", "label_files", "load_case", "read_mapping_file", "validate_case",
    "write_bytes_atomic",
]
