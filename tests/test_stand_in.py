"""Stand-in augmentation (`neuromap.training.stand_in`): some sequences replaced by an exact copy of another, as
kaggle_3m does for a sequence the scanner did not acquire; wired into the training samples by the config."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import LGG, needs_real_data

from neuromap.config import TrainConfig, load_yaml
from neuromap.errors import NeuroMapError
from neuromap.training.stand_in import RandStandInd

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

CHANNELS = ["t1"] * 3 + ["flair"] * 3 + ["t1ce"] * 3  # 2.5D: each sequence's three slices, consecutive


def _replaced(before: np.ndarray, after: np.ndarray) -> frozenset[str]:
    """The sequences whose slices became the FLAIR slices; anything else must be untouched."""
    assert np.array_equal(after[3:6], before[3:6]), "the source changed"
    out = set()
    for name, start in (("t1", 0), ("t1ce", 6)):
        if np.array_equal(after[start:start + 3], before[3:6]):
            out.add(name)
        else:
            assert np.array_equal(after[start:start + 3], before[start:start + 3]), f"{name} half changed"
    return frozenset(out)


def test_every_non_empty_set_of_other_sequences_is_replaced_slice_by_slice():
    image = np.random.default_rng(0).normal(size=(9, 8, 8)).astype(np.float32)
    transform = RandStandInd("image", CHANNELS, "flair", prob=1.0)
    seen = []
    for seed in range(60):
        transform.set_random_state(seed)
        seen.append(_replaced(image, transform({"image": image})["image"]))
    assert set(seen) == {frozenset({"t1"}), frozenset({"t1ce"}), frozenset({"t1", "t1ce"})}
    assert np.array_equal(image, np.random.default_rng(0).normal(size=(9, 8, 8)).astype(np.float32))  # input kept


def test_probability_is_honoured():
    image = np.random.default_rng(1).normal(size=(9, 4, 4)).astype(np.float32)
    transform = RandStandInd("image", CHANNELS, "flair", prob=0.2)
    transform.set_random_state(5)
    changed = sum(bool(_replaced(image, transform({"image": image})["image"])) for _ in range(500))
    assert 70 <= changed <= 130  # 100 expected; binomial sd ~9


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="t2"):
        RandStandInd("image", CHANNELS, "t2", prob=0.5)


def test_config_refuses_a_source_the_model_does_not_read(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "preprocess": {"modalities": ["t1", "flair", "t1ce"]},
                                    "augment": {"stand_in": 0.1, "stand_in_source": "t2"}}))
    with pytest.raises(NeuroMapError, match="stand_in_source"):
        load_yaml(path, TrainConfig)


@needs_real_data
def test_lgg_training_samples_carry_flair_copies(tmp_path):
    """A real LGG patient through the training sample path of the LGG recipe: with stand_in 1, every sample has
    its pre- or post-contrast channel (or both) equal to its FLAIR channel, after all the other augmentation."""
    from neuromap.training.data import PatchDataset, find_training_cases, prepare_case

    root = tmp_path / "lgg"
    root.mkdir()
    (root / "TCGA_CS_4941_19960909").symlink_to(LGG / "TCGA_CS_4941_19960909")
    path = tmp_path / "lgg.yaml"
    path.write_text(yaml.safe_dump({"base": str(CONFIGS / "lgg_resunet_cv.yaml"), "name": "stand_in",
                                    "data_roots": [str(root)], "augment": {"stand_in": 1.0}}))
    cfg = load_yaml(path, TrainConfig)
    dataset = PatchDataset([prepare_case(case, cfg) for case in find_training_cases([str(root)])], cfg)
    for index in range(6):
        image, _ = dataset[index]  # channels: pre-contrast, FLAIR, post-contrast
        assert image[1].abs().sum() > 0
        assert image[0].equal(image[1]) or image[2].equal(image[1])
