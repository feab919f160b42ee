import numpy as np
import pytest

from neuromap.errors import NeuroMapError
from neuromap.labels import from_internal, guess_convention, region_masks, to_internal


@pytest.mark.parametrize(
    ("convention", "values", "expected"),
    [
        ("brats", [0, 1, 2, 4], [0, 1, 2, 3]),
        ("brats2012", [0, 1, 2, 3, 4], [0, 1, 2, 1, 3]),
        ("brats2023", [0, 1, 2, 3], [0, 1, 2, 3]),
        ("msd", [0, 1, 2, 3], [0, 2, 1, 3]),
    ],
)
def test_conventions_map_to_internal(convention, values, expected):
    assert to_internal(np.array(values), convention).tolist() == expected


@pytest.mark.parametrize("convention", ["brats", "brats2023", "internal", "msd"])
def test_writable_conventions_round_trip(convention):
    internal = np.array([0, 1, 2, 3, 3, 0], np.uint8)
    assert np.array_equal(to_internal(from_internal(internal, convention), convention), internal)


def test_brats_output_uses_4_for_enhancing():
    assert from_internal(np.array([0, 1, 2, 3]), "brats").tolist() == [0, 1, 2, 4]


def test_float_and_int16_labels_accepted_when_integral():
    assert to_internal(np.array([0.0, 1.0, 4.0], np.float32), "brats").tolist() == [0, 1, 3]
    assert to_internal(np.array([0, 2, 4], np.int16), "brats").tolist() == [0, 2, 3]


def test_non_integral_and_unknown_labels_rejected():
    with pytest.raises(NeuroMapError, match="non-integral"):
        to_internal(np.array([0.0, 0.5]), "brats", source="x_seg.nii.gz")
    with pytest.raises(NeuroMapError, match=r"labels \[7\]"):
        to_internal(np.array([0, 7]), "brats")
    with pytest.raises(NeuroMapError, match="NaN"):
        to_internal(np.array([0.0, np.nan]), "brats")


def test_guess_convention():
    assert guess_convention([0, 1, 2, 4]) == "brats"
    assert guess_convention([0, 1, 2, 3, 4]) == "brats2012"
    assert guess_convention([0, 1, 2, 3]) == "brats2023"


def test_regions_nest():
    masks = region_masks(np.array([0, 1, 2, 3]))
    assert masks["WT"].tolist() == [False, True, True, True]
    assert masks["TC"].tolist() == [False, True, False, True]
    assert masks["ET"].tolist() == [False, False, False, True]
