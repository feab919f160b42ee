"""Preprocessing: orientation, crop, z-score, N4, resampling, 2D mode, and the exact inverse."""

import nibabel as nib
import numpy as np
import pytest
from conftest import needs_real_data, real_cases

from neuromap.config import PreprocessConfig
from neuromap.errors import NeuroMapError
from neuromap.io import discover_cases, load_case
from neuromap.preprocess import prepare
from neuromap.synthetic import write_synthetic_case

# File orientations to exercise: LPS (BraTS), RAS, and a permuted oblique-free one (axes swapped + flipped).
AFFINES = {
    "LPS": np.diag([-1.0, -1.0, 1.0, 1.0]),
    "RAS": np.diag([1.0, 1.0, 1.0, 1.0]),
    "PSL": np.array([[0, 0, -1.0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]]),
    "aniso": np.diag([1.2, -0.9, 3.0, 1.0]),
}


def _volume(tmp_path, name):
    folder = write_synthetic_case(tmp_path / name, case_id=name, shape=(40, 44, 24), affine=AFFINES[name])
    return load_case(discover_cases(folder)[0])


@pytest.mark.parametrize("name", list(AFFINES))
def test_labels_forward_and_back_identical(tmp_path, name):
    volume = _volume(tmp_path, name)
    prepared = prepare(volume, PreprocessConfig())
    assert np.array_equal(prepared.seg, prepared.inverse.to_prepared(volume.seg))
    back = prepared.inverse.to_original(prepared.seg)
    assert back.shape == volume.seg.shape and np.array_equal(back, volume.seg)


@pytest.mark.parametrize("name", list(AFFINES))
def test_reoriented_to_ras(tmp_path, name):
    volume = _volume(tmp_path, name)
    inv = prepare(volume, PreprocessConfig(crop_margin=1000)).inverse  # no crop: the whole RAS volume
    ras_img = nib.as_closest_canonical(nib.Nifti1Image(volume.seg, volume.affine))
    assert np.array_equal(inv.ras(volume.seg), np.asarray(ras_img.dataobj))


def test_crop_zscore_and_mask(tmp_path):
    volume = _volume(tmp_path, "LPS")
    prepared = prepare(volume, PreprocessConfig(crop_margin=2))
    mask = prepared.image[0] != 0
    for channel in prepared.image:
        assert abs(channel[mask].mean()) < 1e-4 and abs(channel[mask].std() - 1) < 1e-3
    brain = np.argwhere(prepared.inverse.ras(volume.image[0]) != 0)
    bounds = zip(brain.min(0), brain.max(0), prepared.inverse.ras_shape, strict=True)
    expected = tuple(min(hi + 1 + 2, n) - max(lo - 2, 0) for lo, hi, n in bounds)
    assert prepared.image.shape[1:] == expected


def test_given_brain_mask_is_used(tmp_path):
    folder = write_synthetic_case(tmp_path / "m", case_id="m", shape=(32, 32, 16))
    mask = np.zeros((32, 32, 16), np.uint8)
    mask[8:20, 10:22, 4:12] = 1
    nib.save(nib.Nifti1Image(mask, AFFINES["LPS"]), str(folder / "m_brainmask.nii.gz"))
    prepared = prepare(load_case(discover_cases(folder)[0]), PreprocessConfig(crop_margin=0))
    assert prepared.image.shape[1:] == (12, 12, 8)


def test_resampling_and_2d_mode_invert_to_input_grid(tmp_path):
    volume = _volume(tmp_path, "aniso")
    for cfg in (PreprocessConfig(spacing=(2.0, 2.0, 2.0)), PreprocessConfig(mode="2d", slice_size=(32, 32))):
        prepared = prepare(volume, cfg)
        back = prepared.inverse.to_original(prepared.seg)
        assert back.shape == volume.seg.shape
        # resampling loses detail, but a label map in prepared space survives the trip back and forth exactly
        assert np.array_equal(prepared.inverse.to_prepared(back), prepared.seg)
        overlap = ((back > 0) & (volume.seg > 0)).sum() * 2 / ((back > 0).sum() + (volume.seg > 0).sum())
        assert overlap > 0.9
    prepared = prepare(volume, PreprocessConfig(mode="2d", slice_size=(32, 32)))
    assert prepared.image.shape[1:3] == (32, 32)


def test_slice_range_and_probabilities(tmp_path):
    volume = _volume(tmp_path, "RAS")
    prepared = prepare(volume, PreprocessConfig(mode="2d", slice_size=(32, 32), slice_range=(5, 20)))
    assert prepared.image.shape[-1] == 15
    probs = np.ones((3,) + prepared.seg.shape, np.float32)
    back = prepared.inverse.to_original(probs, linear=True)
    assert back.shape == (3, 40, 44, 24)
    assert back[:, :, :, :5].max() == 0 and back[:, :, :, 5:20].max() == 1
    with pytest.raises(NeuroMapError, match="slice_range"):
        prepare(volume, PreprocessConfig(mode="2d", slice_range=(10, 99)))


def test_n4_reduces_a_bias_field(tmp_path):
    volume = _volume(tmp_path, "RAS")
    ramp = np.linspace(0.6, 1.4, volume.image.shape[1])[:, None, None]
    volume.image = (volume.image * ramp).astype(np.float32)
    plain = prepare(volume, PreprocessConfig(normalize=False))
    corrected = prepare(volume, PreprocessConfig(normalize=False, n4=True))
    brain = (plain.seg == 0) & (plain.image[0] > 0)  # healthy tissue: one intensity class before the bias

    def spread(img):
        values = img[0][brain]
        return values.std() / values.mean()

    assert spread(corrected.image) < spread(plain.image)


@needs_real_data
@pytest.mark.parametrize("folder", real_cases(), ids=lambda p: p.name)
def test_real_cases_round_trip(folder):
    volume = load_case(discover_cases(folder)[0])
    bright = (volume.image[0] > np.percentile(volume.image[0], 95)).astype(np.uint8)
    labels = volume.seg if volume.seg is not None else bright
    prepared = prepare(volume, PreprocessConfig())
    inverse = prepared.inverse
    assert np.array_equal(inverse.to_original(inverse.to_prepared(labels)), labels)
