"""Write a NIfTI volume as a DICOM MR series: how the team turns prepared cases into DICOM studies.

Used by the tests and `benchmarks/dicom_reader.py` (geometry round trips against the NIfTI the series came
from), and useful to check NeuroMap's DICOM input on any NIfTI case. The files carry the tags a scanner
export has and that `neuromap.io.dicom` reads: patient/study/series identity, SeriesDescription,
ProtocolName, MR acquisition tags (TR/TE/TI, ScanningSequence, contrast agent), and exact geometry
(ImagePositionPatient per slice, ImageOrientationPatient, PixelSpacing). Pixel values are stored as they are
(int16) or, with ``intercept``, shifted to unsigned with RescaleIntercept, as some scanners do.

Geometry convention: voxel (i, j, k) of the NIfTI becomes pixel (row j, column i) of slice k, so the DICOM
row direction is the NIfTI's first axis and the column direction its second. NIfTI world coordinates are
RAS+, DICOM's are LPS+: x and y change sign.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from neuromap.errors import NeuroMapError

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Study:
    """Identity shared by the series of one study (one session: one frame of reference)."""

    patient_id: str = "NEUROMAP-TEST"
    patient_name: str = "Test^Patient"
    study_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    study_date: str = "20240101"
    study_description: str = "MR BRAIN W/WO CONTRAST"


def _ds(values) -> list[str]:
    """Decimal strings of at most 16 characters with the most precision that fits (DICOM DS limit)."""
    return [format_number_as_ds(float(v)) for v in values]


def slice_geometry(affine: np.ndarray) -> tuple[list[float], list[float], np.ndarray, np.ndarray]:
    """(ImageOrientationPatient, PixelSpacing [row, column], origin LPS, slice step LPS) of a NIfTI affine.

    Raises NeuroMapError for sheared grids: DICOM orientation vectors must be orthogonal."""
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=float)[:3]
    sizes = np.linalg.norm(lps[:, :3], axis=0)
    axes = lps[:, :3] / sizes
    if abs(axes[:, 0] @ axes[:, 1]) > 1e-4 or abs(axes[:, 2] @ np.cross(axes[:, 0], axes[:, 1])) < 1 - 1e-4:
        raise NeuroMapError("the NIfTI grid is sheared; DICOM can only store orthogonal slice stacks.")
    orientation = [*axes[:, 0], *axes[:, 1]]
    return orientation, [sizes[1], sizes[0]], lps[:, 3], lps[:, 2]


def write_series(
    image: nib.Nifti1Image, folder: str | Path, study: Study, *, series_number: int, description: str,
    protocol: str | None = None, acquisition: dict | None = None, intercept: float | None = None,
    random_names: bool = False, reverse_instance_numbers: bool = False, z_range: tuple[int, int] | None = None,
    series_uid: str | None = None,
) -> list[Path]:
    """Write one slice file per axial slice of ``image`` into ``folder``; return the files.

    ``acquisition``: extra MR tags by keyword (RepetitionTime, EchoTime, InversionTime, ScanningSequence,
    ContrastBolusAgent, ...). ``random_names``: file names are random UIDs, so directory order says nothing
    about slice order. ``z_range``: write only slices [start, stop) (geometry stays exact). ``series_uid``:
    add to an existing series (several volumes at the same positions, as diffusion or perfusion series hold).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = np.asanyarray(image.dataobj)
    if data.ndim != 3:
        raise NeuroMapError(f"only 3D images can be written as a series, got shape {data.shape}.")
    start, stop = z_range or (0, data.shape[2])
    orientation, spacing, origin, step = slice_geometry(image.affine)
    thickness = float(np.linalg.norm(step))
    series_uid = series_uid or generate_uid()
    if intercept is not None:
        stored = (data - intercept).astype(np.uint16)
        if not np.array_equal(stored.astype(np.float64) + intercept, data):
            raise NeuroMapError(f"intercept {intercept} cannot represent the values exactly as unsigned 16-bit.")
    else:
        stored = data.astype(np.int16)
        if not np.array_equal(stored, data):
            raise NeuroMapError("values do not fit in int16; give an intercept or rescale first.")
    paths = []
    count = stop - start
    for n, k in enumerate(range(start, stop)):
        ds = _base_dataset(study, series_uid, series_number, description, protocol or description)
        position = origin + k * step
        ds.InstanceNumber = count - n if reverse_instance_numbers else n + 1
        ds.ImagePositionPatient = _ds(position)
        ds.ImageOrientationPatient = _ds(orientation)
        ds.PixelSpacing = _ds(spacing)
        ds.SliceThickness = format_number_as_ds(thickness)
        ds.SpacingBetweenSlices = format_number_as_ds(thickness)
        ds.SliceLocation = format_number_as_ds(float(position @ np.cross(orientation[:3], orientation[3:])))
        for keyword, value in (acquisition or {}).items():
            setattr(ds, keyword, value)
        _set_pixels(ds, stored[:, :, k].T)
        if intercept is not None:
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = format_number_as_ds(intercept), "1", "US"
        name = f"{generate_uid(prefix=None)[5:25]}.dcm" if random_names else f"IM{n + 1:05d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _base_dataset(study: Study, series_uid: str, number: int, description: str, protocol: str) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, sop_uid
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    ds.Modality, ds.Manufacturer = "MR", "NeuroMap NIfTI export"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = study.patient_name, study.patient_id, "", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study.study_uid, study.study_date, "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.StudyDescription = study.study_description
    ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, number
    ds.SeriesDescription, ds.ProtocolName = description, protocol
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = study.frame_of_reference_uid, ""
    ds.BodyPartExamined = "BRAIN"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    """16-bit monochrome pixel data (signed for int16, unsigned for uint16) and the tags describing it."""
    pixels = np.ascontiguousarray(pixels)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = pixels.tobytes()


def write_localizer(folder: str | Path, study: Study, series_number: int = 1, size: int = 64) -> list[Path]:
    """A three-plane localizer (axial, coronal, sagittal single slices in one series), as every study has."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    planes = {"axial": [1, 0, 0, 0, 1, 0], "coronal": [1, 0, 0, 0, 0, -1], "sagittal": [0, 1, 0, 0, 0, -1]}
    paths = []
    for n, (plane, orientation) in enumerate(planes.items()):
        ds = _base_dataset(study, series_uid, series_number, "3-PLANE LOC", "localizer")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = _ds([-120, -120, 60])
        ds.ImageOrientationPatient = _ds(orientation)
        ds.PixelSpacing = _ds([240 / size, 240 / size])
        ds.SliceThickness = "10"
        ds.ScanningSequence, ds.RepetitionTime, ds.EchoTime = "GR", "8.6", "4.0"
        _set_pixels(ds, (np.hypot(*np.mgrid[-1:1:size * 1j, -1:1:size * 1j]) < 0.8).astype(np.int16) * 300)
        path = folder / f"LOC_{plane}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# Tags of a typical clinical glioma protocol, by canonical modality: what the series written by
# `write_study` carry (descriptions as scanners name them; TR/TE/TI in ms).
PROTOCOL: dict[str, dict] = {
    "t1": {"description": "AX T1 SE", "acquisition": {
        "ScanningSequence": "SE", "SequenceVariant": "SK", "RepetitionTime": "500", "EchoTime": "12"}},
    "t1ce": {"description": "AX T1 POST GAD", "acquisition": {
        "ScanningSequence": "SE", "SequenceVariant": "SK", "RepetitionTime": "500", "EchoTime": "12",
        "ContrastBolusAgent": "Gadobutrol 7.5 ml"}},
    "t2": {"description": "AX T2 FSE", "acquisition": {
        "ScanningSequence": "SE", "SequenceVariant": "SK", "RepetitionTime": "4500", "EchoTime": "102"}},
    "flair": {"description": "T2 FLAIR AX", "acquisition": {
        "ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP"], "RepetitionTime": "9000",
        "EchoTime": "120", "InversionTime": "2500"}},
}


def write_study(
    images: dict[str, nib.Nifti1Image], root: str | Path, study: Study | None = None, *,
    z_range: tuple[int, int] | None = None, localizer: bool = True,
) -> dict[str, list[Path]]:
    """A realistic study export: a localizer, then one series per modality (`PROTOCOL` tags) with shuffled
    file names, nested folders, and one series split over two folders (PACS exports do that); plus a
    non-DICOM file. Returns the files by modality ("localizer" too)."""
    root = Path(root)
    study = study or Study()
    written: dict[str, list[Path]] = {}
    if localizer:
        written["localizer"] = write_localizer(root / "DICOM" / "S001", study)
    for n, (modality, image) in enumerate(images.items()):
        spec = PROTOCOL[modality]
        folder = root / "DICOM" / f"S{n + 2:03d}" / "IMAGES"
        written[modality] = write_series(
            image, folder, study, series_number=n + 2, description=spec["description"],
            acquisition=spec["acquisition"], random_names=True, reverse_instance_numbers=n % 2 == 1, z_range=z_range,
        )
    if images:  # the last series' first half moves to another folder
        last = list(images)[-1]
        other = root / "DICOM" / "S999"
        other.mkdir(parents=True, exist_ok=True)
        half = len(written[last]) // 2
        written[last] = [p.rename(other / p.name) for p in written[last][:half]] + written[last][half:]
    (root / "README.txt").write_text("Exported by NeuroMap's NIfTI-to-DICOM writer (test data).\n")
    return written
