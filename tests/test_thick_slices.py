"""Thick-slice augmentation (`neuromap.training.thick_slices`): sequences through-plane as if acquired in thick
slices and resampled to 1 mm; wired into 2.5D training samples by the config (a taller slab, its centre kept)."""

import numpy as np
import pytest
from pydantic import ValidationError

from neuromap.config import TrainConfig
from neuromap.training.data import PatchDataset, PreparedCase
from neuromap.training.thick_slices import RandThickSlicesd, thick_slices


def test_one_mm_slices_and_flat_signal_are_unchanged():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(2, 4, 4, 20)).astype(np.float32)
    assert np.allclose(thick_slices(volume, 1.0, 0.0), volume, atol=1e-6)
    flat = np.full((1, 3, 3, 20), 7.0, np.float32)
    assert np.allclose(thick_slices(flat, 5.0, 2.3), 7.0, atol=1e-5)


def test_a_thin_bright_slice_is_spread_over_the_thickness_and_dimmed():
    """Partial volume: one bright 1 mm slice inside a 5 mm slice is averaged with its neighbours, so it is spread
    over about the slice thickness (more with the linear resampling) at a fifth or less of its brightness, and the
    signal is conserved to within the interpolation's error."""
    volume = np.zeros((1, 1, 1, 40), np.float32)
    volume[..., 20] = 1.0
    out = thick_slices(volume, 5.0, 0.0)[0, 0, 0]
    assert out.max() <= 0.2 + 1e-6 and out[20] > 0
    assert 5 <= int((out > 0.01).sum()) <= 10
    assert abs(out.sum() - 1.0) < 0.25
    assert np.all(out[:14] == 0) and np.all(out[27:] == 0)  # nothing far from it


def test_edges_become_ramps_as_wide_as_the_slices():
    volume = np.zeros((1, 1, 1, 40), np.float32)
    volume[..., 20:] = 1.0
    for thickness in (3.0, 6.0):
        out = thick_slices(volume, thickness, 1.0)[0, 0, 0]
        ramp = int(((out > 0.02) & (out < 0.98)).sum())
        assert thickness - 1 <= ramp <= 2 * thickness + 1, (thickness, ramp)
        assert np.all(np.diff(out) >= -1e-6)  # still monotone


def test_transform_draws_thickness_and_phase_and_leaves_labels():
    volume = np.random.default_rng(1).normal(size=(2, 4, 4, 30)).astype(np.float32)
    label = (volume[:1] > 0).astype(np.int64)
    transform = RandThickSlicesd("image", (2.0, 6.0), prob=1.0)
    outputs = []
    for seed in range(5):
        transform.set_random_state(seed)
        out = transform({"image": volume, "label": label})
        assert out["label"] is label and out["image"].shape == volume.shape
        assert 2.0 <= transform.chosen[0] <= 6.0 and 0 <= transform.chosen[1] <= transform.chosen[0]
        outputs.append(out["image"])
    assert not np.allclose(outputs[0], outputs[1])
    off = RandThickSlicesd("image", (2.0, 6.0), prob=0.0)
    assert off({"image": volume})["image"] is volume


def _case(depth: int = 40) -> PreparedCase:
    rng = np.random.default_rng(2)
    image = rng.normal(size=(2, 48, 48, depth)).astype(np.float32)
    seg = np.zeros((48, 48, depth), np.uint8)
    seg[20:30, 20:30, 15:25] = 1
    return PreparedCase.indexed("c", image, seg, (1.0, 1.0, 1.0))


def test_25d_samples_keep_their_shape_and_the_centre_slice_label():
    """With thick_slices the dataset crops a slab of 2 * (k + ceil(max)) + 1 slices and keeps the centre 2k + 1:
    the sample has the same layout as without, and its label is the truth of its centre slice, untouched."""
    base = {"name": "t", "preprocess": {"modalities": ["t1ce", "flair"], "mode": "2d", "slice_size": None,
                                        "context_slices": 1},
            "model": {"name": "unet2d", "spatial_dims": 2, "out": "regions"}, "patch_size": [32, 32],
            "batch_size": 2, "iterations_per_epoch": 4, "tumour_sampling": 1.0,
            "augment": {"flip": False, "rotate_deg": 0, "scale": [1, 1], "gamma": None, "intensity_shift": 0,
                        "intensity_scale": 0, "prob": 1.0}}
    plain = PatchDataset([_case()], TrainConfig.model_validate(base))
    cfg = TrainConfig.model_validate({**base, "augment": {**base["augment"], "thick_slices": [3, 5]}})
    thick = PatchDataset([_case()], cfg)
    assert thick.extra == 5 and plain.extra == 0
    for index in range(len(thick)):
        image, label = thick[index]
        reference_image, reference_label = plain[index]
        assert image.shape == reference_image.shape == (6, 32, 32)
        # the same crop centre (same random draws), so the same slice's truth; only the image was blurred
        assert label.shape == (1, 32, 32) and label.any() and np.array_equal(label, reference_label)
        assert not np.allclose(image, reference_image)


def test_config_refuses_impossible_thicknesses():
    for bad in ([0.5, 3], [4, 2], [2, 20]):
        with pytest.raises(ValidationError, match="thick_slices"):
            TrainConfig.model_validate({"name": "x", "augment": {"thick_slices": bad}})


def test_thick_slices_prob_overrides_the_shared_probability_for_that_transform_only():
    cfg = {"name": "x", "model": {"name": "unet2d", "spatial_dims": 2},
           "preprocess": {"mode": "2d", "slice_size": None, "context_slices": 1}, "patch_size": [32, 32]}
    augment = {"prob": 0.15, "thick_slices": [3, 6], "thick_slices_prob": 0.5}
    own = TrainConfig.model_validate({**cfg, "augment": augment})
    assert PatchDataset([_case()], own).thick.prob == 0.5
    shared = TrainConfig.model_validate({**cfg, "augment": {"prob": 0.15, "thick_slices": [3, 6]}})
    assert PatchDataset([_case()], shared).thick.prob == 0.15
    with pytest.raises(ValidationError, match="thick_slices_prob"):
        TrainConfig.model_validate({"name": "x", "augment": {"thick_slices_prob": 1.5}})
