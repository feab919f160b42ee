"""Raw scans (``--raw``): co-registration, brain extraction, 1 mm resampling, labels on the reference grid.

Real data only: a BraTS test case (never used in training) misaligned on purpose, with thick slices, and the raw
TCGA-FG-6692 clinical study (skull on, three grids, 5.5 mm slices).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import BRATS, SHARED_DATA, needs_real_data
from scipy import ndimage

from neuromap.cli import main
from neuromap.errors import NeuroMapError
from neuromap.io import discover_cases, load_case, nifti
from neuromap.labels import to_internal
from neuromap.prepare_raw import RawOptions
from neuromap.prepare_raw.grid import to_array, to_sitk, working_grid
from neuromap.prepare_raw.inputs import choose_reference
from neuromap.prepare_raw.register import POOR_SHARPNESS, nmi, sharpness
from neuromap.prepare_raw.simulate import registration_error_mm, simulate_raw
from neuromap.segmenter import segment

CASE = BRATS / "Brats18_CBICA_AOZ_1"  # the raw path against the prepared input of the same case, same model
RAW = SHARED_DATA / "raw" / "TCGA-FG-6692"
MODALITIES = ("t1", "t1ce", "t2", "flair")
# Known patient motion per sequence: rotation about x, y, z (degrees) and translation (mm), LPS scanner axes.
MOTION = {"t1": ((2.0, -3.0, 4.0), (3.0, -4.0, 2.0)), "t2": ((-4.0, 2.0, -3.0), (-5.0, 2.0, -3.0)),
          "flair": ((3.0, 3.0, -5.0), (4.0, 5.0, 4.0))}


@pytest.fixture(scope="module")
def misaligned(tmp_path_factory) -> dict:
    """The BraTS case as raw scans: every sequence in 5 mm slices; T1, T2 and FLAIR moved by a known rigid
    motion (a few degrees and mm) and each on its own grid; the ground truth on the T1ce (reference) grid."""
    sim = simulate_raw(CASE, tmp_path_factory.mktemp("raw") / "Moved", MOTION)
    return {"folder": sim.folder, "truth_ref": sim.truth_ref, "truth_1mm": sim.truth_1mm, "centre": sim.centre,
            "reference": sim.reference}


def _wt_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    a, b = pred > 0, truth > 0
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_reference_choice():
    assert choose_reference(["t1", "t1ce", "t2", "flair"]) == "t1ce"
    assert choose_reference(["t1", "t2", "flair"]) == "flair"
    assert choose_reference(["t1ce", "flair"], "FLAIR") == "flair"
    with pytest.raises(NeuroMapError, match="--reference t2"):
        choose_reference(["t1ce", "flair"], "t2")


def test_nmi_is_higher_when_aligned():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 40, 40)).cumsum(axis=0)
    mask = np.ones(a.shape, bool)
    assert nmi(a, -a, mask) > 1.9 and nmi(a, rng.permutation(a.ravel()).reshape(a.shape), mask) < 1.05
    smooth = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 2)  # structure a few voxels wide
    assert sharpness(smooth, smooth ** 2, mask)["sharpness"] > 0.9  # aligned: a 5-voxel move loses nearly all
    assert sharpness(smooth, np.roll(smooth, 5, axis=0), mask)["sharpness"] < 0  # 5 voxels off: a move can gain


def test_working_grid_spans_the_reference_box():
    image = to_sitk(np.zeros((20, 10, 4)), np.diag([-0.9, 0.9, 5.5, 1.0]))
    grid = working_grid(image)
    assert grid.GetSize() == (18, 9, 22) and grid.GetSpacing() == (1.0, 1.0, 1.0)
    # first voxel edge of both grids at the same place: origin - spacing/2 along each axis (LPS x flips)
    edge = np.array(image.GetOrigin()) - np.array([-0.45, 0.45, 2.75]) * np.array([-1, -1, 1])
    assert np.allclose(np.array(grid.GetOrigin()) - np.array([0.5, -0.5, 0.5]), edge)


def test_prepare_raw_steps_on_a_small_generated_case(synthetic_case):
    """Every step runs (N4 included) on a generated case whose FLAIR sits on another grid (2 mm thick, shifted);
    the labels come back on the T1ce's grid. Generated data: a check of the plumbing, not of accuracy."""
    from neuromap.prepare_raw import prepare_raw

    flair = next(synthetic_case.glob("*_flair.nii.gz"))
    image = nib.load(flair)
    affine = image.affine @ np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] += [1.5, -2.0, 0.5]
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, ::2], affine), flair)
    case = discover_cases(synthetic_case)[0]
    steps: list[str] = []  # what a progress display hears (the web app's bar)
    prep = prepare_raw(case, ["t1ce", "flair"], RawOptions(skull_stripped=True, n4=True), case.layout, steps.append)
    assert steps == ["read", "register", "resample", "brain_mask", "quality", "n4"]
    assert prep.reference == "t1ce" and set(prep.timings) >= {"register_s", "resample_s", "n4_s"}
    assert prep.volume.image.shape == (2, 48, 48, 32) and prep.volume.brain_mask.any()
    t1ce = nib.load(next(synthetic_case.glob("*_t1ce.nii.gz")))
    back = prep.to_reference(prep.volume.brain_mask.astype(np.uint8))
    assert back.shape == t1ce.shape and np.array_equal(prep.reference_image.affine, t1ce.affine)
    assert set(prep.report()["registration"]["flair"]) >= {"mattes_mi", "nmi_in_brain", "sharpness", "rotation_deg"}


@needs_real_data
def test_different_grids_without_raw_suggest_raw(misaligned, capsys):
    with pytest.raises(NeuroMapError, match="(?s)different voxel grids.*--raw"):
        load_case(discover_cases(misaligned["folder"])[0])
    assert main(["validate", str(misaligned["folder"])]) == 2
    assert "--raw" in capsys.readouterr().err
    assert main(["validate", str(misaligned["folder"]), "--raw"]) == 0
    assert main(["segment", str(misaligned["folder"]), "-o", "x", "--n4"]) == 2
    assert "--n4 only applies to raw scans" in capsys.readouterr().err


@needs_real_data
def test_raw_refuses_slice_folders_and_gives_no_outputs(tmp_path, capsys):
    """LGG slice folders have no geometry to register: --raw stops with the fix, before writing anything."""
    patient = next(p for p in sorted((SHARED_DATA / "lgg_kaggle_3m").iterdir()) if p.is_dir())
    assert main(["segment", str(patient), "-o", str(tmp_path / "out"), "--raw", "--quiet"]) == 2
    assert "Fix: leave out --raw" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_real_data
def test_raw_refuses_a_slab_too_thin_to_register_before_work(tmp_path, capsys):
    """Six 1 mm slices of a real case (a crop, not a head scan): refused with the sizes and the fix, before any
    registration (ITK would fail deep in its pyramid), nothing written."""
    case = discover_cases(CASE)[0]
    folder = tmp_path / "Slab"
    folder.mkdir()
    for m, path in case.images.items():
        nib.save(nib.load(path.path).slicer[:, :, 80:86], folder / f"Slab_{m}.nii.gz")
    assert main(["segment", str(folder), "-o", str(tmp_path / "out"), "--raw", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "too small to co-register (axis 3: 6 voxels of 1 mm)" in err and "Fix: give the whole scan" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def raw_run(misaligned, tmp_path_factory):
    """The misaligned case segmented with --raw (skull-stripped inputs: no deepbet), files and maps saved."""
    out = tmp_path_factory.mktemp("raw_out")
    options = RawOptions(skull_stripped=True, save_prepared=True, save_brain_mask=True)
    with pytest.MonkeyPatch.context() as patch:  # what the overlay is drawn with, for the picture's test
        draw = nifti.overlay_png
        patch.setattr(nifti, "overlay_png", lambda *args, **kwargs: PICTURE.update(kwargs) or draw(*args, **kwargs))
        return segment(misaligned["folder"], out, raw=options, uncertainty=True, probabilities=True)[0]


PICTURE: dict = {}


@needs_real_data
@pytest.mark.slow
def test_raw_picture_is_drawn_on_the_working_grid(raw_run):
    """The overlay shows the 1 mm working-grid labels, so its volumes and positions are the working grid's: with
    the reference grid's 5 mm voxels they came out several times too large and positions left the head."""
    working = raw_run.report["raw_preparation"]["working_grid"]
    shown = dict(part.split(" ")[:2] for part in PICTURE["volumes_text"].split(" · "))
    for key in ("WT", "TC", "ET"):
        assert float(shown[key]) == pytest.approx(working["volumes_ml"][key], abs=0.05), (key, shown)
    assert np.allclose(np.linalg.norm(PICTURE["file_affine"][:3, :3], axis=0), working["spacing_mm"])


@needs_real_data
@pytest.mark.slow
def test_misaligned_thick_slices_are_registered_back(misaligned, raw_run):
    """Registration undoes the known motion; labels, brain mask and prepared sequences land on their grids."""
    reference_file = nib.load(misaligned["folder"] / "Moved_t1ce.nii.gz")
    labels = nib.load(raw_run.files["seg.nii.gz"])
    assert labels.shape == reference_file.shape and np.array_equal(labels.affine, reference_file.affine)
    report = raw_run.report["raw_preparation"]
    # The found transform undoes the motion: T(T'(x)) = x within 2 mm (slices are 5 mm) around the brain centre.
    # the sequences the default model reads, besides the reference (the FLAIR+T1ce model: FLAIR only)
    assert "flair" in report["registration"] and set(report["registration"]) <= set(MOTION)
    for m, entry in report["registration"].items():
        error = registration_error_mm(entry, MOTION[m], misaligned["centre"])
        print(m, entry, f"max error {error:.2f} mm")
        assert error < 2.0, (m, error)
        assert entry["sharpness"] >= POOR_SHARPNESS, (m, entry)
    assert set(report["timings_s"]) >= {"read_s", "register_s", "resample_s", "brain_mask_s", "quality_s"}
    assert not [w for w in raw_run.report["warnings"] if "registration" in w]
    brain = nib.load(raw_run.files["brain_mask.nii.gz"])
    assert brain.shape == reference_file.shape and np.array_equal(brain.affine, reference_file.affine)
    flair = nib.load(raw_run.files["flair_prepared.nii.gz"])
    assert np.allclose(flair.header.get_zooms(), 1.0) and "research use only" in str(flair.header["descrip"])


@needs_real_data
@pytest.mark.slow
def test_raw_maps_are_on_the_reference_grid_and_agree_with_the_labels(misaligned, raw_run):
    """--uncertainty and --probabilities with --raw: computed on the 1 mm working grid, written on the reference
    sequence's thick-slice grid like the labels; the whole-tumour probability says what the labels say, and the
    model is unsure at the tumour's border, not far from it."""
    reference_file = nib.load(misaligned["folder"] / "Moved_t1ce.nii.gz")
    labels = np.asarray(nib.load(raw_run.files["seg.nii.gz"]).dataobj)
    uncertainty = nib.load(raw_run.files["uncertainty.nii.gz"])
    probabilities = nib.load(raw_run.files["probabilities.nii.gz"])
    assert uncertainty.shape == reference_file.shape and np.array_equal(uncertainty.affine, reference_file.affine)
    assert probabilities.shape == (*reference_file.shape, 3) and uncertainty.get_data_dtype() == np.uint8
    assert raw_run.report["probability_maps"]["channels"] == ["WT", "TC", "ET"]
    wt = np.asarray(probabilities.dataobj)[..., 0] >= 128
    tumour = labels > 0
    assert tumour.sum() > 1000 and 2 * (wt & tumour).sum() / (wt.sum() + tumour.sum()) > 0.9
    values = np.asarray(uncertainty.dataobj).astype(float)
    border = tumour ^ ndimage.binary_erosion(tumour)
    far = ~ndimage.binary_dilation(tumour, iterations=5)
    assert values[border].mean() > 4 * values[far].mean() and values[border].mean() > 40


@needs_real_data
@pytest.mark.slow
def test_misaligned_thick_slices_score_within_the_bar_of_the_prepared_input(misaligned, raw_run, tmp_path):
    """The labels on the T1ce grid score within 0.05 whole-tumour Dice of the prepared (co-registered 1 mm)
    input mapped to the same grid (issue 12's bar for the raw path)."""
    import SimpleITK as sitk

    prepared = segment(CASE, tmp_path / "prepared")[0]
    on_ref = sitk.Resample(to_sitk(np.asarray(prepared.labels.dataobj), prepared.labels.affine),
                           misaligned["reference"], sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    dice_prepared = _wt_dice(to_array(on_ref), misaligned["truth_ref"])
    dice_raw = _wt_dice(np.asarray(nib.load(raw_run.files["seg.nii.gz"]).dataobj), misaligned["truth_ref"])
    dice_1mm = _wt_dice(np.asarray(prepared.labels.dataobj), misaligned["truth_1mm"])
    print(f"WT Dice: prepared input {dice_1mm:.3f} (1 mm), {dice_prepared:.3f} on the T1ce grid; raw {dice_raw:.3f}")
    assert dice_raw >= dice_prepared - 0.05


@needs_real_data
@pytest.mark.slow
def test_dicom_study_on_different_grids_with_raw(misaligned, raw_run, tmp_path):
    """The same raw scans as a DICOM study: --raw segments it, the labels match the NIfTI run's, and the
    DICOM SEG lies on the T1ce series."""
    from neuromap.io import DICOM
    from neuromap.io.dicom_export import write_study
    from neuromap.io.dicom_seg import read_dicom_seg

    images = {m: nib.load(misaligned["folder"] / f"Moved_{m}.nii.gz") for m in MODALITIES}
    write_study(images, tmp_path / "study")
    assert main(["segment", str(tmp_path / "study"), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert main(["segment", str(tmp_path / "study"), "-o", str(tmp_path / "out"), "--quiet", "--raw",
                 "--skull-stripped", "--dicom-seg"]) == 0
    labels = nib.load(tmp_path / "out" / "study_seg.nii.gz")
    expected = nib.load(raw_run.files["seg.nii.gz"])
    assert labels.shape == expected.shape and np.allclose(labels.affine, expected.affine, atol=1e-3)
    assert _wt_dice(np.asarray(labels.dataobj), np.asarray(expected.dataobj)) >= 0.99
    (case,) = DICOM.cases(tmp_path / "study")
    seg = read_dicom_seg(tmp_path / "out" / "study_seg.dcm", case.study.used["t1ce"])
    assert _wt_dice(seg, to_internal(np.asarray(labels.dataobj), "brats")) == 1.0


@needs_real_data
@pytest.mark.slow
@pytest.mark.skipif(not RAW.is_dir(), reason=f"raw study {RAW} is absent (fresh clone outside the team setup)")
def test_raw_tcga_study_end_to_end(tmp_path):
    """The real raw clinical study: skull on, three grids, 5.5 mm slices. deepbet's brain mask is an adult brain's
    size and covers the tumour; one tumour of a few tens of mL is found, on the T1ce's own grid."""
    assert main(["segment", str(RAW), "-o", str(tmp_path), "--raw", "--save-brain-mask", "--quiet"]) == 0
    (t1ce,) = RAW.glob("*_t1c.nii.gz")
    reference = nib.load(t1ce)
    labels = nib.load(tmp_path / f"{RAW.name}_seg.nii.gz")
    assert labels.shape == reference.shape and np.array_equal(labels.affine, reference.affine)
    import json

    report = json.loads((tmp_path / f"{RAW.name}_report.json").read_text())
    raw = report["raw_preparation"]
    print(json.dumps({k: raw[k] for k in ("registration", "brain_mask", "timings_s", "cpu_s")}, indent=1))
    print("volumes", report["volumes_ml"], "working grid", raw["working_grid"]["volumes_ml"], report["warnings"])
    # deepbet on the native T1 when the model reads it, else on the reference (the FLAIR+T1ce default: T1ce)
    assert raw["reference"] == "t1ce" and raw["brain_mask"]["method"] in ("deepbet on t1", "deepbet on t1ce")
    assert 1000 <= raw["brain_mask"]["volume_ml"] <= 1700
    assert 10 <= report["volumes_ml"]["WT"] <= 150
    assert all(entry["sharpness"] >= POOR_SHARPNESS for entry in raw["registration"].values())
    brain = np.asarray(nib.load(tmp_path / f"{RAW.name}_brain_mask.nii.gz").dataobj) > 0
    tumour = np.asarray(labels.dataobj) > 0
    assert (brain & tumour).sum() >= 0.95 * tumour.sum()
    assert (tmp_path / f"{RAW.name}_overlay.png").stat().st_size > 10_000
