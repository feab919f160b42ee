"""Reading cases (NIfTI layouts, MSD, LGG slices, user mappings) and writing results atomically."""

from neuromap.io.atomic import atomic_path, write_bytes_atomic
from neuromap.io.cases import (
    Case,
    ImageRef,
    case_from_folder,
    case_from_mapping,
    discover_cases,
    duplicate_ids,
    read_mapping_file,
)
from neuromap.io.nifti import Volume, label_image, load_case, validate_case, write_labels

__all__ = [
    "Case", "ImageRef", "Volume", "atomic_path", "case_from_folder", "case_from_mapping", "discover_cases",
    "duplicate_ids", "label_image", "load_case", "read_mapping_file", "validate_case", "write_bytes_atomic",
    "write_labels",
]
