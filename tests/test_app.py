"""Web app: Streamlit AppTest of the whole page (upload -> segment -> table -> downloads), the upload safety
rules as plain functions, the slice renderer, the session folder's lifetime, and the `neuromap app` command."""

from __future__ import annotations

import gc
import gzip
import io
import json
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import streamlit.testing.v1.app_test as app_test_module
import torch
from conftest import SHARED_DATA, needs_real_data
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

import neuromap.zoo
from neuromap import cli
from neuromap.checkpoint import ModelSpec, save_checkpoint
from neuromap.config import ModelConfig, PreprocessConfig
from neuromap.errors import NeuroMapError
from neuromap.io.dicom_export import Study, write_series, write_study
from neuromap.synthetic import write_synthetic_case
from neuromap.webapp_io import (
    IGNORE,
    Workspace,
    case_id_from_names,
    check_nifti_header,
    chosen_sequences,
    extract_case_zip,
    extract_zip,
    guess_modality,
    stage_uploads,
)

APP = Path(__file__).resolve().parents[1] / "src" / "neuromap" / "app.py"
MB = 2**20
RAW = SHARED_DATA / "raw" / "TCGA-FG-6692"


def tiny_checkpoint(path: Path) -> Path:
    """A real 2D U-Net checkpoint with random (seeded) weights: meaningless output, real pipeline and geometry."""
    torch.manual_seed(0)
    spec = ModelSpec(ModelConfig(name="unet2d", spatial_dims=2, options={"features": [8, 8, 16, 16, 32, 8]}),
                     PreprocessConfig(mode="2d", slice_size=(64, 64)), "brats", (64, 64), 4)
    return save_checkpoint(path, spec, spec.build().state_dict())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture
def media(monkeypatch) -> dict:
    """Keep every file the download buttons serve, by id, so a test reads the bytes a browser would get."""
    served: dict[str, bytes] = {}

    class Recording(MemoryMediaFileStorage):
        def load_and_get_id(self, path_or_data, mimetype, kind, filename=None):
            file_id = super().load_and_get_id(path_or_data, mimetype, kind, filename)
            served[file_id] = self._files_by_id[file_id].content
            return file_id

    monkeypatch.setattr(app_test_module, "MemoryMediaFileStorage", Recording)
    return served


@pytest.fixture
def app(monkeypatch, tiny_model, tmp_path_factory) -> Iterator[AppTest]:
    """The page with no shipped models (so tests do not depend on what is trained) and the tiny checkpoint
    offered as ``neuromap app --model`` would."""
    monkeypatch.setattr(neuromap.zoo, "WEIGHTS_DIR", tmp_path_factory.mktemp("no_weights"))
    monkeypatch.setenv("NEUROMAP_APP_MODEL", str(tiny_model))
    monkeypatch.delenv("NEUROMAP_APP_MAX_UPLOAD_MB", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=120)
    yield at.run()
    if "workspace" in at.session_state:
        at.session_state.workspace.cleanup()


def uploads(folder: Path) -> list[tuple[str, bytes, str]]:
    return [(p.name, p.read_bytes(), "application/octet-stream") for p in sorted(folder.iterdir())]


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def downloads(at: AppTest, served: dict) -> dict[str, bytes]:
    """Download-button label -> the bytes behind its URL."""
    out = {}
    for element in at.get("download_button"):
        file_id = Path(element.proto.url).stem
        out[element.label] = served[file_id]
    return out


def text_of(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


# ------------------------------------------------------------------------------------------------ whole page


def test_page_shows_title_notice_and_upload_hint(app):
    assert "NeuroMap" in app.title[0].value
    assert "Research use only" in text_of(app.warning)
    assert "Upload the MRI sequences" in text_of(app.info)
    assert not app.exception


def test_upload_segment_table_and_downloads(app, media, tmp_path):
    case = write_synthetic_case(tmp_path / "in", "Syn_007", shape=(48, 40, 24))
    app.file_uploader[0].set_value(uploads(case)).run()
    choices = {s.label: s.value for s in app.selectbox if s.label.startswith("Sequence of")}
    assert choices == {"Sequence of Syn_007_flair.nii.gz": "flair", "Sequence of Syn_007_seg.nii.gz": IGNORE,
                       "Sequence of Syn_007_t1.nii.gz": "t1", "Sequence of Syn_007_t1ce.nii.gz": "t1ce",
                       "Sequence of Syn_007_t2.nii.gz": "t2"}
    button(app, "Segment").click().run()
    assert not app.exception and not app.error, text_of(app.error)

    table = app.table[0].value
    assert list(table["Region"]) == ["NCR/NET", "ED", "ET", "WT", "TC"]
    files = downloads(app, media)
    report = json.loads(files["Report (JSON)"])
    expected = [f"{report['volumes_ml'][k]:.2f}" for k in ("NCR", "ED", "ET", "WT", "TC")]
    assert list(table["Volume (mL)"]) == expected
    assert report["research_use_only"] and report["case_id"] == "Syn_007"
    # The quality estimate is shown with its flag and reasons (the test model is uncalibrated: no score, review).
    assert "Quality estimate" in [h.value for h in app.subheader]
    assert "Estimated mean Dice not available: **review this result**" in text_of(app.warning)
    assert report["quality"]["reasons"][0] in text_of(app.warning)

    source = nib.load(str(case / "Syn_007_t1.nii.gz"))
    labels = nib.Nifti1Image.from_bytes(gzip.decompress(files["Label map (NIfTI, input grid)"]))
    assert labels.shape == source.shape
    # The uncertainty map the viewer overlays is offered too, on the input grid (the report names its measure).
    uncertainty = nib.Nifti1Image.from_bytes(gzip.decompress(files["Uncertainty map (NIfTI, input grid, 0-255)"]))
    assert uncertainty.shape == source.shape and np.allclose(uncertainty.affine, source.affine)
    assert uncertainty.get_data_dtype() == np.uint8 and "entropy" in report["uncertainty_map"]["measure"]
    assert np.array_equal(labels.affine, source.affine)
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2, 4}
    assert files["Overlay (PNG)"].startswith(b"\x89PNG")
    # The report names the uploaded files, not the server's temp folder; so does the caption.
    assert report["inputs"] == {m: f"Syn_007_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")}
    assert "Segmented from: T1 Syn_007_t1.nii.gz" in text_of(app.caption)
    assert "neuromap-app-" not in files["Report (JSON)"].decode()


def test_zip_upload_with_uploaded_checkpoint(app, media, tmp_path, tiny_model):
    case = write_synthetic_case(tmp_path / "Case9", "Case9", shape=(40, 40, 20), layout="plain", with_seg=False)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in case.iterdir():
            zf.write(path, f"Case9/{path.name}")
        zf.writestr("Case9/notes.txt", "not a scan")
    app.radio[0].set_value("Case folder as .zip").run()
    app.file_uploader[0].set_value(("Case9.zip", archive.getvalue(), "application/zip")).run()
    assert "notes.txt" in text_of(app.caption)
    app.selectbox(key="model_choice").set_value("upload").run()
    assert button(app, "Segment").disabled  # no checkpoint uploaded yet
    app.file_uploader[1].set_value(("tiny.pt", tiny_model.read_bytes(), "application/octet-stream")).run()
    button(app, "Segment").click().run()
    assert not app.error, text_of(app.error)
    report = json.loads(downloads(app, media)["Report (JSON)"])
    assert report["case_id"] == "Case9"  # plain names: the zip's name becomes the case id
    workspace = app.session_state.workspace.root
    assert Path(report["model"]["files"][0]).is_relative_to(workspace)
    assert set(report["inputs"].values()) == {p.name for p in case.iterdir()}  # the names inside the zip


def test_bad_checkpoint_is_a_message_not_a_traceback(app, tmp_path):
    case = write_synthetic_case(tmp_path / "in", "B1", shape=(32, 32, 16), with_seg=False)
    app.file_uploader[0].set_value(uploads(case)).run()
    app.selectbox(key="model_choice").set_value("upload").run()
    app.file_uploader[1].set_value(("weights.pt", b"not a checkpoint", "application/octet-stream")).run()
    assert button(app, "Segment").disabled
    assert "not a readable checkpoint" in text_of(app.warning)
    assert not app.exception and "result" not in app.session_state


def test_page_refuses_text_named_nii_gz(app):
    app.file_uploader[0].set_value(("scan_flair.nii.gz", b"hello, I am text\n", "application/gzip")).run()
    assert "content is text" in text_of(app.error)
    assert not [b for b in app.button if b.label == "Segment"]
    assert not any(app.session_state.workspace.root.iterdir())  # nothing was kept


def test_page_enforces_the_total_size_limit(app, monkeypatch, tmp_path):
    monkeypatch.setenv("NEUROMAP_APP_MAX_UPLOAD_MB", "0.05")
    limited = AppTest.from_file(str(APP), default_timeout=120).run()  # the limit is part of the widget's identity
    case = write_synthetic_case(tmp_path / "in", "Big", shape=(48, 48, 32), with_seg=False)  # 4 x ~30 kB
    limited.file_uploader[0].set_value(uploads(case)).run()
    assert "more than the limit of 0.05 MB per case" in text_of(limited.error)
    limited.session_state.workspace.cleanup()


def test_bad_limit_setting_is_shown_on_the_page(monkeypatch):
    monkeypatch.setenv("NEUROMAP_APP_MAX_UPLOAD_MB", "lots")
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert "'lots' is not a positive number of megabytes" in text_of(at.error) and not at.exception


def test_two_files_for_one_sequence_is_a_clear_error(app, tmp_path):
    case = write_synthetic_case(tmp_path / "in", "Dup", shape=(32, 32, 16), with_seg=False)
    app.file_uploader[0].set_value(uploads(case)).run()
    app.selectbox(key="seq_0_1").set_value("flair").run()  # files are sorted: flair, t1, ...
    assert button(app, "Segment").disabled  # said before anything runs
    assert "are both set to flair" in text_of(app.warning)
    assert "result" not in app.session_state


def test_start_over_deletes_the_session_files(app, tmp_path):
    case = write_synthetic_case(tmp_path / "in", "R1", shape=(32, 32, 16), with_seg=False)
    app.file_uploader[0].set_value(uploads(case)).run()
    button(app, "Segment").click().run()
    root = app.session_state.workspace.root
    assert (root / "out").is_dir() and (root / "uploads").is_dir()
    button(app, "Start over").click().run()
    assert root.is_dir() and not any(root.iterdir())
    assert "result" not in app.session_state and not app.table


# ------------------------------------------------------------------------------------------------ safety rules


def nifti_gz_bytes(shape=(4, 4, 3)) -> bytes:
    return gzip.compress(nib.Nifti1Image(np.ones(shape, np.int16), np.eye(4)).to_bytes())


def zip_bytes(entries: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    buffer.seek(0)
    return buffer


def test_oversized_upload_is_refused(tmp_path):
    files = [("a_t1.nii.gz", nifti_gz_bytes()), ("a_t2.nii.gz", b"\0" * (2 * MB))]
    with pytest.raises(NeuroMapError, match=r"upload is 2\.0 MB, more than the limit of 1 MB per case"):
        stage_uploads(files, tmp_path / "up", limit_bytes=MB)
    assert not (tmp_path / "up").exists()


def test_text_file_named_nii_gz_is_refused():
    with pytest.raises(NeuroMapError, match=r"notes_t1\.nii\.gz: named \.nii\.gz but its content is text"):
        check_nifti_header("notes_t1.nii.gz", b"patient notes, not an image\n")


@pytest.mark.parametrize(("name", "data", "message"), [
    ("x_t1.nii.gz", gzip.compress(b"just text inside gzip" * 40), "no NIfTI-1/NIfTI-2 header"),
    ("x_t1.nii.gz", b"\x1f\x8b" + b"\x00" * 600, "damaged gzip data"),
    ("x_t1.nii", b"\x00" * 600, "no NIfTI-1/NIfTI-2 header"),
    ("x_t1.dcm", b"DICM", "not a NIfTI file name"),
])
def test_other_non_nifti_content_is_refused(name, data, message):
    with pytest.raises(NeuroMapError, match=message):
        check_nifti_header(name, data)


def test_real_nifti_1_and_2_headers_pass():
    check_nifti_header("a.nii.gz", nifti_gz_bytes())
    check_nifti_header("a.nii", nib.Nifti1Image(np.ones((2, 2, 2), np.int16), np.eye(4)).to_bytes()[:544])
    check_nifti_header("a.nii", nib.Nifti2Image(np.ones((2, 2, 2), np.int16), np.eye(4)).to_bytes()[:544])


@pytest.mark.parametrize(("entries", "symlinks", "message"), [
    ({"case/a_t1.nii.gz": b"", "../evil_t2.nii.gz": b""}, (), r"points outside the archive \(\.\.\)"),
    ({"case/../../evil_t2.nii.gz": b""}, (), r"points outside the archive"),
    ({"/etc/evil_t1.nii.gz": b""}, (), "has an absolute path"),
    ({"C:/evil_t1.nii.gz": b""}, (), "has an absolute path"),
    ({"case/a_t1.nii.gz": b""}, ("case/a_t2.nii.gz",), "is a symbolic link"),
])
def test_dangerous_zip_entries_are_refused_before_extraction(tmp_path, entries, symlinks, message):
    archive = zip_bytes({name: data or nifti_gz_bytes() for name, data in entries.items()}, symlinks)
    with pytest.raises(NeuroMapError, match=message):
        extract_case_zip(archive, tmp_path / "dest", limit_bytes=10 * MB)
    assert not (tmp_path / "dest").exists()
    assert not (tmp_path.parent / "evil_t2.nii.gz").exists()


def test_zip_size_limit_and_one_case_rule(tmp_path):
    big = zip_bytes({"c/a_t1.nii": b"\0" * (2 * MB)})
    with pytest.raises(NeuroMapError, match="more than the limit of 1 MB"):
        extract_case_zip(big, tmp_path / "d1", limit_bytes=MB)
    two = zip_bytes({"c1/a_t1.nii.gz": nifti_gz_bytes(), "c2/b_t1.nii.gz": nifti_gz_bytes()})
    with pytest.raises(NeuroMapError, match="several folders"):
        extract_case_zip(two, tmp_path / "d2", limit_bytes=MB)
    fake = zip_bytes({"c/a_t1.nii.gz": nifti_gz_bytes(), "c/b_t2.nii.gz": b"text, not gzip"})
    with pytest.raises(NeuroMapError, match=r"b_t2\.nii\.gz: named \.nii\.gz but its content is text"):
        extract_case_zip(fake, tmp_path / "d3", limit_bytes=MB)
    assert not (tmp_path / "d3").exists()  # the entry extracted before the bad one is removed too
    with pytest.raises(NeuroMapError, match="not a readable zip"):
        extract_case_zip(io.BytesIO(b"PK not really"), tmp_path / "d4", limit_bytes=MB)


def test_good_zip_is_flattened_with_guessed_sequences(tmp_path):
    archive = zip_bytes({"P1/P1-t1c.nii.gz": nifti_gz_bytes(), "P1/P1-t2f.nii.gz": nifti_gz_bytes(),
                         "__MACOSX/P1/._P1-t1c.nii.gz": b"junk", "P1/README": b"text"})
    staged, ignored = extract_case_zip(archive, tmp_path / "d", limit_bytes=MB)
    assert [(s.name, s.guess) for s in staged] == [("P1-t1c.nii.gz", "t1ce"), ("P1-t2f.nii.gz", "flair")]
    assert all(s.path.parent == tmp_path / "d" for s in staged)
    assert ignored == ["__MACOSX/P1/._P1-t1c.nii.gz", "P1/README"]


@pytest.mark.parametrize(("name", "expected"), [
    ("Brats18_2013_2_1_t1ce.nii.gz", "t1ce"), ("BraTS-GLI-00001-000-t2f.nii.gz", "flair"),
    ("flair.nii", "flair"), ("P7_fla.nii.gz", "flair"), ("Brats18_x_seg.nii.gz", IGNORE),
    ("scan_0003.nii.gz", IGNORE), ("../../t2.nii.gz", "t2"),
])
def test_sequence_guess_from_file_name(name, expected):
    assert guess_modality(name) == expected


def test_chosen_sequences_refuse_duplicates_and_nothing_chosen():
    names = {"k1": "one.nii.gz", "k2": "#3 'AX T1'"}
    assert chosen_sequences({"k1": "t1ce", "k2": "flair"}, names) == {"t1ce": "k1", "flair": "k2"}
    with pytest.raises(NeuroMapError, match="one.nii.gz and #3 'AX T1' are both set to t1"):
        chosen_sequences({"k1": "t1", "k2": "t1"}, names)
    with pytest.raises(NeuroMapError, match="nothing is set to a sequence"):
        chosen_sequences({"k1": IGNORE}, names)
    assert case_id_from_names(["Brats18_A_1_t1.nii.gz", "Brats18_A_1_flair.nii.gz"]) == "Brats18_A_1"
    assert case_id_from_names(["t1.nii.gz", "flair.nii.gz"], "zipname") == "zipname"


def test_workspace_is_deleted_on_cleanup_and_when_dropped(tmp_path):
    ws = Workspace(tmp_path)
    (ws.sub("uploads") / "x").write_text("x")
    ws.clear("uploads")
    assert ws.root.is_dir() and not (ws.root / "uploads").exists()
    ws.cleanup()
    assert not ws.root.exists()
    dropped = Workspace(tmp_path)
    root = dropped.root
    del dropped
    gc.collect()
    assert not root.exists()


# ------------------------------------------------------------------------------------------------ viewer, CLI


def test_viewer_scene_and_component_arguments_of_a_real_result(tmp_path, tiny_model):
    """What the NiiVue component gets for a segmented case: every sequence file byte for byte, the label file,
    BraTS label values 1/2/4 with the task's colours, the file axis of each plane, the inverse affine and a
    crosshair start (the tumour centre, in mm) that maps back into the grid."""
    from neuromap.app_viewer import component_args
    from neuromap.segmenter import segment

    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[:3, 3] = (40, 30, -20)
    case = write_synthetic_case(tmp_path / "in", "Vw1", shape=(40, 32, 16), affine=affine, with_seg=False)
    (result,) = segment(case, tmp_path / "out", model=str(tiny_model), uncertainty=True)
    kept = {"run": 3, "report": result.report, "files": dict(result.files), "inputs": result.report["inputs"],
            "labels_output": str(result.labels_output)}
    args = component_args(kept, {"flair": "FLAIR"})
    assert [s["key"] for s in args["sequences"]] == ["t1", "t1ce", "t2", "flair"] and args["shown"] == "flair"
    assert args["seq_t2"] == (case / "Vw1_t2.nii.gz").read_bytes()
    assert args["labels"] == result.labels_output.read_bytes()
    assert [(i["value"], i["colour"]) for i in args["label_info"]] == [(1, "#e61a1a"), (2, "#1acc33"), (4, "#ffd900")]
    assert args["plane_axes"] == {"sagittal": 0, "coronal": 1, "axial": 2} and args["shape"] == [40, 32, 16]
    voxel = np.array(args["inv_affine"]) @ np.array([*args["start_mm"], 1.0])
    assert np.all(voxel[:3] >= 0) and np.all(voxel[:3] < np.array(args["shape"]))
    assert args["radiological"] is True
    # The uncertainty map is the overlay the viewer can switch on; a result without one offers no toggle.
    assert args["extra_name"] == "Uncertainty (entropy)"
    assert args["extra"] == result.files["uncertainty.nii.gz"].read_bytes()
    del kept["files"]["uncertainty.nii.gz"]
    without = component_args(kept, {})
    assert without["extra_name"] is None and without["extra"] is None


def test_web_message_names_uploaded_files_and_page_fixes(tmp_path):
    from neuromap.webapp_io import web_message

    root = tmp_path / "neuromap-app-x1"
    message = (f"case 'P1' ({root}/case/P1): missing modality ['t1ce'] (found: ['flair']). Fix: add the file(s), "
               "map them with --map, or choose a model that needs only the sequences present.")
    text = web_message(message, root, {})
    assert str(tmp_path) not in text and "--" not in text
    assert "(the uploaded case)" in text and "set each file's sequence in the table" in text
    shape = web_message(f"{root}/case/P1/P1_t2.nii.gz: shape (3, 3, 3) differs. Fix: use co-registered files.",
                        root, {"P1_t2.nii.gz": "scan 7.nii.gz"})
    assert shape == "scan 7.nii.gz: shape (3, 3, 3) differs. Fix: use co-registered files."
    assert web_message("labels 7. Fix: pass --device cpu.", root, {}) == "labels 7."


def test_cli_app_runs_streamlit_on_localhost(monkeypatch, tiny_model):
    started = []

    class FakeServer:
        def __init__(self, command, env):
            started.append((command, env))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr("subprocess.Popen", FakeServer)
    given = ["--port", "8765", "--max-upload-mb", "50", "--model", str(tiny_model), "--workers", "3"]
    assert cli.main(["app", *given]) == 0
    command, env = started[0]
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4].endswith("neuromap/app.py")
    flags = dict(zip(command[5::2], command[6::2], strict=True))
    assert flags["--server.headless"] == "true" and flags["--server.address"] == "127.0.0.1"
    assert flags["--server.port"] == "8765" and flags["--server.maxUploadSize"] == "50"
    assert env["NEUROMAP_APP_MAX_UPLOAD_MB"] == "50.0" and env["NEUROMAP_APP_MODEL"] == str(tiny_model)
    assert env["NEUROMAP_APP_WORKERS"] == "3"
    assert cli.main(["app"]) == 0 and started[-1][1]["NEUROMAP_APP_WORKERS"] == "1"  # the default: one at a time
    assert cli.main(["app", "--model", "/no/such.pt"]) == cli.EXIT_USER_ERROR
    with pytest.raises(SystemExit) as refused:  # argparse checks the range (`neuromap.options`)
        cli.main(["app", "--max-upload-mb", "0"])
    assert refused.value.code == cli.EXIT_USER_ERROR


# ------------------------------------------------------------------------------------------------ task-driven page


def tiny_binary_checkpoint(path: Path) -> Path:
    """Like `tiny_checkpoint`, for the binary task (as lgg_unet2d): t1, flair, t1ce in, one abnormality label out."""
    torch.manual_seed(0)
    spec = ModelSpec(ModelConfig(name="unet2d", spatial_dims=2, options={"features": [8, 8, 16, 16, 32, 8]}),
                     PreprocessConfig(mode="2d", slice_size=(64, 64), modalities=["t1", "flair", "t1ce"]),
                     "binary", (64, 64), 2)
    return save_checkpoint(path, spec, spec.build().state_dict())


def page_with(monkeypatch, tmp_path: Path, model: Path | None, weights: Path | None = None) -> AppTest:
    monkeypatch.setattr(neuromap.zoo, "WEIGHTS_DIR", weights or tmp_path / "no_weights")
    if model is None:
        monkeypatch.delenv("NEUROMAP_APP_MODEL", raising=False)
    else:
        monkeypatch.setenv("NEUROMAP_APP_MODEL", str(model))
    return AppTest.from_file(str(APP), default_timeout=120).run()


def test_binary_model_result_panel_viewer_and_downloads(monkeypatch, media, tmp_path):
    """Defect 4: a binary model (lgg_unet2d) on a NIfTI case shows its one structure, draws it as abnormality
    (not NCR/NET) and offers the downloads; no KeyError."""
    at = page_with(monkeypatch, tmp_path, tiny_binary_checkpoint(tmp_path / "binary.pt"))
    case = write_synthetic_case(tmp_path / "in", "Bin1", shape=(40, 40, 16), with_seg=False)
    at.file_uploader[0].set_value(uploads(case)).run()
    button(at, "Segment").click().run()
    assert not at.exception and not at.error, text_of(at.error)
    assert list(at.table[0].value["Region"]) == ["abnormality"]
    from neuromap.app_viewer import component_args

    legend = component_args(at.session_state.result, {})["label_info"]
    assert [(i["value"], i["name"]) for i in legend] == [(1, "abnormality (predicted)")]
    assert "Labels in the NIfTI: 1 abnormality (binary convention)" in text_of(at.caption)
    files = downloads(at, media)
    assert sorted(files) == ["Label map (NIfTI, input grid)", "Overlay (PNG)", "Report (JSON)",
                             "Uncertainty map (NIfTI, input grid, 0-255)"]
    labels = nib.Nifti1Image.from_bytes(gzip.decompress(files["Label map (NIfTI, input grid)"]))
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1}
    assert json.loads(files["Report (JSON)"])["label_convention"] == "binary"
    at.session_state.workspace.cleanup()


def test_failed_run_clears_the_previous_result_and_shows_why(app, media, tmp_path):
    """Defect 4: after a failed run nothing of the previous result stays (its files are gone, so its download
    button would fail), and the reason is shown in an error box, worded for the page: the uploaded file's name,
    no server path."""
    case = write_synthetic_case(tmp_path / "in", "F1", shape=(32, 32, 16), with_seg=False)
    t2 = nib.load(case / "F1_t2.nii.gz")
    blank = gzip.compress(nib.Nifti1Image(np.zeros(t2.shape, np.int16), t2.affine).to_bytes())
    files = uploads(case) + [("blank scan_t2.nii.gz", blank, "application/gzip")]
    app.file_uploader[0].set_value(files).run()
    app.selectbox(key="seq_0_4").set_value(IGNORE).run()  # files: F1_flair, F1_t1, F1_t1ce, F1_t2, blank scan_t2
    button(app, "Segment").click().run()
    assert app.table and downloads(app, media)
    app.selectbox(key="seq_0_3").set_value(IGNORE).run()
    app.selectbox(key="seq_0_4").set_value("t2").run()
    button(app, "Segment").click().run()
    assert not app.exception
    assert "result" not in app.session_state and not app.table and not app.get("download_button")
    reason = next(e.value for e in app.error if "Segmentation failed" in e.value)
    assert "blank scan_t2.nii.gz: the t2 image is all zero" in reason and "neuromap-app-" not in reason
    app.selectbox(key="model_choice").run()  # any rerun: the reason stays until the next run or upload
    assert "blank scan_t2.nii.gz" in text_of(app.error)


def test_segment_is_disabled_with_the_reason_when_a_needed_sequence_is_missing(app, tmp_path):
    case = write_synthetic_case(tmp_path / "in", "M1", shape=(32, 32, 16), with_seg=False)
    app.file_uploader[0].set_value(uploads(case)).run()
    assert not button(app, "Segment").disabled
    app.selectbox(key="seq_0_2").set_value(IGNORE).run()  # files are sorted: flair, t1, t1ce, t2
    assert button(app, "Segment").disabled
    assert "This model needs T1ce (contrast), which no file is set to" in text_of(app.warning)


def test_empty_upload_is_called_empty(app):
    """Defect 4: a 0-byte file is reported as empty, not as 'not gzip data'."""
    app.file_uploader[0].set_value(("scan_flair.nii.gz", b"", "application/gzip")).run()
    assert "scan_flair.nii.gz: the file is empty (0 bytes)" in text_of(app.error)
    with pytest.raises(NeuroMapError, match="the file is empty"):
        check_nifti_header("scan_t1.nii", b"")


def test_model_caption_gives_the_model_cards_numbers(monkeypatch, media, tmp_path, tiny_model):
    """Defect 4: a shipped model's caption shows the measured validation Dice of models.json, rounded as its card
    rounds them, not the checkpoint's raw training-time dict."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "tiny.pt").write_bytes(tiny_model.read_bytes())
    (weights / "models.json").write_text(json.dumps({"tiny": {
        "file": "tiny.pt", "modalities": ["t1", "t1ce", "t2", "flair"], "task": "brats", "card": "tiny.md",
        "val_dice": {"WT": 0.8746, "TC": 0.8309, "ET": 0.8206}, "n_val": 4},
        "slices": {"file": "slices.pt", "modalities": ["t1", "flair", "t1ce"], "task": "binary"}}))
    at = page_with(monkeypatch, tmp_path, None, weights)
    offered = at.selectbox(key="model_choice").options
    assert len(offered) == 3 and offered[1].startswith("tiny ")  # automatic, tiny, upload: no LGG slice model
    case = write_synthetic_case(tmp_path / "in", "Cap1", shape=(32, 32, 16), with_seg=False)
    at.file_uploader[0].set_value(uploads(case)).run()
    # Before running, the automatic choice is named with the card's numbers.
    plan = text_of(at.markdown)
    assert "Automatic choice: **tiny** on T1, T1ce (contrast), T2, FLAIR; validation Dice WT 0.875" in plan
    button(at, "Segment").click().run()
    caption = text_of(at.caption)
    assert "validation Dice WT 0.875 / TC 0.831 / ET 0.821 (4 cases, validation split; model card)" in caption
    assert "{" not in caption
    at.session_state.workspace.cleanup()


@pytest.mark.parametrize("name", sorted(neuromap.zoo.shipped_models()))
def test_shipped_validation_text_matches_the_model_card(name):
    model = neuromap.zoo.shipped_models()[name]
    card = model.card.read_text()
    # the held-out section: "### val cases" (split models) or "### out-of-fold cases" (cross-validated recipes)
    heading = "### out-of-fold cases" if "### out-of-fold cases" in card else "### val cases"
    start = card.index(heading)
    validation = card[start:card.index("\n##", start + len(heading))]
    for structure, dice in model.val_dice.items():
        assert f"| {structure} (region) | {dice:.3f} ±" in validation
        assert f"{structure} {dice:.3f}" in model.validation_text()


# ------------------------------------------------------------------------------------------------ clinical inputs


def zipped(folder: Path) -> bytes:
    """``folder`` as a zip holding the folder itself, sub-folders and all (what zipping it in a file manager gives)."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder.parent))
    return archive.getvalue()


@needs_real_data
def test_dicom_zip_shows_the_mapping_lets_the_user_settle_a_tie_and_gives_a_dicom_seg(app, media, tmp_path):
    """A real BraTS case written as a DICOM study (localizer, shuffled file names, nested folders, a README) with a
    second post-contrast T1 series: every series is listed with what NeuroMap made of it; the tie is not guessed
    (Segment is disabled and the page says why) until the user sets the series in the table; the labels lie on
    the chosen series' grid, the DICOM SEG references it, the report says who chose it, the viewer gets the
    series as NIfTI."""
    from test_dicom import MODALITIES, case_images

    images = case_images()
    study = Study()
    root = tmp_path / "Patient07"
    write_study({m: images[m] for m in MODALITIES}, root, study)
    write_series(images["t1ce"], root / "extra", study, series_number=9, description="AX T1 POST GAD 3D",
                 protocol="t1_mprage_post")
    app.radio[0].set_value("Case folder as .zip").run()
    app.file_uploader[0].set_value(("Patient07.zip", zipped(root), "application/zip")).run()
    assert not app.error and not app.exception, text_of(app.error)

    rows = {s.label.removeprefix("Sequence of "): s for s in app.selectbox if s.label.startswith("Sequence of")}
    assert {name: s.value for name, s in rows.items()} == {
        "#1 '3-PLANE LOC'": IGNORE, "#2 'AX T1 SE'": "t1", "#3 'AX T1 POST GAD'": IGNORE, "#4 'AX T2 FSE'": "t2",
        "#5 'T2 FLAIR AX'": "flair", "#9 'AX T1 POST GAD 3D'": IGNORE}
    assert rows["#1 '3-PLANE LOC'"].disabled and not rows["#3 'AX T1 POST GAD'"].disabled
    page = text_of(app.markdown)
    assert "localizer" in page and "contrast agent tag 'Gadobutrol 7.5 ml'" in page and "160x192x60" in page
    assert "Several series fit T1ce (contrast) (#3 'AX T1 POST GAD', #9 'AX T1 POST GAD 3D')" in text_of(app.warning)
    assert button(app, "Segment").disabled
    assert "README.txt" in text_of(app.caption)  # the non-DICOM file is named as not used

    rows["#9 'AX T1 POST GAD 3D'"].set_value("t1ce").run()
    assert not button(app, "Segment").disabled and "Several series fit" not in text_of(app.warning)
    assert "different voxel grids" not in text_of(app.info) and not app.checkbox(key="raw_0_False").value
    button(app, "Segment").click().run()
    assert not app.exception and not app.error, text_of(app.error)

    files = downloads(app, media)
    assert sorted(files) == ["DICOM SEG (on series #9)", "Label map (NIfTI, input grid)", "Overlay (PNG)",
                             "Report (JSON)", "Uncertainty map (NIfTI, input grid, 0-255)"]
    report = json.loads(files["Report (JSON)"])
    used = report["dicom"]["series_used"]
    assert used["t1ce"]["number"] == 9
    assert used["t1ce"]["why"] == ("description 'AX T1 POST GAD 3D'; post-contrast by its name; confirmed in the web "
                                   "app's series table")
    ignored = {s["number"]: s["reason"] for s in report["dicom"]["series_ignored"]}
    assert ignored[1] == "localizer / calibration scan"
    assert ignored[3].endswith("; not chosen in the web app's series table")
    assert report["inputs"] == {"t1": "#2 'AX T1 SE'", "t1ce": "#9 'AX T1 POST GAD 3D'", "t2": "#4 'AX T2 FSE'",
                                "flair": "#5 'T2 FLAIR AX'"}
    assert "neuromap-app-" not in files["Report (JSON)"].decode()
    labels = nib.Nifti1Image.from_bytes(gzip.decompress(files["Label map (NIfTI, input grid)"]))
    assert labels.shape == images["t1ce"].shape
    np.testing.assert_allclose(labels.affine, images["t1ce"].affine, atol=1e-3)
    seg = pydicom.dcmread(io.BytesIO(files["DICOM SEG (on series #9)"]))
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == used["t1ce"]["uid"]

    from neuromap.app_viewer import component_args

    args = component_args(app.session_state.result, {})
    shown = nib.Nifti1Image.from_bytes(gzip.decompress(args["seq_t1ce"]))
    assert np.array_equal(np.asarray(shown.dataobj), np.asarray(images["t1ce"].dataobj))
    np.testing.assert_allclose(shown.affine, images["t1ce"].affine, atol=1e-3)


@needs_real_data
def test_dicom_series_on_different_grids_get_raw_preparation_ticked_and_segmented(app, media, tmp_path):
    """A DICOM study whose T2 series has a coarser in-plane grid: the page names the series and ticks 'Raw scans'
    (the check `validate` makes for DICOM studies); segmented so (already skull-stripped: no deepbet) with the
    FLAIR chosen as reference sequence and N4 ticked, the labels, brain mask and uncertainty map lie on the FLAIR
    series' grid, the DICOM SEG references that series and the report records both choices."""
    from test_dicom import MODALITIES, case_images

    small = case_images((slice(60, 124), slice(70, 134), slice(70, 90)))  # 20 slices: enough to co-register
    small["t2"] = small["t2"].slicer[::2, ::2, :]
    write_study({m: small[m] for m in MODALITIES}, tmp_path / "Grids")
    app.radio[0].set_value("Case folder as .zip").run()
    app.file_uploader[0].set_value(("Grids.zip", zipped(tmp_path / "Grids"), "application/zip")).run()
    notice = text_of(app.info)
    assert "different voxel grids" in notice and "t2: #4 'AX T2 FSE' 32x32x20" in notice
    assert app.checkbox(key="raw_0_True").value and not button(app, "Segment").disabled
    app.checkbox(key="stripped_0").check().run()
    reference = app.selectbox(key="reference_0")
    # the sequences the model (the tiny four-sequence checkpoint) reads; automatic = the T1ce
    assert reference.options == ["Automatic (T1ce (contrast))", "T1", "T1ce (contrast)", "T2", "FLAIR"]
    reference.set_value("flair").run()
    app.checkbox(key="n4_0").check().run()
    button(app, "Segment").click().run(timeout=900)
    assert not app.exception and not app.error, text_of(app.error)
    files = downloads(app, media)
    report = json.loads(files["Report (JSON)"])
    assert report["raw_preparation"]["reference"] == "flair" and report["raw_preparation"]["n4"] is True
    assert report["raw_preparation"]["brain_mask"]["method"] == "non-zero voxels (--skull-stripped)"
    flair = small["flair"]
    for label in ("Label map (NIfTI, input grid)", "Brain mask (NIfTI, input grid)",
                  "Uncertainty map (NIfTI, input grid, 0-255)"):
        image = nib.Nifti1Image.from_bytes(gzip.decompress(files[label]))
        assert image.shape == flair.shape, label
        np.testing.assert_allclose(image.affine, flair.affine, atol=1e-3)
    (seg_label,) = [k for k in files if k.startswith("DICOM SEG")]
    seg = pydicom.dcmread(io.BytesIO(files[seg_label]))
    assert seg.Modality == "SEG" and f"on series {report['inputs']['flair'].split()[0]}" in seg_label


@needs_real_data
@pytest.mark.slow
@pytest.mark.skipif(not RAW.is_dir(), reason=f"raw study {RAW} is absent (fresh clone outside the team setup)")
def test_raw_study_gets_raw_preparation_ticked_and_is_segmented_on_its_t1ce_grid(app, media):
    """The real raw clinical study (skull on, three grids, 5.5 mm slices) uploaded as its four files: the page
    says the grids differ and ticks 'Raw scans'; without it Segment is disabled with the reason; with it the case
    is co-registered, skull-stripped (deepbet) and segmented, and the labels and brain mask lie on the T1ce's own
    grid."""
    sources = sorted(RAW.iterdir())
    app.file_uploader[0].set_value([(p.name, p.read_bytes(), "application/gzip") for p in sources]).run()
    assert [s.value for s in app.selectbox if s.label.startswith("Sequence of")] == ["flair", "t1ce", "t2", "t1"]
    notice = text_of(app.info)
    (t2,) = RAW.glob("*_t2.nii.gz")
    assert "different voxel grids" in notice and f"{t2.name}: voxel grid differs" in notice
    assert "rotated by 14.04 degrees" in notice and "neuromap-app-" not in notice
    raw = app.checkbox(key="raw_0_True")
    assert raw.value
    raw.uncheck().run()
    assert button(app, "Segment").disabled and "tick 'Raw scans'" in text_of(app.warning)
    app.checkbox(key="raw_0_True").check().run()
    button(app, "Segment").click().run(timeout=1800)  # registration and deepbet on a shared CPU
    assert not app.exception and not app.error, text_of(app.error)

    files = downloads(app, media)
    uncertainty = "Uncertainty map (NIfTI, input grid, 0-255)"
    assert sorted(files) == ["Brain mask (NIfTI, input grid)", "Label map (NIfTI, input grid)", "Overlay (PNG)",
                             "Report (JSON)", uncertainty]
    (t1ce,) = RAW.glob("*_t1c.nii.gz")
    reference = nib.load(t1ce)
    for label in ("Label map (NIfTI, input grid)", "Brain mask (NIfTI, input grid)", uncertainty):
        image = nib.Nifti1Image.from_bytes(gzip.decompress(files[label]))
        assert image.shape == reference.shape and np.array_equal(image.affine, reference.affine), label
    report = json.loads(files["Report (JSON)"])
    raw_report = report["raw_preparation"]
    assert raw_report["reference"] == "t1ce" and raw_report["brain_mask"]["method"] == "deepbet on t1"
    assert 1000 <= raw_report["brain_mask"]["volume_ml"] <= 1700
    assert set(raw_report["timings_s"]) >= {"read_s", "register_s", "resample_s", "brain_mask_s", "quality_s"}
    assert report["inputs"]["t1ce"] == t1ce.name and "neuromap-app-" not in files["Report (JSON)"].decode()
    print("raw preparation in the app:", raw_report["timings_s"])
    # The viewer shows the co-registered 1 mm sequences (the uploaded ones are not aligned with the labels).
    from neuromap.app_viewer import component_args

    flair = nib.Nifti1Image.from_bytes(gzip.decompress(component_args(app.session_state.result, {})["seq_flair"]))
    assert np.allclose(flair.header.get_zooms(), 1.0) and flair.shape == tuple(raw_report["working_grid"]["shape"])


def test_dicom_zip_keeps_folders_and_only_dicom_files(tmp_path):
    """Files of different series may share a name in different folders; files without the DICOM mark are left
    out; a zip with neither NIfTI nor DICOM files is refused and leaves nothing."""
    dicom = b"\0" * 128 + b"DICM" + b"rest of a header"
    archive = zip_bytes({"Study/S1/IM0001": dicom, "Study/S2/IM0001": dicom, "Study/README": b"text",
                         "Study/S2/./IM0002": dicom})
    contents = extract_zip(archive, tmp_path / "d", limit_bytes=MB)
    assert contents.staged == [] and contents.dicom == tmp_path / "d"
    kept = sorted(str(p.relative_to(tmp_path / "d")) for p in (tmp_path / "d").rglob("*") if p.is_file())
    assert kept == ["Study/S1/IM0001", "Study/S2/IM0001", "Study/S2/IM0002"]
    assert contents.ignored == ["Study/README"]
    with pytest.raises(NeuroMapError, match="neither NIfTI files .* nor DICOM files"):
        extract_zip(zip_bytes({"notes.txt": b"text", "photo.jpg": b"\xff\xd8"}), tmp_path / "e", limit_bytes=MB)
    assert not (tmp_path / "e").exists()
    with pytest.raises(NeuroMapError, match="points outside the archive"):
        extract_zip(zip_bytes({"Study/../../IM1": dicom}), tmp_path / "f", limit_bytes=MB)
    with pytest.raises(NeuroMapError, match="more than the limit"):
        extract_zip(zip_bytes({f"Study/IM{i}": dicom + b"\0" * 400_000 for i in range(3)}), tmp_path / "g",
                    limit_bytes=MB)
