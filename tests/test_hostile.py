"""Hostile, broken and odd-but-legitimate inputs (issue 11), made here from a small copy of a real BraTS case.

Every refusal is checked the same way (`refused`): exit code 2, the specific message, no traceback, and the whole
test folder byte-identical afterwards (inputs unchanged, nothing left behind in any output folder). Odd but
legitimate inputs must pass (`accepted`), with the warning that says what is odd where there is one. Most runs
go through ``neuromap.cli.main`` in this process (fast); a few run the real command in a subprocess.

The copy: `Brats18_2013_2_1` with every third voxel along each axis (80 x 80 x 52 voxels of 3 mm), so each
load takes milliseconds but the intensities, background and tumour are real.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BRATS, LGG, needs_real_data

from neuromap.cli import main

pytestmark = needs_real_data

SOURCE = BRATS / "Brats18_2013_2_1"
CASE = "Small_001"
MODALITIES = ("t1", "t1ce", "t2", "flair")
SRC = Path(__file__).resolve().parents[1] / "src"


# ------------------------------------------------------------------------------------------------ running and checking


@dataclass
class Run:
    code: int
    out: str
    err: str


def cli(*argv: str | Path) -> Run:
    """``neuromap ARGV`` in this process; an exception escaping ``main`` fails the test (it would be a traceback)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse refuses an option
            code = exc.code
    run = Run(code, out.getvalue(), err.getvalue())
    assert "Traceback" not in run.err
    return run


def snapshot(root: Path) -> dict[str, str]:
    """Every file and link below ``root`` with a hash of its bytes (links by target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path)] = "-> " + os.readlink(path)
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[str(path)] = "dir"
    return found


def refused(root: Path, *argv: str | Path, expect: tuple[str, ...]) -> str:
    """Run, and check the refusal: exit 2, every ``expect`` text in stderr, ``root`` unchanged. Returns stderr."""
    before = snapshot(root)
    run = cli(*argv)
    assert run.code == 2, f"exit {run.code}\nstdout: {run.out}\nstderr: {run.err}"
    for text in expect:
        assert text in run.err, f"{text!r} not in:\n{run.err}"
    assert snapshot(root) == before, "an input changed or something was left behind"
    return run.err


def accepted(inputs: Path, *argv: str | Path, expect: tuple[str, ...] = ()) -> Run:
    """Run, and check success: exit 0, every ``expect`` text in stdout, the ``inputs`` folder unchanged."""
    before = snapshot(inputs)
    run = cli(*argv)
    assert run.code == 0, f"exit {run.code}\nstdout: {run.out}\nstderr: {run.err}"
    for text in expect:
        assert text in run.out, f"{text!r} not in:\n{run.out}"
    assert snapshot(inputs) == before
    return run


# ------------------------------------------------------------------------------------------------ making inputs


@pytest.fixture(scope="module")
def small_case(tmp_path_factory) -> Path:
    """The small real case (see the module doc), written once."""
    folder = tmp_path_factory.mktemp("base") / CASE
    folder.mkdir()
    for name in (*MODALITIES, "seg"):
        img = nib.load(SOURCE / f"{SOURCE.name}_{name}.nii.gz").slicer[::3, ::3, ::3]
        dtype = np.uint8 if name == "seg" else np.int16
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=dtype), img.affine), folder / f"{CASE}_{name}.nii.gz")
    return folder


@pytest.fixture
def case(tmp_path, small_case) -> Path:
    """A private copy of the small case under ``tmp_path/in``."""
    return Path(shutil.copytree(small_case, tmp_path / "in" / CASE))


def seq(folder: Path, name: str) -> Path:
    return folder / f"{CASE}_{name}.nii.gz"


def voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def replace(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Write ``data`` over ``path`` with the file's affine (or ``affine``)."""
    nib.save(nib.Nifti1Image(data, nib.load(path).affine if affine is None else affine), path)


def patch_header(path: Path, **fields: dict[int, float] | float) -> None:
    """Edit raw header fields the way a damaged or crafted file has them (nibabel would not write these):
    ``dim={1: 32767}`` sets one element of an array field, ``scl_slope=1e38`` a scalar field."""
    zipped = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if zipped else path.read_bytes())
    header = np.frombuffer(bytes(raw[:348]), dtype=nib.nifti1.header_dtype).copy()
    for name, value in fields.items():
        if isinstance(value, dict):
            for index, item in value.items():
                header[name][0, index] = item
        else:
            header[name] = value
    raw[:348] = header.tobytes()
    path.write_bytes(gzip.compress(bytes(raw), compresslevel=1) if zipped else bytes(raw))


def uncompressed(path: Path) -> Path:
    """Replace ``x.nii.gz`` by ``x.nii`` with the same content."""
    target = path.with_name(path.name[:-3])
    target.write_bytes(gzip.decompress(path.read_bytes()))
    path.unlink()
    return target


def brain(folder: Path) -> np.ndarray:
    return voxels(seq(folder, "flair")) != 0


# ------------------------------------------------------------------------------------------------ 1. headers first

HEADERS = {  # id: (fields patched into the FLAIR header, words the message must contain)
    "claims-32767-cubed": ({"dim": {1: 32767, 2: 32767, 3: 32767}}, ("more than NeuroMap holds", "(32767, 32767")),
    "claims-500-cubed": ({"dim": {1: 500, 2: 500, 3: 500}}, ("250 MB", "header declares")),
    "negative-dimension": ({"dim": {1: -5}}, ("empty or negative dimension",)),
    "zero-dimension": ({"dim": {2: 0}}, ("empty or negative dimension",)),
    "dims-edited-smaller": ({"dim": {3: 50}}, ("holds more than", "header does not describe the data")),
    "dims-edited-larger": ({"dim": {3: 60}}, ("holds only", "header does not describe the data")),
    "single-slice-2d": ({"dim": {0: 2}}, ("image is 2D with shape (", "a 3D volume is required")),
    "time-series-4d": ({"dim": {0: 4, 4: 20}}, ("20 volumes beyond the 3D grid",)),
    "datatype-complex": ({"datatype": 32, "bitpix": 64}, ("complex-valued",)),
    "datatype-unknown": ({"datatype": 999}, ("cannot be read as NIfTI",)),
    "data-offset-past-end": ({"vox_offset": 1e9}, ("1 GB", "header declares")),
    "affine-nan": ({"sform_code": 1, "qform_code": 0, "srow_x": {0: np.nan}}, ("NaN or infinity",)),
    "affine-singular": ({"sform_code": 1, "qform_code": 0, "srow_y": {0: 0, 1: 0, 2: 0}}, ("singular",)),
    "voxel-size-nan": ({"pixdim": {1: np.nan}}, ("voxel size", "not a positive number")),
    "pixdim-contradicts-affine": ({"pixdim": {1: 1.0}}, ("contradicts itself",)),
    "scale-overflows": ({"scl_slope": 1e38}, ("beyond the float32 range",)),
    "bad-magic": ({"magic": b"xyz"}, ("cannot be read as NIfTI",)),
}


@pytest.mark.parametrize("zipped", [True, False], ids=["nii.gz", "nii"])
@pytest.mark.parametrize("name", list(HEADERS))
def test_damaged_header_is_refused_before_reading(tmp_path, case, name, zipped):
    fields, expect = HEADERS[name]
    flair = seq(case, "flair") if zipped else uncompressed(seq(case, "flair"))
    patch_header(flair, **fields)
    refused(tmp_path, "validate", case, expect=(flair.name, *expect))


def test_header_claiming_petabytes_is_refused_by_segment_and_evaluate(tmp_path, case, tiny_checkpoint):
    patch_header(seq(case, "flair"), dim={1: 32767, 2: 32767, 3: 32767})
    huge = ("more than NeuroMap holds",)
    refused(tmp_path, "segment", case, "-o", tmp_path / "out", "--model", tiny_checkpoint, expect=huge)
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(seq(case, "seg"), pred / f"{CASE}_seg.nii.gz")
    patch_header(pred / f"{CASE}_seg.nii.gz", dim={1: 32767, 2: 32767, 3: 32767})
    refused(tmp_path, "evaluate", pred, case.parent, "-o", tmp_path / "eval", expect=huge)


@pytest.mark.parametrize("cut", [0.5, 0.99], ids=["half", "last-bytes"])
def test_truncated_gzip_is_refused(tmp_path, case, cut):
    flair = seq(case, "flair")
    data = flair.read_bytes()
    flair.write_bytes(data[: int(len(data) * cut)])
    refused(tmp_path, "validate", case, expect=(flair.name, "holds only", "truncated"))


@pytest.mark.parametrize("content", [b"", b"hello, this is not a scan\n" * 40, b"\x1f\x8b" + b"\0" * 500],
                         ids=["empty", "text", "gzip-magic-only"])
def test_not_nifti_content_is_refused(tmp_path, case, content):
    seq(case, "flair").write_bytes(content)
    refused(tmp_path, "validate", case, expect=(f"{CASE}_flair.nii.gz", "cannot be read as NIfTI"))


def test_rgb_voxels_are_refused(tmp_path, case):
    flair = seq(case, "flair")
    grey = voxels(flair).clip(0, 255).astype(np.uint8)
    rgb = np.zeros(grey.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for channel in "RGB":
        rgb[channel] = grey
    replace(flair, rgb)
    refused(tmp_path, "validate", case, expect=(flair.name, "RGB"))


def test_generated_headers_never_crash(tmp_path_factory, small_case):
    """Random values in the fields nibabel trusts: always exit 0 or 2, and a refusal names the damaged file."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    fields = st.fixed_dictionaries({}, optional={
        "dim": st.dictionaries(st.integers(0, 4), st.integers(-2, 32767), max_size=3),  # int16 field
        "pixdim": st.dictionaries(st.integers(1, 3), st.floats(allow_nan=True, allow_infinity=True, width=32),
                                  max_size=2),
        "datatype": st.sampled_from([2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1792, 2304, 999]),
        "vox_offset": st.floats(0, 1e7, width=32),
        "scl_slope": st.floats(allow_nan=True, allow_infinity=True, width=32),
        "scl_inter": st.floats(-1e6, 1e6, width=32),
        "srow_x": st.dictionaries(st.integers(0, 3), st.floats(allow_nan=True, allow_infinity=True, width=32),
                                  max_size=2),
        "sform_code": st.integers(0, 4),
        "qform_code": st.integers(0, 4),
    })

    @hypothesis.settings(max_examples=30, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(fields)
    def check(patch: dict) -> None:
        root = tmp_path_factory.mktemp("fuzz")
        folder = Path(shutil.copytree(small_case, root / CASE))
        patch_header(seq(folder, "flair"), **patch)
        before = snapshot(root)
        run = cli("validate", folder)
        assert run.code in (0, 2), run
        if run.code == 2:
            assert "_flair.nii.gz" in run.err
        assert snapshot(root) == before

    check()


def test_huge_header_in_a_real_process(tmp_path, case):
    """The same refusal through the installed command: exit 2 and one message, no MemoryError traceback."""
    patch_header(seq(case, "t1"), dim={1: 32767, 2: 32767, 3: 32767})
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "neuromap", "validate", str(case)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert proc.returncode == 2
    assert "more than NeuroMap holds" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ 2. plausible MRI


def _constant(case: Path) -> None:
    replace(seq(case, "flair"), np.full(brain(case).shape, 100, np.int16))


def _all_zero(case: Path) -> None:
    replace(seq(case, "flair"), np.zeros(brain(case).shape, np.int16))


def _binary_mask(case: Path) -> None:
    replace(seq(case, "flair"), brain(case).astype(np.int16))


def _near_float32_limit(case: Path) -> None:
    values = np.random.default_rng(0).uniform(-3e38, -1e38, brain(case).shape).astype(np.float32)
    replace(seq(case, "flair"), np.where(brain(case), values, 0).astype(np.float32))


def _one_nan(case: Path) -> None:
    data = voxels(seq(case, "flair")).astype(np.float32)
    data[40, 40, 26] = np.nan
    replace(seq(case, "flair"), data)


def _infinite(case: Path) -> None:
    data = voxels(seq(case, "flair")).astype(np.float32)
    data[brain(case)] = np.inf
    replace(seq(case, "flair"), data)


def _copy_of_t2(case: Path) -> None:
    shutil.copy(seq(case, "t2"), seq(case, "flair"))


def _rescaled_t2(case: Path) -> None:
    t2 = voxels(seq(case, "t2")).astype(np.float32)
    replace(seq(case, "flair"), np.where(t2 != 0, 2.5 * t2 + 7, 0).astype(np.float32))


def _link_to_t2(case: Path) -> None:
    seq(case, "flair").unlink()
    seq(case, "flair").symlink_to(seq(case, "t2").name)


CONTENTS = {  # id: (change to the case, words of the message)
    "constant-100": (_constant, ("constant image (every voxel is 100)",)),
    "all-zero": (_all_zero, ("all zero",)),
    "binary-mask": (_binary_mask, ("only 2 distinct values (0, 1)", "label map or mask")),
    "values-near-float32-limit": (_near_float32_limit, ("beyond 1e+15",)),
    "one-nan-voxel": (_one_nan, ("NaN or infinite",)),
    "infinite-brain": (_infinite, ("NaN or infinite",)),
    "copy-of-another-sequence": (_copy_of_t2, ("identical voxel data",)),
    "rescaled-copy": (_rescaled_t2, ("rescaled copy",)),
    "link-to-another-sequence": (_link_to_t2, ("given for both t2 and flair",)),
}


@pytest.mark.parametrize("name", list(CONTENTS))
def test_implausible_sequence_is_refused(tmp_path, case, name):
    change, expect = CONTENTS[name]
    change(case)
    refused(tmp_path, "validate", case, expect=(*expect,))


def test_constant_image_is_not_segmented(tmp_path, case, tiny_checkpoint):
    """The issue's example: a constant image became a 930 mL tumour. Now refused, and no output appears."""
    _constant(case)
    refused(tmp_path, "segment", case, "-o", tmp_path / "out", "--model", tiny_checkpoint,
            expect=("constant image",))


def _mapping(case: Path, **files: Path) -> list[str]:
    chosen = {m: seq(case, m) for m in MODALITIES} | files
    return ["--map", *(f"{m}={path}" for m, path in chosen.items())]


def test_label_map_given_as_an_image_is_refused(tmp_path, case, tiny_checkpoint):
    err = refused(tmp_path, "segment", case, *_mapping(case, t1ce=seq(case, "seg")), "-o", tmp_path / "out",
                  "--model", tiny_checkpoint, expect=("_seg.nii.gz", "distinct values (0, 1, 2, 4)", "label map"))
    assert "give the t1ce scan here" in err


def test_same_file_mapped_twice_is_refused_before_reading(tmp_path, case):
    refused(tmp_path, "validate", case, *_mapping(case, flair=seq(case, "t2")), expect=("given for both t2 and flair",))


def _few_levels(case: Path) -> None:
    flair = voxels(seq(case, "flair")).astype(np.float64)
    replace(seq(case, "flair"), np.round(flair / flair.max() * 40).astype(np.int16))


def _normalised(case: Path) -> None:
    flair = voxels(seq(case, "flair")).astype(np.float32)
    inside = flair[brain(case)]
    replace(seq(case, "flair"), np.where(brain(case), (flair - inside.mean()) / inside.std() + 1e-3, 0)
            .astype(np.float32))


def _flat(case: Path) -> None:
    noise = np.random.default_rng(1).normal(1000, 10, brain(case).shape)
    replace(seq(case, "flair"), np.where(brain(case), noise, 0).astype(np.float32))


def _clipped(case: Path) -> None:
    flair = voxels(seq(case, "flair"))
    floor = np.percentile(flair[brain(case)], 40)
    replace(seq(case, "flair"), np.where(brain(case), np.maximum(flair, floor), 0).astype(np.int16))


def _with_skull(case: Path) -> None:
    rng = np.random.default_rng(2)
    for m in MODALITIES:
        data = voxels(seq(case, m))
        replace(seq(case, m), np.where(data == 0, rng.integers(1, 30, data.shape), data).astype(np.int16))


def _too_similar(case: Path) -> None:
    flair = voxels(seq(case, "flair")).astype(np.float32)
    spread = flair[brain(case)].std() * np.sqrt(1 / 0.97**2 - 1)  # correlation 0.97 with FLAIR
    noisy = flair + np.random.default_rng(3).normal(0, spread, flair.shape)
    replace(seq(case, "t2"), np.where(brain(case), noisy, 0).astype(np.float32))


ODD = {  # id: (change to the case, words of the warning)
    "few-levels": (_few_levels, ("distinct intensities",)),
    "already-normalised": (_normalised, ("are negative",)),
    "no-contrast": (_flat, ("almost no contrast",)),
    "clipped": (_clipped, ("saturated or clipped",)),
    "not-skull-stripped": (_with_skull, ("not skull-stripped",)),
    "nearly-identical-sequences": (_too_similar, ("unusually similar",)),
}


@pytest.mark.parametrize("name", list(ODD))
def test_odd_sequence_is_accepted_with_a_warning(case, name):
    change, expect = ODD[name]
    change(case)
    run = accepted(case, "validate", case, expect=("OK", "warning:", *expect))
    assert run.out.count("warning:") == 1, run.out


def _float32(case: Path) -> None:
    for m in MODALITIES:
        replace(seq(case, m), voxels(seq(case, m)).astype(np.float32))


def _reoriented(case: Path) -> None:
    for name in (*MODALITIES, "seg"):
        img = nib.load(seq(case, name))
        nib.save(nib.as_closest_canonical(img), seq(case, name))


def _uncompressed(case: Path) -> None:
    for name in (*MODALITIES, "seg"):
        uncompressed(seq(case, name))


def _extra_files(case: Path) -> None:
    (case / "README.txt").write_text("notes")
    (case / f"._{CASE}_t1.nii.gz").write_bytes(b"\0" * 100)  # a macOS resource fork
    (case / ".DS_Store").write_bytes(b"\0" * 10)


def _no_orientation(case: Path) -> None:
    for name in (*MODALITIES, "seg"):
        img = nib.load(seq(case, name))
        img.set_sform(None, code=0)
        img.set_qform(None, code=0)
        nib.save(img, seq(case, name))


def _thick_slices(case: Path) -> None:
    for name in (*MODALITIES, "seg"):
        img = nib.load(seq(case, name))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ np.diag([1, 1, 2, 1])), seq(case, name))


HEADER_WARNINGS = {"no-orientation": (_no_orientation, "records no orientation"),
                   "6-mm-slices": (_thick_slices, "slices thicker than 3.5 mm")}


@pytest.mark.parametrize("name", list(HEADER_WARNINGS))
def test_usable_but_doubtful_header_is_said_once_for_all_files(case, name):
    """Every sequence has the doubtful header, the warning names them together once (not four times)."""
    change, words = HEADER_WARNINGS[name]
    change(case)
    run = accepted(case, "validate", case, expect=("OK", words))
    assert run.out.count("warning:") == 1 and all(f"{CASE}_{m}.nii.gz" in run.out for m in MODALITIES), run.out


LEGITIMATE = {"float32": _float32, "reoriented-ras": _reoriented, "uncompressed": _uncompressed,
              "extra-files": _extra_files}


@pytest.mark.parametrize("name", list(LEGITIMATE))
def test_odd_but_legitimate_case_passes_without_warning(case, name):
    LEGITIMATE[name](case)
    run = accepted(case, "validate", case, expect=("OK   Small_001",))
    assert "warning" not in run.out


def test_real_case_name_with_spaces_and_accents_validates(tmp_path, small_case):
    folder = tmp_path / "in" / "Patient é 1"
    folder.mkdir(parents=True)
    for name in (*MODALITIES, "seg"):
        shutil.copy(seq(small_case, name), folder / f"Patient é 1_{name}.nii.gz")
    accepted(folder, "validate", folder, expect=("OK   Patient é 1",))


# ------------------------------------------------------------------------------------------------ 3. outputs


def _unwritable(tmp_path: Path) -> Path:
    """A folder nobody can write into: root ignores permission bits, so then a path in sysfs."""
    if os.geteuid() == 0:
        return Path("/sys/kernel/neuromap-out")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "out"


def test_output_problems_are_found_before_inference(tmp_path, case, tiny_checkpoint):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    segment = ("segment", case, "--model", tiny_checkpoint, "--quiet", "-o")
    refused(tmp_path, *segment, blocker, expect=("a_file: the segmentation outputs cannot be written there: it is a "
                                                 "file, not a folder",))
    refused(tmp_path, *segment, blocker / "sub", expect=("lies under", "which is a file"))
    refused(tmp_path, *segment, "/dev/null", expect=("/dev/null: the segmentation outputs cannot be written there",))
    refused(tmp_path, *segment, _unwritable(tmp_path), expect=("creating it inside",))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    refused(tmp_path, *segment, tmp_path / "dangling", expect=("broken link",))


def test_existing_outputs_and_input_folder_are_refused(tmp_path, case, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{CASE}_report.json").write_text("{}")
    refused(tmp_path, "segment", case, "-o", out, "--model", tiny_checkpoint, expect=("output exists",))
    refused(tmp_path, "segment", case, "-o", case, "--model", tiny_checkpoint, expect=("would overwrite an input",))


def test_outputs_inside_an_input_case_folder_are_refused(tmp_path, case, tiny_checkpoint):
    """Unlabelled, so no file would be overwritten; still the input folder would change, and the next run would
    take the written label map for the case's ground truth."""
    seq(case, "seg").unlink()
    for out in (case, case / "results"):
        refused(tmp_path, "segment", case, "-o", out, "--model", tiny_checkpoint,
                expect=("lies inside the input folder of case 'Small_001'",))


def _prediction_folder(tmp_path: Path, case: Path) -> Path:
    """What `neuromap segment` leaves: the label map and the report."""
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(seq(case, "seg"), pred / f"{CASE}_seg.nii.gz")
    (pred / f"{CASE}_report.json").write_text(json.dumps({"case_id": CASE}))
    return pred


def test_evaluate_output_problems_are_found_first(tmp_path, case):
    pred = _prediction_folder(tmp_path, case)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    refused(tmp_path, "evaluate", pred, case.parent, "-o", blocker, expect=("evaluation results cannot be written",
                                                                             "it is a file, not a folder"))
    refused(tmp_path, "evaluate", pred, case.parent, "-o", _unwritable(tmp_path), expect=("creating it inside",))


# ------------------------------------------------------------------------------------------------ 4. option ranges

OPTIONS = {  # id: (arguments after the command and case, words of argparse's message)
    "spacing-zero": (["preprocess", "--spacing", "0", "0", "0"], ("--spacing", "greater than or equal to 0.1")),
    "spacing-tiny": (["preprocess", "--spacing", "0.001", "1", "1"], ("greater than or equal to 0.1",)),
    "spacing-negative": (["preprocess", "--spacing", "-1", "1", "1"], ("greater than or equal to 0.1",)),
    "spacing-huge": (["preprocess", "--spacing", "150", "1", "1"], ("less than or equal to 10",)),
    "spacing-nan": (["preprocess", "--spacing", "nan", "1", "1"], ("finite number",)),
    "spacing-inf": (["preprocess", "--spacing", "1", "inf", "1"], ("finite number",)),
    "spacing-text": (["preprocess", "--spacing", "one", "1", "1"], ("valid number",)),
    "slice-negative": (["preprocess", "--mode", "2d", "--slice-range", "-1", "10"], ("--slice-range",)),
    "threads-zero": (["segment", "-o", "OUT", "--threads", "0"], ("--threads", "greater than or equal to 1")),
    "threads-fraction": (["segment", "-o", "OUT", "--threads", "1.5"], ("valid integer",)),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_numeric_option_out_of_range_is_refused_by_argparse(tmp_path, case, name):
    args, expect = OPTIONS[name]
    command, *rest = args
    refused(tmp_path, command, case, *[str(tmp_path / "out") if a == "OUT" else a for a in rest], expect=expect)


@pytest.mark.parametrize("args, expect", [
    (["app", "--max-upload-mb", "nan"], "finite number"),
    (["app", "--max-upload-mb", "-5"], "greater than 0"),
    (["app", "--port", "0"], "greater than or equal to 1"),
    (["app", "--port", "70000"], "less than or equal to 65535"),
    (["train", "x.yaml", "--fold", "-1"], "greater than or equal to 0"),
    (["cv", "x.yaml", "--folds", "0", "-2"], "greater than or equal to 0"),
], ids=["upload-nan", "upload-negative", "port-zero", "port-huge", "fold-negative", "folds-negative"])
def test_numeric_option_without_a_case_is_refused(tmp_path, args, expect):
    refused(tmp_path, *args, expect=(expect,))


@pytest.mark.parametrize("slices, expect", [
    (("60", "10"), "slice_range [60, 10] is reversed"),
    (("10", "10"), "slice_range [10, 10] is empty"),
    (("10", "500"), "ends after the last axial slice: the volume has 52"),
], ids=["reversed", "empty", "past-the-end"])
def test_slice_range_says_what_is_wrong(tmp_path, case, slices, expect):
    refused(tmp_path, "preprocess", case, "--mode", "2d", "--slice-range", *slices, expect=(expect,))


def test_spacing_that_would_not_fit_in_memory_is_refused(tmp_path, case):
    refused(tmp_path, "preprocess", case, "--spacing", "0.1", "0.1", "0.1", expect=("more than NeuroMap holds",
                                                                                     "coarser spacing"))


def test_repeated_modalities_option_is_a_message_not_a_traceback(tmp_path, case):
    refused(tmp_path, "preprocess", case, "--modalities", "t1,t1", expect=("without repeats",))


def test_spacing_in_a_config_file_has_the_same_range(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"data_roots: [{tmp_path}]\npreprocess:\n  spacing: [0, 1, 1]\n")
    refused(tmp_path, "train", config, expect=("preprocess.spacing.0", "greater than or equal to 0.1"))


# ------------------------------------------------------------------------------------------------ 5. training


@pytest.mark.parametrize("text, expect", [
    ("", "the config file is empty"),
    ("# only a comment\n", "the config file is empty"),
    ("{{}}\n", "the config names no data_roots"),
    ("name: x\n", "the config names no data_roots"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("name: [unclosed\n", "not valid YAML"),
    ("data_roots: [{missing}]\n", "missing: no such file or folder"),
    ("data_roots: [{unlabelled}]\n", "no labelled cases"),
    ("data_roots: [{labelled}]\nsplit: {{mode: kfold, fold: 7}}\n", "fold 7 does not exist"),
    ("data_roots: [{labelled}]\noutput_dir: {blocked}\n", "which is a file"),
    ("data_roots: [{labelled}]\nbatch_size: 100000\n", "voxels per batch"),
    ("\udcff\udcfe binary", "not a text file (not UTF-8)"),
    ("# padding\n" * 120_000, "is not a config file"),
], ids=["empty", "comment", "empty-mapping", "no-data-roots", "list", "bad-yaml", "missing-root", "unlabelled-root",
        "no-such-fold", "run-under-a-file", "huge-batch", "binary-file", "1.2-MB-file"])
def test_training_refusals_leave_no_run_folder(tmp_path, small_case, monkeypatch, text, expect):
    monkeypatch.chdir(tmp_path)  # the default run folder runs/<name> would be created here
    unlabelled = tmp_path / "unlabelled" / CASE
    shutil.copytree(small_case, unlabelled)
    seq(unlabelled, "seg").unlink()
    (tmp_path / "blocker").write_text("x")
    config = tmp_path / "run.yaml"
    config.write_text(text.format(missing=tmp_path / "missing", unlabelled=unlabelled.parent,
                                  labelled=small_case.parent, blocked=tmp_path / "blocker" / "run"),
                      errors="surrogateescape")  # the binary file's bytes as they are
    refused(tmp_path, "train", config, "--quiet", expect=(expect,))
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ 6. evaluate roles


def test_swapped_evaluate_arguments_are_detected(tmp_path, case):
    pred = _prediction_folder(tmp_path, case)
    refused(tmp_path, "evaluate", case.parent, pred, "-o", tmp_path / "eval",
            expect=("holds MRI scans", "look swapped"))


def test_a_dataset_is_not_a_prediction_folder(tmp_path, case):
    other = tmp_path / "truth"
    other.mkdir()
    shutil.copy(seq(case, "seg"), other / f"{CASE}_seg.nii.gz")
    refused(tmp_path, "evaluate", case.parent, other, "-o", tmp_path / "eval",
            expect=("holds MRI scans", "output folder of `neuromap segment`"))


def test_lgg_patient_folder_is_not_a_prediction_folder(tmp_path, case):
    patient = sorted(p for p in LGG.iterdir() if p.is_dir())[0]
    slices = tmp_path / "lgg" / patient.name
    slices.mkdir(parents=True)
    for path in sorted(patient.glob("*_1*.tif"))[:4]:
        shutil.copy(path, slices / path.name)
    refused(tmp_path, "evaluate", slices.parent, case.parent, "-o", tmp_path / "eval", expect=("holds MRI scans",))


def test_evaluate_in_the_right_order_runs(tmp_path, case):
    pred = _prediction_folder(tmp_path, case)
    run = accepted(case, "evaluate", pred, case.parent, "-o", tmp_path / "eval", "--no-hd95")
    assert "metrics.csv" in run.out
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    wt = next(s for s in summary["structures"] if s["structure"] == "WT")
    assert wt["metrics"]["dice"]["mean"] == pytest.approx(1.0)


def test_swapped_evaluate_in_a_real_process(tmp_path, case):
    pred = _prediction_folder(tmp_path, case)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "neuromap", "evaluate", str(case.parent), str(pred), "-o",
                           str(tmp_path / "eval")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert proc.returncode == 2 and "look swapped" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ 7. precise messages


def _moved(affine: np.ndarray) -> np.ndarray:
    moved = affine.copy()
    moved[1, 3] += 0.5
    return moved


def _rotated(affine: np.ndarray) -> np.ndarray:
    angle = np.radians(5)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation @ affine


def _flipped(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The affine of the same voxels stored with the first axis reversed."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, shape[0] - 1
    return affine @ flip


def test_grid_differences_are_named_and_measured(tmp_path, case):
    flair = seq(case, "flair")
    data, affine = voxels(flair), nib.load(flair).affine
    replace(flair, data, _moved(affine))
    refused(tmp_path, "validate", case, expect=("field-of-view centre shifted by 0.5 mm", "y +0.5", "co-register"))
    replace(flair, data[::-1], _flipped(affine, data.shape))
    err = refused(tmp_path, "validate", case, expect=("orientation RPS vs LPS (axis 1 flipped (R vs L))",))
    assert "shifted" not in err  # the same voxels, only stored the other way round
    replace(flair, data, affine @ np.diag([1, 1, 1.5, 1]))
    refused(tmp_path, "validate", case, expect=("voxel size 3 x 3 x 4.5 mm vs 3 x 3 x 3 mm",))
    replace(flair, data, _rotated(affine))
    refused(tmp_path, "validate", case, expect=("rotated by 5.00 degrees",))
    replace(flair, data[..., :-1], affine)
    refused(tmp_path, "validate", case, expect=("shape (80, 80, 51) vs (80, 80, 52)",))


def test_corrupt_header_is_not_called_a_registration_problem(tmp_path, case):
    patch_header(seq(case, "flair"), dim={3: 51})
    err = refused(tmp_path, "validate", case, expect=("header does not describe the data",))
    assert "co-register" not in err


def test_case_name_in_any_script_reaches_the_picture(tmp_path, small_case, tiny_checkpoint):
    folder = tmp_path / "in" / "患者_001"
    folder.mkdir(parents=True)
    for name in MODALITIES:
        shutil.copy(seq(small_case, name), folder / f"患者_001_{name}.nii.gz")
    run = accepted(folder, "segment", folder, "-o", tmp_path / "out", "--model", tiny_checkpoint, "--quiet")
    assert "Glyph" not in run.err  # matplotlib's complaint when it drops a character
    assert (tmp_path / "out" / "患者_001_overlay.png").stat().st_size > 0
    from neuromap.glyphs import drawable

    shown, families = drawable("患者_001")
    assert shown.endswith("_001") and (shown.startswith("<U+60A3><U+8005>") or len(families) > 1)


# ------------------------------------------------------------------------------------------------ tired users


def _two_t1ce(case: Path) -> None:
    shutil.copy(seq(case, "t1ce"), case / f"{CASE}_t1c.nii.gz")


def _seg_probabilities(case: Path) -> None:
    replace(seq(case, "seg"), voxels(seq(case, "seg")).astype(np.float32) * 0.5)


def _seg_unknown_label(case: Path) -> None:
    seg = voxels(seq(case, "seg")).copy()
    seg[seg == 2] = 7
    replace(seq(case, "seg"), seg)


def _empty_mask(case: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros(brain(case).shape, np.uint8), nib.load(seq(case, "t1")).affine),
             case / f"{CASE}_mask.nii.gz")


def _seg_other_shape(case: Path) -> None:
    replace(seq(case, "seg"), voxels(seq(case, "seg"))[:, :, :-2])


def _unusable(kind: str):
    """The flair entry replaced by something named like it that cannot be read."""
    def change(case: Path) -> None:
        flair = seq(case, "flair")
        if kind == "hdr-img-pair":
            img = nib.load(flair)
            nib.save(nib.Nifti1Pair(np.asarray(img.dataobj), img.affine), case / f"{CASE}_flair.img")
            flair.unlink()
        elif kind == "mha":
            flair.rename(case / f"{CASE}_flair.mha")
        else:
            flair.unlink()
            if kind == "folder":
                flair.mkdir()
            elif kind == "broken-link":
                flair.symlink_to(case.parent / "moved_away.nii.gz")
            else:
                os.mkfifo(flair)
    return change


UNUSABLE = {"folder": "is a folder", "broken-link": "which does not exist", "pipe": "not a regular file",
            "hdr-img-pair": "format NeuroMap does not read (.hdr)", "mha": "format NeuroMap does not read (.mha)"}

FOLDER_MISTAKES = {  # id: (change, extra validate arguments, words of the message)
    **{f"flair-{kind}": (_unusable(kind), [], ("named as the flair sequence but", words))
       for kind, words in UNUSABLE.items()},
    "two-files-for-t1ce": (_two_t1ce, [], ("two files map to modality 't1ce'",)),
    "seg-probabilities": (_seg_probabilities, [], ("non-integral values",)),
    "seg-unknown-label": (_seg_unknown_label, [], ("labels [7]",)),
    "empty-brain-mask": (_empty_mask, [], ("brain mask is empty",)),
    "seg-other-shape": (_seg_other_shape, [], ("segmentation shape",)),
    "missing-flair": (lambda c: seq(c, "flair").unlink(), ["--modalities", "t1ce,flair"], ("missing modality",)),
}


@pytest.mark.parametrize("name", list(FOLDER_MISTAKES))
def test_case_folder_mistakes(tmp_path, case, name):
    change, extra, expect = FOLDER_MISTAKES[name]
    change(case)
    refused(tmp_path, "validate", case, *extra, expect=expect)


def test_paths_and_mappings_that_make_no_case(tmp_path, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_seg").mkdir()
    shutil.copy(seq(case, "seg"), tmp_path / "only_seg" / f"{CASE}_seg.nii.gz")
    (tmp_path / "list.yaml").write_text("- t1.nii.gz\n")
    refused(tmp_path, "validate", tmp_path / "nope", expect=("nope: no such file or folder",))
    refused(tmp_path, "validate", seq(case, "t1"), expect=("is a file; give the case folder",))
    refused(tmp_path, "validate", tmp_path / "empty", expect=("no cases found",))
    refused(tmp_path, "validate", tmp_path / "only_seg", expect=("no MRI sequence found",))
    mapped = ("validate", case, "--map", f"t1={seq(case, 't1')}")
    refused(tmp_path, *mapped, f"t1ce{seq(case, 't1ce')}", expect=("is not MODALITY=FILE",))
    refused(tmp_path, *mapped, f"t3={seq(case, 't2')}", expect=("unknown modality 't3'",))
    refused(tmp_path, *mapped, f"t2={tmp_path / 'gone.nii.gz'}", expect=("gone.nii.gz: file given for 't2' does not",))
    refused(tmp_path, *mapped, "t2=/dev/zero", expect=("/dev/zero: file given for 't2' is not a regular file",))
    refused(tmp_path, "validate", case, "--map", tmp_path / "list.yaml", expect=("mapping must be 'modality: file'",))


def test_prediction_placed_elsewhere_is_said_once_in_the_cli_voice(tmp_path, case):
    """Same shape and voxel size, 10 mm away: scored as stored, with one warning that says by how much (Python's
    default warning format shows source lines, which read like a traceback)."""
    pred = _prediction_folder(tmp_path, case)
    label = pred / f"{CASE}_seg.nii.gz"
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine + _shift(10)), label)
    run = cli("evaluate", pred, case.parent, "-o", tmp_path / "eval")
    assert run.code == 0, run.err
    warnings = [line for line in run.err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("neuromap evaluate: warning:"), run.err
    assert "shifted by 10 mm (x +10" in warnings[0] and "UserWarning" not in run.err


def _shift(mm: float) -> np.ndarray:
    moved = np.zeros((4, 4))
    moved[0, 3] = mm
    return moved


def test_evaluate_mistakes(tmp_path, case):
    empty = tmp_path / "nothing"
    empty.mkdir()
    refused(tmp_path, "evaluate", empty, case.parent, "-o", tmp_path / "eval", expect=("no predictions found",))
    pred = _prediction_folder(tmp_path, case)
    replace(pred / f"{CASE}_seg.nii.gz", voxels(seq(case, "seg"))[:, :, :-1])
    refused(tmp_path, "evaluate", pred, case.parent, "-o", tmp_path / "eval", expect=("shape mismatch",))


# ------------------------------------------------------------------------------------------------ LGG slice folders


@pytest.fixture
def lgg_patient(tmp_path) -> Path:
    """A copy of the first 12 slices (images and masks) of a real LGG patient under ``tmp_path/in``."""
    source = sorted(p for p in LGG.iterdir() if p.is_dir())[0]
    folder = tmp_path / "in" / source.name
    folder.mkdir(parents=True)
    for n in range(1, 13):
        for suffix in ("", "_mask"):
            shutil.copy(source / f"{source.name}_{n}{suffix}.tif", folder / f"{source.name}_{n}{suffix}.tif")
    return folder


def _rewrite_slices(folder: Path, change) -> None:
    """Apply ``change(image) -> image`` to every image slice (rows x cols x 3 uint8) of a patient folder."""
    import tifffile

    for path in folder.glob("*.tif"):
        if not path.stem.endswith("_mask"):
            tifffile.imwrite(path, np.ascontiguousarray(change(tifffile.imread(path))), photometric="rgb")


def _lgg_channel(index: int, value) -> object:
    def change(image: np.ndarray) -> np.ndarray:
        image = image.copy()
        image[..., index] = value(image[..., index])
        return image
    return change


LGG_CONTENTS = {  # name: (change of every slice, what the refusal says); FLAIR is channel 1, post-contrast 2
    "flair-constant": (_lgg_channel(1, lambda c: np.full_like(c, 90)), ("flair channel", "constant image")),
    "flair-is-a-mask": (_lgg_channel(1, lambda c: np.where(c > 60, 255, 0)), ("only 2 distinct values", "mask")),
    "t1ce-empty": (_lgg_channel(2, np.zeros_like), ("t1ce channel", "all zero (empty)")),
}


@pytest.mark.parametrize("name", list(LGG_CONTENTS))
def test_implausible_lgg_slices_are_refused(tmp_path, lgg_patient, name):
    change, expect = LGG_CONTENTS[name]
    _rewrite_slices(lgg_patient, change)
    refused(tmp_path, "validate", lgg_patient, expect=expect)


def test_saturated_lgg_flair_is_accepted_with_a_warning(lgg_patient):
    # FLAIR clipped at its median signal value: a third of the head then holds one value
    _rewrite_slices(lgg_patient, _lgg_channel(1, lambda c: np.where(c > 0, np.maximum(c, 120), 0)))
    accepted(lgg_patient, "validate", lgg_patient, expect=("OK", "warning:", "saturated or clipped"))


def test_real_lgg_slices_validate_without_a_plausibility_warning(lgg_patient):
    run = accepted(lgg_patient, "validate", lgg_patient, expect=("OK",))
    assert "saturated" not in run.out and "distinct" not in run.out
