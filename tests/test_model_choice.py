"""`neuromap segment` without --model picks the shipped model that matches the sequences a case has."""

import json

import pytest

from neuromap.checkpoint import ModelSpec, save_checkpoint
from neuromap.config import ModelConfig, PreprocessConfig
from neuromap.errors import NeuroMapError
from neuromap.segmenter import segment
from neuromap.synthetic import write_synthetic_case
from neuromap.zoo import resolve_model_paths


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    index = {}
    val = {"full": {"WT": 0.9, "TC": 0.8, "ET": 0.7}, "reduced": {"WT": 0.85, "TC": 0.75, "ET": 0.7}}
    for name, mods in {"full": ["t1", "t1ce", "t2", "flair"], "reduced": ["t1ce", "flair"]}.items():
        spec = ModelSpec(ModelConfig(name="unet2d", spatial_dims=2, options={"features": [4, 4, 8, 8, 16, 4]}),
                         PreprocessConfig(mode="2d", slice_size=(32, 32), modalities=mods), "brats", (32, 32), 4)
        save_checkpoint(folder / f"{name}.pt", spec, spec.build().state_dict())
        index[name] = {"file": f"{name}.pt", "modalities": mods, "task": "brats", "val_dice": val[name]}
    (folder / "models.json").write_text(json.dumps(index))
    monkeypatch.setattr("neuromap.zoo.WEIGHTS_DIR", folder)
    return folder


def test_full_case_gets_the_model_with_the_best_measured_dice(weights_dir):
    assert resolve_model_paths(None, ["t1", "t1ce", "t2", "flair"]) == [weights_dir / "full.pt"]
    assert resolve_model_paths("reduced", ["t1", "t1ce", "t2", "flair"]) == [weights_dir / "reduced.pt"]
    index = json.loads((weights_dir / "models.json").read_text())
    index["reduced"]["val_dice"] = {"WT": 0.95, "TC": 0.9, "ET": 0.8}  # fewer sequences, measured better
    (weights_dir / "models.json").write_text(json.dumps(index))
    assert resolve_model_paths(None, ["t1", "t1ce", "t2", "flair"]) == [weights_dir / "reduced.pt"]


def test_more_sequences_break_ties_of_measured_dice(weights_dir):
    index = json.loads((weights_dir / "models.json").read_text())
    index["reduced"]["val_dice"] = index["full"]["val_dice"]
    (weights_dir / "models.json").write_text(json.dumps(index))
    assert resolve_model_paths(None, ["t1", "t1ce", "t2", "flair"]) == [weights_dir / "full.pt"]


def test_case_without_t1_and_t2_gets_the_reduced_model(tmp_path, weights_dir):
    case = write_synthetic_case(tmp_path / "c", "c", shape=(32, 32, 12))
    for mod in ("t1", "t2"):
        (case / f"c_{mod}.nii.gz").unlink()
    (result,) = segment(case)
    assert result.report["model"]["modalities"] == ["t1ce", "flair"]


def test_no_matching_model_is_a_clear_error(weights_dir):
    with pytest.raises(NeuroMapError, match="no shipped model works with the sequences found"):
        resolve_model_paths(None, ["t2"])


def test_validate_names_the_models_that_can_run(tmp_path, weights_dir, capsys):
    """Defect 2: a case no shipped model can segment fails `validate` (exit 2) with the models' needs; the
    models that can run are listed; --model checks the named model instead."""
    from neuromap.cli import main

    case = write_synthetic_case(tmp_path / "c", "c", shape=(24, 24, 8))
    assert main(["validate", str(case)]) == 0
    assert "shipped models that can segment it: full, reduced" in capsys.readouterr().out
    (case / "c_t1ce.nii.gz").unlink()  # T1, T2, FLAIR: every shipped model needs T1ce
    assert main(["validate", str(case)]) == 2
    err = capsys.readouterr().err
    assert "FAIL c" in err and "no shipped model works with the sequences found (t1, t2, flair)" in err
    assert "full: t1, t1ce, t2, flair; reduced: t1ce, flair" in err
    spec = ModelSpec(ModelConfig(name="unet2d", spatial_dims=2, options={"features": [4, 4, 8, 8, 16, 4]}),
                     PreprocessConfig(mode="2d", slice_size=(32, 32), modalities=["t1", "flair"]), "brats", (32, 32), 4)
    t1_flair = save_checkpoint(tmp_path / "t1_flair.pt", spec, spec.build().state_dict())
    assert main(["validate", str(case), "--model", str(t1_flair)]) == 0
    assert f"model {t1_flair} can segment it" in capsys.readouterr().out
    assert main(["validate", str(case), "--model", "reduced"]) == 2
    assert "model reduced needs t1ce, flair; the case lacks t1ce" in capsys.readouterr().err
