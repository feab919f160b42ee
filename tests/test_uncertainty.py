"""Uncertainty and probability maps (`neuromap.uncertainty`): the input's grid, their meaning, where doubt lies."""

import nibabel as nib
import numpy as np
import pytest
from conftest import LGG, UNSEEN, needs_real_data
from scipy import ndimage

from neuromap.cli import main
from neuromap.uncertainty import ENCODING, binary_entropy, max_binary_entropy, normalised_entropy


def test_entropies_are_zero_when_certain_and_one_at_chance():
    assert binary_entropy(np.array([0.0, 1.0, 0.5])) == pytest.approx([0.0, 0.0, 1.0], abs=1e-5)
    assert normalised_entropy(np.full((4, 2), 0.25))[0] == pytest.approx(1.0)
    assert normalised_entropy(np.array([[1.0], [0.0], [0.0]]))[0] == pytest.approx(0.0, abs=1e-5)


def test_largest_region_entropy_is_the_largest_of_the_channels_entropies():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 40, 30, 20)).astype(np.float32)
    probs[:, :10] = rng.choice([0.0, 1.0, 1e-9, 1 - 1e-9, 0.5], size=probs[:, :10].shape)  # the ends and the middle
    expected = binary_entropy(probs).max(axis=0)
    np.testing.assert_allclose(max_binary_entropy(probs), expected, atol=1e-5)
    assert np.array_equal(np.round(max_binary_entropy(probs) * 255), np.round(expected * 255))  # the uint8 map


@needs_real_data
def test_maps_lie_on_the_input_grid(unseen_segmented):
    reference = nib.load(next(UNSEEN.glob("*-t2f.nii.gz")))
    uncertainty = nib.load(unseen_segmented.files["uncertainty.nii.gz"])
    probabilities = nib.load(unseen_segmented.files["probabilities.nii.gz"])
    assert uncertainty.shape == reference.shape
    assert probabilities.shape == (*reference.shape, 3)
    for image in (uncertainty, probabilities):
        assert np.array_equal(image.affine, reference.affine)
        assert np.array_equal(image.header.get_sform(), reference.header.get_sform())
        assert image.get_data_dtype() == np.uint8
    assert b"entropy" in uncertainty.header["descrip"].tobytes()
    assert b"P(WT,TC,ET)" in probabilities.header["descrip"].tobytes()
    report = unseen_segmented.report
    assert "binary entropy" in report["uncertainty_map"]["measure"]
    assert report["probability_maps"] == {"channels": ["WT", "TC", "ET"], "axis": "last (4D image)",
                                          "encoding": ENCODING}
    u = np.asarray(uncertainty.dataobj)
    brain = np.any([np.asarray(nib.load(f).dataobj) != 0 for f in UNSEEN.glob("*.nii.gz")], axis=0)
    assert 0 < np.count_nonzero(u > 127) < 0.05 * brain.sum()  # doubt somewhere, not everywhere
    box = tuple(slice(max(i.min() - 4, 0), i.max() + 5) for i in np.nonzero(brain))  # the crop, 4-voxel margin
    outside = np.ones(u.shape, bool)
    outside[box] = False
    assert outside.any() and not u[outside].any()  # the model never ran there: certain background


@needs_real_data
def test_probabilities_agree_with_the_labels(unseen_segmented):
    """A voxel labelled as a region had that region's probability above 0.5 (stored >= 128); the reverse holds
    except where postprocessing removed small pieces."""
    seg = np.asarray(unseen_segmented.labels.dataobj)
    probs = np.asarray(nib.load(unseen_segmented.files["probabilities.nii.gz"]).dataobj)
    for channel, members in enumerate(([1, 2, 4], [1, 4], [4])):
        labelled, likely = np.isin(seg, members), probs[..., channel] >= 128
        assert labelled.any()
        assert not (labelled & ~likely).any()
        assert (likely & ~labelled).sum() < 0.01 * labelled.sum()


@needs_real_data
def test_uncertainty_concentrates_at_the_tumour_border(unseen_segmented):
    """Most uncertain voxels lie within 2 voxels of a predicted region's border (WT, TC or ET), and the border band
    is far more uncertain than the rest of the brain."""
    seg = np.asarray(unseen_segmented.labels.dataobj)
    u = np.asarray(nib.load(unseen_segmented.files["uncertainty.nii.gz"]).dataobj) / 255
    brain = np.asarray(nib.load(next(UNSEEN.glob("*-t2f.nii.gz"))).dataobj) != 0
    band = np.zeros(seg.shape, bool)
    for members in ([1, 2, 4], [1, 4], [4]):
        region = np.isin(seg, members)
        band |= ndimage.binary_dilation(region, iterations=2) & ~ndimage.binary_erosion(region, iterations=2)
    uncertain = u > 0.5
    assert uncertain.sum() > 1000
    assert (uncertain & band).sum() / uncertain.sum() > 0.8
    assert u[band].mean() > 5 * u[brain & ~band].mean()


@needs_real_data
def test_maps_are_refused_for_slice_folders(tmp_path, capsys):
    patient = next(p for p in sorted(LGG.iterdir()) if p.is_dir())
    assert main(["segment", str(patient), "-o", str(tmp_path), "--uncertainty", "--quiet"]) == 2
    assert "--uncertainty and --probabilities are not available for lgg" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
