"""`neuromap segment`: geometry, volumes, batch mode, atomic outputs, report schema, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BRATS, UNLABELLED, needs_real_data

from neuromap.cli import main
from neuromap.errors import NeuroMapError
from neuromap.segmenter import segment
from neuromap.synthetic import write_synthetic_case


@needs_real_data
@pytest.mark.parametrize("folder", [BRATS / "Brats18_2013_2_1", UNLABELLED / "AURORA-example"], ids=["LPS", "RAS"])
def test_output_grid_equals_input_bit_for_bit(tmp_path, tiny_checkpoint, folder):
    (result,) = segment(folder, tmp_path, model=tiny_checkpoint)
    ref = nib.load(next(folder.glob("*flair*")))
    out = nib.load(result.files["seg.nii.gz"])
    assert out.shape == ref.shape
    assert np.array_equal(out.affine, ref.affine)
    assert np.array_equal(out.header.get_sform(), ref.header.get_sform())
    assert np.array_equal(out.header.get_qform(), ref.header.get_qform())
    for code in ("sform_code", "qform_code"):
        assert out.header[code] == ref.header[code]
    assert out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 4}


def test_volumes_are_voxel_counts_times_voxel_volume(tmp_path, tiny_checkpoint):
    affine = np.diag([0.9, 1.1, 2.5, 1.0])
    case = write_synthetic_case(tmp_path / "in" / "A", "A", shape=(48, 48, 24), affine=affine)
    (result,) = segment(case, tmp_path / "out", model=tiny_checkpoint, labels="internal")
    labels = np.asarray(result.labels.dataobj)
    voxel_ml = 0.9 * 1.1 * 2.5 / 1000
    vols = result.report["volumes_ml"]
    for name, members in {"NCR": [1], "ED": [2], "ET": [3], "WT": [1, 2, 3], "TC": [1, 3]}.items():
        assert vols[name] == pytest.approx(np.isin(labels, members).sum() * voxel_ml, abs=1e-3)
    saved = json.loads(result.files["report.json"].read_text())
    assert saved["volumes_ml"] == vols


def test_report_schema(tmp_path, tiny_checkpoint, synthetic_case):
    (result,) = segment(synthetic_case, tmp_path, model=tiny_checkpoint)
    report = json.loads(result.files["report.json"].read_text())
    assert report["research_use_only"] is True and "Research use only" in report["notice"]
    assert set(report["volumes_ml"]) == {"NCR", "ED", "ET", "WT", "TC"}
    assert report["model"]["architecture"] == "unet2d"
    assert report["model"]["modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert report["label_convention"] == "brats" and isinstance(report["warnings"], list)
    assert {"load_s", "preprocess_s", "inference_s", "total_s"} <= set(report["timings_s"])
    png = result.files["overlay.png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_mode_on_parent_folder(tmp_path, tiny_checkpoint):
    for i in range(2):
        write_synthetic_case(tmp_path / "cases" / f"C{i}", f"C{i}", shape=(32, 32, 16), seed=i)
    assert main(["segment", str(tmp_path / "cases"), "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint),
                 "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"C{i}_{k}" for i in range(2) for k in ("overlay.png", "report.json", "seg.nii.gz")]


def test_failure_mid_write_leaves_no_output(tmp_path, tiny_checkpoint, synthetic_case, monkeypatch):
    def broken_save(img, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("neuromap.io.nifti.nib.save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        segment(synthetic_case, tmp_path / "out", model=tiny_checkpoint)
    assert list((tmp_path / "out").iterdir()) == []


def test_refuses_to_overwrite_outputs_and_inputs(tmp_path, tiny_checkpoint, synthetic_case):
    segment(synthetic_case, tmp_path, model=tiny_checkpoint)
    with pytest.raises(NeuroMapError, match="--overwrite"):
        segment(synthetic_case, tmp_path, model=tiny_checkpoint)
    segment(synthetic_case, tmp_path, model=tiny_checkpoint, overwrite=True)
    before = (synthetic_case / "Synthetic_001_seg.nii.gz").read_bytes()
    with pytest.raises(NeuroMapError, match="overwrite an input"):
        segment(synthetic_case, synthetic_case, model=tiny_checkpoint, overwrite=True)
    assert (synthetic_case / "Synthetic_001_seg.nii.gz").read_bytes() == before


def test_python_api_accepts_nibabel_images(tiny_checkpoint, synthetic_case):
    images = {m: nib.load(next(synthetic_case.glob(f"*_{m}.nii.gz"))) for m in ("t1", "t1ce", "t2", "flair")}
    (result,) = segment(images, model=tiny_checkpoint)
    assert result.labels.shape == images["t1"].shape and np.array_equal(result.labels.affine, images["t1"].affine)
    assert not Path(result.report["inputs"]["t1"]).exists()  # the private temp copy is gone


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_from_config_is_respected(tiny_checkpoint, synthetic_case):
    from neuromap.config import InferenceConfig

    with pytest.raises(NeuroMapError, match="no CUDA GPU"):
        segment(synthetic_case, model=tiny_checkpoint, cfg=InferenceConfig(device="cuda"))
    proc = _cli("segment", str(synthetic_case), "-o", "unused", "--model", str(tiny_checkpoint), "--device", "cuda")
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


def test_tta_and_ensemble(tmp_path, tiny_checkpoint, synthetic_case):
    (result,) = segment(synthetic_case, model=[tiny_checkpoint, tiny_checkpoint], tta=True)
    assert result.report["model"]["ensemble_size"] == 2 and result.report["model"]["tta"] is True


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuromap", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_dir", "no such file or folder"),
        ("missing_modality", "missing modality"),
        ("bad_model", "model not found"),
        ("text_nifti", "cannot be read as NIfTI"),
    ],
)
def test_bad_input_exits_2_with_message(tmp_path, tiny_checkpoint, setup, message):
    case = write_synthetic_case(tmp_path / "case", "case", shape=(24, 24, 12))
    model = str(tiny_checkpoint)
    target = str(case)
    if setup == "missing_dir":
        target = str(tmp_path / "nope")
    elif setup == "missing_modality":
        (case / "case_t2.nii.gz").unlink()
    elif setup == "bad_model":
        model = str(tmp_path / "nope.pt")
    elif setup == "text_nifti":
        (case / "case_flair.nii.gz").write_text("hello")
    proc = _cli("segment", target, "-o", str(tmp_path / "out"), "--model", model, "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_postprocess_drops_components_relative_to_the_largest():
    from neuromap.config import InferenceConfig
    from neuromap.postprocess import postprocess

    labels = np.zeros((60, 60, 30), np.uint8)
    labels[5:25, 5:25, 5:25] = 2  # 8000 voxels = 8 mL at 1 mm
    labels[40:48, 40:48, 5:10] = 3  # 320 voxels: 4 % of the largest -> dropped
    labels[40:55, 5:25, 10:17] = 1  # 2100 voxels: 26 % of the largest -> kept
    cleaned, notes = postprocess(labels, 0.001, InferenceConfig())
    assert (cleaned[5:25, 5:25, 5:25] == 2).all() and (cleaned[40:55, 5:25, 10:17] == 1).all()
    assert not cleaned[40:48, 40:48, 5:10].any() and len(notes) == 1 and "10% of the largest" in notes[0]
    kept, _ = postprocess(labels, 0.001, InferenceConfig(min_component_fraction=0))
    assert np.array_equal(kept, labels)


def test_modalities_option_maps_odd_file_names(tmp_path, tiny_checkpoint):
    case = write_synthetic_case(tmp_path / "odd", "odd", shape=(32, 32, 12), layout="plain")
    names = {}
    for i, mod in enumerate(["t1", "t1c", "t2", "flair"]):
        target = case / f"series{i}.nii.gz"
        (case / f"{mod}.nii.gz").rename(target)
        names[mod] = target
    args = [f"{m}={p}" for m, p in names.items()]
    assert main(["segment", "--modalities", *args, "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint),
                 "--quiet"]) == 0
    assert (tmp_path / "out" / "series0_seg.nii.gz").is_file()


def test_map_paths_are_relative_to_the_case_folder_for_every_command(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """Defect 3: `segment CASE --map ...` and `validate CASE --map ...` resolve the mapped files inside CASE by
    the same rule (one function builds the cases), whatever the working directory."""
    case = write_synthetic_case(tmp_path / "odd", "odd", shape=(32, 32, 12), layout="plain")
    for i, mod in enumerate(["t1", "t1c", "t2", "flair"]):
        (case / f"{mod}.nii.gz").rename(case / f"series{i}.nii.gz")
    mapping = [f"{m}=series{i}.nii.gz" for i, m in enumerate(["t1", "t1ce", "t2", "flair"])]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["validate", str(case), "--map", *mapping, "--model", str(tiny_checkpoint)]) == 0
    assert main(["segment", str(case), "--map", *mapping, "-o", str(tmp_path / "out"), "--model",
                 str(tiny_checkpoint), "--quiet"]) == 0
    assert (tmp_path / "out" / "series0_seg.nii.gz").is_file()
    assert main(["segment", "--map", *mapping, "-o", str(tmp_path / "out2"), "--model", str(tiny_checkpoint)]) == 2
    assert "series0.nii.gz: file given for 't1' does not exist" in capsys.readouterr().err  # no folder: cwd


def test_segment_takes_options_once(tiny_checkpoint, synthetic_case):
    """Options reach the Segmenter one way: an InferenceConfig, or its fields as keywords; not both."""
    from neuromap.config import InferenceConfig

    with pytest.raises(NeuroMapError, match="both cfg and the options"):
        segment(synthetic_case, model=tiny_checkpoint, cfg=InferenceConfig(), tta=True)
    with pytest.raises(NeuroMapError, match="segment\\(\\) options: invalid configuration: ttta"):
        segment(synthetic_case, model=tiny_checkpoint, ttta=True)
