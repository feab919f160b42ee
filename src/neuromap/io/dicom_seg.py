"""DICOM Segmentation output (highdicom): the tumour labels as a SEG object on the reference series.

One BINARY segment per tumour class, numbered as the internal labels (1 NCR/NET, 2 ED, 3 ET) so a viewer's
legend and NeuroMap's agree. Segment codes come from the DICOM standard's own context group for glioma
sub-regions, CID 7168 "Brain Lesion Segmentation Type With Necrosis" (PS3.16), under the category "Morphologically
Abnormal Structure" (SCT 49755003, CID 7150), anatomic region Brain (SCT 12738006):

    1 NCR/NET  Necrosis            SCT 6574001   (BraTS label 1: necrotic and non-enhancing tumour core)
    2 ED       Edema               SCT 79654002  (peritumoral edema)
    3 ET       Enhancing Lesion    NCIt C113842  (GD-enhancing tumour)

The frames reference the source series' images one to one (voxel (i, j, k) of the label map is column i,
row j of the k-th slice along the normal, as `neuromap.io.dicom` reads it), so 3D Slicer, OHIF and PACS show the
SEG on that series. Segments with no voxels stay described (a stable legend); their empty frames are omitted.
Series and content descriptions say research use only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.io.dicom import Series
from neuromap.labels import ED, ET, NCR

SERIES_DESCRIPTION = "NeuroMap tumour seg - RESEARCH USE ONLY"  # DICOM LO: at most 64 characters
CONTENT_DESCRIPTION = "Research use only; not for diagnosis"
# internal label -> (segment label, property type as (value, scheme, meaning), description)
SEGMENTS: dict[int, tuple[str, tuple[str, str, str], str]] = {
    NCR: ("NCR/NET", ("6574001", "SCT", "Necrosis"), "necrotic and non-enhancing tumour core"),
    ED: ("ED", ("79654002", "SCT", "Edema"), "peritumoral edema"),
    ET: ("ET", ("C113842", "NCIt", "Enhancing Lesion"), "GD-enhancing tumour"),
}
CATEGORY = ("49755003", "SCT", "Morphologically Abnormal Structure")
BRAIN = ("12738006", "SCT", "Brain")


def _code(triple: tuple[str, str, str]):
    from pydicom.sr.coding import Code

    return Code(*triple)


def segment_descriptions(algorithm: str, version: str) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm[:64], family=codes.cid7162.ArtificialIntelligence, version=version)
    return [
        hd.seg.SegmentDescription(
            segment_number=label, segment_label=name, segmented_property_category=_code(CATEGORY),
            segmented_property_type=_code(code), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification, anatomic_regions=[_code(BRAIN)],
        )
        for label, (name, code, _) in SEGMENTS.items()
    ]


def write_dicom_seg(labels: np.ndarray, series: Series, target: Path, algorithm: str, series_number: int) -> None:
    """Write internal labels (0-3, shape = the series' X, Y, Z) as a SEG object referencing ``series``."""
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    from neuromap import __version__

    if labels.shape != series.shape:
        raise ValueError(f"label shape {labels.shape} does not match series {series.label()}")
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]
    frames = np.ascontiguousarray(np.asarray(labels, dtype=np.uint8).transpose(2, 1, 0))  # (slice, row, column)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(algorithm, __version__), series_instance_uid=generate_uid(),
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=1, manufacturer="NeuroMap",
        manufacturer_model_name=algorithm[:64], software_versions=__version__, device_serial_number="n/a",
        content_description=CONTENT_DESCRIPTION, series_description=SERIES_DESCRIPTION, content_label="TUMOUR",
        omit_empty_frames=bool(frames.any()),  # with no tumour at all, highdicom keeps every (empty) frame
    )
    seg.save_as(target, enforce_file_format=True)


def read_dicom_seg(path: str | Path, series: Series) -> np.ndarray:
    """Internal labels (X, Y, Z in ``series``' grid) from a SEG written by `write_dicom_seg` or a similar one."""
    import highdicom as hd
    import pydicom

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # pydicom/highdicom raise many types for files that are not a readable SEG
        raise NeuroMapError(f"{path}: not a readable DICOM SEG ({type(exc).__name__}: {exc}).") from None
    numbers = {int(d.SegmentNumber): d.SegmentLabel for d in seg.SegmentSequence}
    wanted = {number: label for label, (name, _, _) in SEGMENTS.items()
              for number, seg_name in numbers.items() if seg_name == name}
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            for p in series.files]
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=list(wanted), combine_segments=True, relabel=True,
        assert_missing_frames_are_empty=True,
    )
    lookup = np.array([0, *wanted.values()], dtype=np.uint8)
    return lookup[frames].transpose(2, 1, 0)
