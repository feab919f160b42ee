"""LGG kaggle_3m slice folders: discovery, numeric slice order, axis convention, validation messages, and the
predicted-mask round trip. Synthetic stacks are small and non-square (6 x 5) so a transposed axis cannot pass;
slice numbers run 1..12 so lexicographic order (1, 10, 11, 12, 2, ...) would be caught.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from neuromap.errors import NeuroMapError
from neuromap.io import LGG, discover_cases, load_case, validate_case

ROWS, COLS, N = 6, 5, 12
PREFIX = "TCGA_XX_0001_20000101"
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg_kaggle_3m"


def make_patient(
    root: Path, compression: str | None = "zlib", numbers: range = range(1, N + 1), masks: bool = True
) -> tuple[Path, dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Write a patient folder like kaggle_3m; returns it with the image (rows, cols, 3) and 0/255 mask per N."""
    folder = root / PREFIX
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, mask_arrays = {}, {}
    for n in reversed(numbers):  # creation order must not matter either
        images[n] = rng.integers(1, 256, size=(ROWS, COLS, 3), dtype=np.uint8)
        tifffile.imwrite(folder / f"{PREFIX}_{n}.tif", images[n], photometric="rgb", compression=compression)
        if masks:
            mask_arrays[n] = np.where(rng.random((ROWS, COLS)) > 0.7, 255, 0).astype(np.uint8)
            tifffile.imwrite(folder / f"{PREFIX}_{n}_mask.tif", mask_arrays[n], compression=compression)
    return folder, images, mask_arrays


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_slices_stack_in_numeric_order_with_rows_as_x(tmp_path: Path, compression: str | None) -> None:
    folder, images, masks = make_patient(tmp_path, compression)
    with tifffile.TiffFile(folder / f"{PREFIX}_10.tif") as tif:  # the file really has the intended compression
        assert (tif.pages[0].compression == 1) == (compression is None)
    case = LGG.case_from_folder(folder)
    assert (case.case_id, case.layout, case.label_convention) == (PREFIX, LGG, "binary")
    assert [n for n, _, _ in case.slices] == list(range(1, N + 1))
    assert {m: r.channel for m, r in case.images.items()} == {"t1": 0, "t1ce": 2, "flair": 1}

    volume = load_case(case)
    assert volume.image.shape == (3, ROWS, COLS, N) and volume.image.dtype == np.float32
    assert volume.modalities == ["t1", "t1ce", "flair"]
    for z, n in enumerate(range(1, N + 1)):
        np.testing.assert_array_equal(volume.image[:, :, :, z], images[n][:, :, [0, 2, 1]].transpose(2, 0, 1))
        np.testing.assert_array_equal(volume.seg[:, :, z], masks[n] // 255)
    assert volume.seg.dtype == np.uint8
    assert volume.reference.shape == (ROWS, COLS, N) and volume.spacing == (1.0, 1.0, 1.0)
    assert volume.spacing_known is False
    np.testing.assert_array_equal(volume.affine, np.eye(4))
    assert volume.warnings == ["pixel spacing unknown: volumes in voxels"]  # no channel copies FLAIR

    flair_t1 = LGG.load(case, ["flair", "t1"], with_seg=False)
    assert flair_t1.seg is None
    np.testing.assert_array_equal(flair_t1.image[:, :, :, 0], images[1][:, :, [1, 0]].transpose(2, 0, 1))


def test_missing_sequence_replaced_by_flair_is_flagged(tmp_path: Path) -> None:
    folder, _, _ = make_patient(tmp_path, numbers=range(1, 3))
    for n in (1, 2):  # the dataset fills a missing post-contrast with FLAIR
        path = folder / f"{PREFIX}_{n}.tif"
        image = tifffile.imread(path)
        image[:, :, 2] = image[:, :, 1]
        tifffile.imwrite(path, image, photometric="rgb")
    case = LGG.case_from_folder(folder)
    validate_case(case)
    warnings = load_case(case, ["t1", "flair"]).warnings
    assert "the t1ce channel(s) are copies of FLAIR (sequence missing in the dataset); the model does not use them" \
        in warnings


def test_orphans_and_naming_problems_are_all_named(tmp_path: Path) -> None:
    folder, _, _ = make_patient(tmp_path)
    (folder / f"{PREFIX}_5_mask.tif").unlink()  # image without mask
    (folder / f"{PREFIX}_12.tif").unlink()  # mask without image
    (folder / f"{PREFIX}_7.tif").unlink()
    (folder / f"{PREFIX}_7_mask.tif").unlink()  # gap
    (folder / "screenshot.tif").write_bytes(b"x")
    (folder / f"._{PREFIX}_1.tif").write_bytes(b"macOS resource fork")  # hidden: ignored
    case = LGG.case_from_folder(folder)  # discovery itself does not fail: other patients stay usable
    with pytest.raises(NeuroMapError) as err:
        load_case(case)
    message = str(err.value)
    for name in (f"{PREFIX}_5.tif", f"{PREFIX}_12_mask.tif", "[7]", "screenshot.tif", "Fix:"):
        assert name in message
    assert "._" not in message

    (folder / "screenshot.tif").unlink()
    (folder / f"{PREFIX}_12_mask.tif").unlink()
    (folder / f"{PREFIX}_7.tif").write_bytes((folder / f"{PREFIX}_6.tif").read_bytes())
    case = LGG.case_from_folder(folder)
    with pytest.raises(NeuroMapError, match=f"{PREFIX}_5.tif"):
        load_case(case)
    assert load_case(case, with_seg=False).image.shape == (3, ROWS, COLS, 11)  # inference needs no masks


def test_mask_values_must_be_binary(tmp_path: Path) -> None:
    folder, _, masks = make_patient(tmp_path, numbers=range(1, 4))
    tifffile.imwrite(folder / f"{PREFIX}_2_mask.tif", masks[2] // 255)  # 0/1 masks are unambiguous
    volume = load_case(LGG.case_from_folder(folder))
    np.testing.assert_array_equal(volume.seg[:, :, 1], masks[2] // 255)

    grey = masks[3].copy()
    grey[0, 0] = 128  # e.g. a resized or JPEG-compressed mask
    tifffile.imwrite(folder / f"{PREFIX}_3_mask.tif", grey)
    with pytest.raises(NeuroMapError, match=f"{PREFIX}_3_mask.tif: mask values \\[0, 128, 255\\]"):
        load_case(LGG.case_from_folder(folder))


def test_corrupt_and_malformed_files_are_reported_together(tmp_path: Path) -> None:
    folder, _, _ = make_patient(tmp_path, numbers=range(1, 5))
    path = folder / f"{PREFIX}_2.tif"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    tifffile.imwrite(folder / f"{PREFIX}_3.tif", np.zeros((ROWS, COLS), np.uint8))  # grey, not 3 channels
    tifffile.imwrite(folder / f"{PREFIX}_4_mask.tif", np.zeros((ROWS + 1, COLS), np.uint8))
    with pytest.raises(NeuroMapError) as err:
        validate_case(LGG.case_from_folder(folder))
    message = str(err.value)
    assert f"{PREFIX}_2.tif: cannot be read as TIFF" in message
    assert f"{PREFIX}_3.tif: shape (6, 5) uint8" in message
    assert f"{PREFIX}_4_mask.tif: mask shape (7, 5)" in message


def test_predicted_masks_round_trip_and_refuse_overwrite(tmp_path: Path) -> None:
    folder, _, masks = make_patient(tmp_path)
    case = LGG.case_from_folder(folder)
    volume = load_case(case)
    out = tmp_path / "pred"
    written = LGG.write_masks(volume.seg, case, out)
    assert [p.name for p in written] == [f"{PREFIX}_{n}_pred_mask.tif" for n in range(1, N + 1)]
    for n, path in zip(range(1, N + 1), written, strict=True):
        back = tifffile.imread(path)
        assert back.dtype == np.uint8 and back.shape == (ROWS, COLS)
        np.testing.assert_array_equal(back, masks[n])
    assert sorted(os.listdir(out)) == sorted(p.name for p in written)  # no temporary files left

    before = written[0].stat().st_mtime_ns
    with pytest.raises(NeuroMapError, match="already exist.*--overwrite"):
        LGG.write_masks(np.zeros_like(volume.seg), case, out)
    assert written[0].stat().st_mtime_ns == before
    LGG.write_masks(np.zeros_like(volume.seg), case, out, overwrite=True)
    assert not tifffile.imread(written[0]).any()

    with pytest.raises(NeuroMapError, match="input folder"):
        LGG.write_masks(volume.seg, case, folder / "." / "")
    assert not list(folder.glob("*_pred_mask.tif"))
    with pytest.raises(ValueError, match="does not match"):
        LGG.write_masks(volume.seg[:, :, :-1], case, tmp_path / "short")


def test_discovery_skips_top_level_csv_and_readme(tmp_path: Path) -> None:
    make_patient(tmp_path, numbers=range(1, 3))
    other = tmp_path / "TCGA_YY_0002_20010101"
    other.mkdir()
    for n in (1, 2):
        tifffile.imwrite(other / f"{other.name}_{n}.tif", np.ones((ROWS, COLS, 3), np.uint8), photometric="rgb")
    (tmp_path / "data.csv").write_text("Patient,death01\nTCGA_XX_0001,0\n")
    (tmp_path / "README.md").write_text("# LGG Segmentation Dataset\n")
    cases = discover_cases(tmp_path)
    assert [(c.case_id, c.layout.name, c.seg is not None) for c in cases] == [
        (PREFIX, "lgg", True), (other.name, "lgg", False),
    ]


@pytest.mark.real
@pytest.mark.skipif(not REAL.is_dir(), reason=f"real LGG data not found at {REAL}")
def test_real_patients_load(tmp_path: Path) -> None:
    """Every shared patient loads with the right shape and slice order (speed: benchmarks/lgg_load.py)."""
    cases = discover_cases(REAL)
    patients = [p for p in REAL.iterdir() if p.is_dir()]  # the shared folder has grown (14, now 20 patients)
    assert len(cases) == len(patients) >= 14 and all(c.layout is LGG for c in cases)
    total = 0
    for case in cases:
        numbers = [n for n, _, _ in case.slices]
        assert numbers == list(range(1, len(numbers) + 1))
        volume = load_case(case)
        assert volume.image.shape == (3, 256, 256, len(numbers))
        assert volume.seg.shape == (256, 256, len(numbers)) and set(np.unique(volume.seg)) <= {0, 1}
        assert volume.seg.any() and volume.image.max() > 0
        total += len(numbers)
    assert total == sum(1 for p in patients for f in p.glob("*.tif") if not f.stem.endswith("_mask"))

    # The original download stores the same slices uncompressed: re-save one patient that way, same volume.
    case = cases[0]
    copy = tmp_path / case.case_id
    copy.mkdir()
    for _, image, mask in case.slices:
        for path in (image, mask):
            tifffile.imwrite(copy / path.name, tifffile.imread(path), compression=None)
    original, uncompressed = load_case(case), load_case(LGG.case_from_folder(copy))
    np.testing.assert_array_equal(original.image, uncompressed.image)
    np.testing.assert_array_equal(original.seg, uncompressed.seg)
