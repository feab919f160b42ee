"""DICOM studies in, DICOM SEG out: made from a real BraTS case written as DICOM series (real files, real I/O).

The study is a crop of Brats18_2013_2_1 (160 x 192 x 60 voxels through the tumour) written by
`neuromap.io.dicom_export.write_study`: a three-plane localizer, four series with scanner-like descriptions,
TR/TE/TI and a contrast agent on the T1ce, random file names, alternating InstanceNumber direction, nested
folders, one series split over two folders, plus a README and other non-DICOM files lying around.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import BRATS, UNLABELLED, needs_real_data
from nibabel.eulerangles import euler2mat

from neuromap.cli import main
from neuromap.errors import NeuroMapError
from neuromap.io import DICOM, discover_cases, load_case
from neuromap.io.dicom import Series, read_series, scan_dicom
from neuromap.io.dicom_export import PROTOCOL, Study, write_series, write_study
from neuromap.io.dicom_map import classify, propose
from neuromap.io.dicom_seg import read_dicom_seg, write_dicom_seg
from neuromap.labels import to_internal
from neuromap.segmenter import segment

CASE = BRATS / "Brats18_2013_2_1"
MODALITIES = ("t1", "t1ce", "t2", "flair")
CROP = (slice(40, 200), slice(30, 222), slice(60, 120))


def case_images(crop=CROP) -> dict[str, nib.Nifti1Image]:
    """The real case's sequences and labels, cropped: what these tests (and the web app's DICOM test) write as
    DICOM series."""
    return {m: nib.load(CASE / f"{CASE.name}_{m}.nii.gz").slicer[crop] for m in (*MODALITIES, "seg")}


@pytest.fixture(scope="module")
def sources() -> dict[str, nib.Nifti1Image]:
    return case_images()


@pytest.fixture(scope="module")
def study(tmp_path_factory, sources) -> Path:
    root = tmp_path_factory.mktemp("dicom") / "Patient01"
    write_study({m: sources[m] for m in MODALITIES}, root)
    (root / "DICOM" / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not dicom at all")
    (root / "DICOM" / "S002" / ".DS_Store").write_bytes(b"\x00" * 200)
    return root


@pytest.fixture(scope="module")
def nifti_case(tmp_path_factory, sources) -> Path:
    folder = tmp_path_factory.mktemp("nifti") / "Crop"
    folder.mkdir()
    for m, img in sources.items():
        nib.save(img, folder / f"Crop_{m}.nii.gz")
    return folder


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()


def _series(description: str = "", protocol: str = "", **tags) -> Series:
    """A header-only series for classification tests (no files)."""
    return Series(uid="1.2.3", study_uid="1.2", number=1, description=description, protocol=protocol,
                  tags={"Modality": "MR", **{k: str(v) for k, v in tags.items()}}, files=[])


@pytest.mark.parametrize(("description", "tags", "expected"), [
    ("AX T1 POST GAD", {}, "t1ce"),
    ("t1_se_tra", {"ContrastBolusAgent": "Dotarem"}, "t1ce"),
    ("T1 +C AX", {}, "t1ce"),
    ("AX T1 FLAIR POST", {}, "t1ce"),
    ("Sag MPRAGE", {}, "t1"),
    ("T1 PRE", {"ContrastBolusAgent": "Gadovist"}, "t1"),
    ("t2_tse_tra", {}, "t2"),
    ("AX T2 FSE", {}, "t2"),
    ("T2 FLAIR AX", {}, "flair"),
    ("t2_tirm_tra_dark-fluid", {}, "flair"),
    ("Series 7", {"RepetitionTime": 9000, "EchoTime": 120, "InversionTime": 2500}, "flair"),
    ("Series 8", {"RepetitionTime": 4000, "EchoTime": 100}, "t2"),
    ("Series 9", {"RepetitionTime": 550, "EchoTime": 10, "ContrastBolusAgent": "Gd"}, "t1ce"),
    ("ep2d_diff_3scan_trace", {}, None),
    ("AX SWI", {}, None),
    ("T2* GRE AX", {}, None),
    ("DSC perfusion", {}, None),
    ("3-PLANE LOC", {}, None),
    ("AAHead_Scout", {}, None),
    ("Series 10", {}, None),
])
def test_sequence_from_names_and_tags(description, tags, expected):
    assert classify(_series(description, **tags)).modality == expected


def test_localizer_by_image_type():
    assert classify(_series("AX T1", ImageType="ORIGINAL\\PRIMARY\\LOCALIZER")).modality is None


@needs_real_data
def test_series_found_in_any_order_with_exact_geometry(study, sources):
    series, _ = scan_dicom(study)
    by_description = {s.description: s for s in series}
    assert sorted(by_description) == sorted(["3-PLANE LOC", *(PROTOCOL[m]["description"] for m in MODALITIES)])
    assert "orientations" in by_description["3-PLANE LOC"].problem
    for modality in MODALITIES:
        s = by_description[PROTOCOL[modality]["description"]]
        assert s.problem is None and s.shape == (160, 192, 60)
        np.testing.assert_allclose(s.affine, sources[modality].affine, atol=1e-3)
        assert np.array_equal(read_series(s), np.asarray(sources[modality].dataobj))


@needs_real_data
def test_study_loads_as_the_nifti_case(study, nifti_case):
    (case,) = discover_cases(study)
    assert case.naming == "dicom" and case.case_id == "Patient01" and case.modalities == list(MODALITIES)
    volume, reference = load_case(case), load_case(discover_cases(nifti_case)[0])
    assert np.array_equal(volume.image, reference.image)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-3)
    assert volume.spacing == reference.spacing


@needs_real_data
@pytest.mark.parametrize("variant", ["oblique", "RAS-stored", "intercept", "slope per slice"])
def test_geometry_round_trip_variants(tmp_path, variant):
    """Oblique grid, rows running right-to-left (RAS-stored NIfTI), unsigned + RescaleIntercept, and a slope
    that differs between slices: each must come back as the same image in world space."""
    small = (slice(60, 124), slice(70, 134), slice(70, 82))
    if variant == "RAS-stored":
        img = nib.load(next((UNLABELLED / "AURORA-example").glob("*t1c.nii.gz"))).slicer[small]
    else:
        img = nib.load(CASE / f"{CASE.name}_t2.nii.gz").slicer[small]
    if variant == "oblique":
        rotation = euler2mat(0.3, -0.2, 0.25)
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), np.block([[rotation @ img.affine[:3, :3], img.affine[:3, 3:]],
                                                                    [np.zeros((1, 3)), np.ones((1, 1))]]))
    files = write_series(img, tmp_path, Study(), series_number=3, description=variant, random_names=True,
                         intercept=-1000.0 if variant == "intercept" else None)
    expected = np.asarray(img.dataobj, dtype=np.float32)
    if variant == "slope per slice":
        for path in files:
            ds = pydicom.dcmread(path)
            if ds.InstanceNumber % 2 == 0:  # every other slice stored halved, with slope 2
                ds.PixelData = (ds.pixel_array // 2).astype(np.int16).tobytes()
                ds.RescaleSlope, ds.RescaleIntercept = "2", "0"
                ds.save_as(path)
        expected[:, :, 1::2] = (expected[:, :, 1::2] // 2) * 2
    ((series,), _) = scan_dicom(tmp_path)
    back = nib.as_closest_canonical(nib.Nifti1Image(read_series(series), series.affine))
    truth = nib.as_closest_canonical(nib.Nifti1Image(expected, img.affine))
    np.testing.assert_allclose(back.affine, truth.affine, atol=1e-3)
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(truth.dataobj))


@needs_real_data
def test_mapping_report_and_overrides(study):
    (case,) = DICOM.cases(study)
    choice = case.study
    assert {m: s.description for m, s in choice.used.items()} == {m: PROTOCOL[m]["description"] for m in MODALITIES}
    assert "contrast agent tag" in choice.why["t1ce"]
    report = choice.report()
    assert [s["description"] for s in report["series_ignored"]] == ["3-PLANE LOC"]
    assert "localizer" in report["series_ignored"][0]["reason"]
    t2, flair = choice.used["t2"], choice.used["flair"]
    # Swap T2 and FLAIR: by exact description (any case and spacing) and by SeriesInstanceUID.
    (swapped,) = DICOM.cases(study, {"flair": "ax  t2 fse", "t2": flair.uid})
    assert swapped.study.used["flair"].uid == t2.uid and swapped.study.used["t2"].uid == flair.uid
    (by_number,) = DICOM.cases(study, {"t1ce": str(choice.used["t1"].number)})
    assert by_number.study.used["t1ce"].uid == choice.used["t1"].uid
    with pytest.raises(NeuroMapError, match=r"--map t1ce=NOPE matches no series(.|\n)*AX T1 POST GAD"):
        DICOM.cases(study, {"t1ce": "NOPE"})


@needs_real_data
def test_ambiguous_and_incomplete_mappings_list_the_series(tmp_path):
    small = case_images((slice(60, 124), slice(70, 134), slice(80, 86)))
    root, study = tmp_path / "ambiguous", Study()
    write_study({m: small[m] for m in MODALITIES}, root, study)
    write_series(small["t1ce"], root / "extra", study, series_number=9, description="AX T1 POST GAD 3D",
                 protocol="t1_mprage_post")
    with pytest.raises(NeuroMapError) as error:
        DICOM.cases(root)
    message = str(error.value)
    assert "ambiguous" in message and "--map" in message and "64x64x6" in message
    for description in ("AX T1 POST GAD", "AX T1 POST GAD 3D", "T2 FLAIR AX", "3-PLANE LOC"):
        assert f"'{description}'" in message
    series = scan_dicom(root)[0]
    uids = {s.description: s.uid for s in series}
    assert uids["AX T1 POST GAD 3D"] in message
    # What a page shows instead of refusing: the tie, with both series, and the rest chosen.
    proposal = propose(series)
    assert {m: [s.description for s in tied] for m, tied in proposal.ambiguous.items()} == {
        "t1ce": ["AX T1 POST GAD", "AX T1 POST GAD 3D"]}
    assert {proposal.used[m].description for m in ("t1", "t2", "flair")} == {"AX T1 SE", "AX T2 FSE", "T2 FLAIR AX"}
    (case,) = DICOM.cases(root, {"t1ce": "9"})
    assert case.study.used["t1ce"].uid == uids["AX T1 POST GAD 3D"]
    assert main(["validate", str(root), "--map", "t1ce=9"]) == 0

    partial = tmp_path / "no_flair"
    write_study({m: small[m] for m in ("t1", "t1ce", "t2")}, partial)
    with pytest.raises(NeuroMapError, match=r"no series recognised as flair(.|\n)*AX T2 FSE(.|\n)*Fix: name them"):
        DICOM.cases(partial)


@needs_real_data
def test_series_on_different_grids_need_raw_preparation(tmp_path, capsys):
    small = case_images((slice(60, 124), slice(70, 134), slice(80, 86)))
    small["t2"] = small["t2"].slicer[::2, ::2, :]  # a thicker in-plane grid, as a real scanner's T2 often is
    write_study({m: small[m] for m in MODALITIES}, tmp_path / "study")
    assert main(["validate", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err
    assert "different voxel grids" in err and "AX T2 FSE" in err and "--raw" in err


@needs_real_data
def test_segment_dicom_study_matches_nifti_and_writes_dicom_seg(study, nifti_case, tmp_path):
    before = _tree_digest(study)
    assert main(["segment", str(study), "-o", str(tmp_path / "dicom"), "--dicom-seg", "--quiet"]) == 0
    (from_nifti,) = segment(nifti_case, tmp_path / "nifti")
    assert _tree_digest(study) == before  # inputs untouched

    out = tmp_path / "dicom"
    assert sorted(p.name for p in out.iterdir()) == [f"Patient01_{k}" for k in (
        "overlay.png", "report.json", "seg.dcm", "seg.nii.gz")]
    labels = nib.load(out / "Patient01_seg.nii.gz")
    expected = np.asarray(from_nifti.labels.dataobj)
    np.testing.assert_allclose(labels.affine, from_nifti.labels.affine, atol=1e-3)
    got = np.asarray(labels.dataobj)
    for name, members in {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}.items():
        a, b = np.isin(got, members), np.isin(expected, members)
        assert 2 * (a & b).sum() / max(a.sum() + b.sum(), 1) >= 0.99, name
    assert np.isin(expected, (1, 2, 4)).sum() > 1000  # a real tumour was found, so the comparison means something

    import json

    report = json.loads((out / "Patient01_report.json").read_text())
    used = report["dicom"]["series_used"]
    assert {m: used[m]["description"] for m in MODALITIES} == {m: PROTOCOL[m]["description"] for m in MODALITIES}
    assert report["dicom"]["series_ignored"][0]["description"] == "3-PLANE LOC"
    assert report["dicom"]["reference_series"] == used["t1ce"]["uid"]

    ds = pydicom.dcmread(out / "Patient01_seg.dcm")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
    assert "RESEARCH USE ONLY" in ds.SeriesDescription.upper() and "research use only" in ds.ContentDescription.lower()
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == used["t1ce"]["uid"]
    codes = [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in ds.SegmentSequence]
    assert codes == [("NCR/NET", "6574001"), ("ED", "79654002"), ("ET", "C113842")]
    (case,) = DICOM.cases(study)
    reference = case.study.used["t1ce"]
    assert np.array_equal(read_dicom_seg(out / "Patient01_seg.dcm", reference), to_internal(got, "brats"))


@needs_real_data
def test_dicom_seg_round_trip_with_empty_segments(study, sources, tmp_path):
    (case,) = DICOM.cases(study)
    reference = case.study.used["flair"]
    truth = to_internal(np.asarray(sources["seg"].dataobj), "brats")
    for name, labels in {"no_et": np.where(truth == 3, 0, truth), "empty": np.zeros_like(truth)}.items():
        write_dicom_seg(labels, reference, tmp_path / f"{name}.dcm", "NeuroMap test", series_number=50)
        assert len(pydicom.dcmread(tmp_path / f"{name}.dcm").SegmentSequence) == 3
        assert np.array_equal(read_dicom_seg(tmp_path / f"{name}.dcm", reference), labels), name


@needs_real_data
def test_api_series_map_and_dicom_seg_only_for_dicom(study, nifti_case, tiny_checkpoint, tmp_path):
    t1 = DICOM.cases(study)[0].study.used["t1"]
    (result,) = segment(study, tmp_path / "api", model=tiny_checkpoint, mapping={"t1": t1.uid})
    assert result.report["dicom"]["series_used"]["t1"]["why"] == f"--map t1={t1.uid}"
    assert not (tmp_path / "api" / "Patient01_seg.dcm").exists()
    with pytest.raises(NeuroMapError, match="--dicom-seg needs a DICOM input"):
        segment(nifti_case, tmp_path / "nifti", model=tiny_checkpoint, dicom_seg=True)


@needs_real_data
def test_several_studies_are_several_cases_and_seg_objects_are_skipped(tmp_path):
    small = case_images((slice(60, 124), slice(70, 134), slice(80, 84)))
    for patient in ("P1", "P2"):
        write_study({m: small[m] for m in MODALITIES}, tmp_path / "export" / patient, Study(patient_id=patient))
    t1 = sorted(scan_dicom(tmp_path / "export" / "P1")[0], key=lambda s: s.number)[1]  # [0] is the localizer
    write_dicom_seg(np.zeros(t1.shape, np.uint8), t1, tmp_path / "export" / "P1" / "old_seg.dcm", "x", 60)
    cases = discover_cases(tmp_path / "export")
    assert [(c.case_id, c.naming, c.modalities) for c in cases] == [("P1", "dicom", list(MODALITIES)),
                                                                     ("P2", "dicom", list(MODALITIES))]
    assert any("old_seg.dcm" in note for note in cases[0].study.report()["skipped_files"])
    with pytest.raises(NeuroMapError, match="holds 2 studies"):
        DICOM.cases(tmp_path / "export", {"t1": "2"})


@needs_real_data
def test_pipes_and_loops_in_a_study_tree_are_passed_over(study, tmp_path):
    """A pipe would block the reader forever and a link loop would walk forever: both are skipped, the study's
    series are found as without them."""
    import os
    import shutil

    tree = Path(shutil.copytree(study, tmp_path / "Patient01", symlinks=True))
    os.mkfifo(tree / "DICOM" / "IM_pipe")
    (tree / "DICOM" / "loop").symlink_to(tree, target_is_directory=True)
    found = sorted(s.description for s in scan_dicom(tree)[0])
    assert found == sorted(s.description for s in scan_dicom(study)[0]) and len(found) == 5
