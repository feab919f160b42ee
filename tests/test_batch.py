"""Batch mode: cases read and prepared in background threads while the model runs (``--workers``), the same
labels as one case at a time, errors at the case that has them, and the workers range."""

from __future__ import annotations

import threading

import nibabel as nib
import numpy as np
import pytest
from conftest import cropped_real_case, needs_real_data

import neuromap.segmenter as segmenter_module
from neuromap.cli import main
from neuromap.config import InferenceConfig
from neuromap.io import discover_cases
from neuromap.segmenter import Segmenter
from neuromap.synthetic import write_synthetic_case

REAL_CASES = ("Brats18_2013_23_1", "Brats18_CBICA_AOZ_1", "Brats18_CBICA_AMH_1")


def _synthetic_folder(root, n: int):
    for i in range(n):
        write_synthetic_case(root / f"S{i}", case_id=f"S{i}", shape=(48, 48, 32), seed=i)
    return root


@needs_real_data
def test_folder_of_real_cases_gives_the_labels_of_one_by_one(tmp_path):
    """The shipped default model on three real cases (cropped to 24 slices through the tumour): the batch with
    two reader threads writes exactly the labels that segmenting each case alone gives."""
    cohort = tmp_path / "cohort"
    for name in REAL_CASES:
        cropped_real_case(cohort, name)
    assert main(["segment", str(cohort), "-o", str(tmp_path / "out"), "--workers", "2", "--quiet"]) == 0
    alone = Segmenter(cfg=InferenceConfig(workers=0))
    for case in discover_cases(cohort):
        expected = np.asarray(alone.segment_case(case).labels.dataobj)
        written = np.asarray(nib.load(tmp_path / "out" / f"{case.case_id}_seg.nii.gz").dataobj)
        assert expected.any() and np.array_equal(written, expected), case.case_id


def test_the_next_case_is_read_while_the_model_runs(tmp_path, tiny_checkpoint, monkeypatch):
    """Ordering, not timing: the model stage of the first case waits until the reader has begun the second,
    which can only happen when reading overlaps the model (without it this would wait out the timeout)."""
    cases = discover_cases(_synthetic_folder(tmp_path / "cohort", 3))
    second_read = threading.Event()
    reader_threads = set()
    read, predict = Segmenter._read, segmenter_module.predict_probs

    def recording_read(self, case, *args):
        if case.case_id == "S1":
            second_read.set()
        reader_threads.add(threading.current_thread().name)
        return read(self, case, *args)

    def waiting_predict(*args, **kwargs):
        second_read.wait(timeout=120)
        return predict(*args, **kwargs)

    monkeypatch.setattr(Segmenter, "_read", recording_read)
    monkeypatch.setattr(segmenter_module, "predict_probs", waiting_predict)
    results = Segmenter(tiny_checkpoint, InferenceConfig(workers=1)).segment(cases, tmp_path / "out")
    assert second_read.is_set() and [r.case_id for r in results] == ["S0", "S1", "S2"]
    assert all(name.startswith("neuromap-reader") for name in reader_threads)


def test_a_broken_case_stops_the_batch_at_its_turn(tmp_path, tiny_checkpoint, capsys):
    """Cases before it are written, the error names it, nothing after it is written (even if already read)."""
    cohort = _synthetic_folder(tmp_path / "cohort", 3)
    next((cohort / "S1").glob("*_t2.nii.gz")).unlink()
    code = main(["segment", str(cohort), "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint),
                 "--workers", "2", "--quiet"])
    assert code == 2 and "missing modality ['t2']" in capsys.readouterr().err
    assert (tmp_path / "out" / "S0_seg.nii.gz").is_file()
    assert not list((tmp_path / "out").glob("S1_*")) and not list((tmp_path / "out").glob("S2_*"))


@pytest.mark.parametrize("workers", ["-1", "9"])
def test_workers_outside_the_range_is_a_user_error(tmp_path, tiny_checkpoint, synthetic_case, workers, capsys):
    code = main(["segment", str(synthetic_case), "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint),
                 "--workers", workers])
    assert code == 2 and "workers" in capsys.readouterr().err and not (tmp_path / "out").exists()
