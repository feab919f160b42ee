"""Batch mode: cases read and prepared in background threads while the model runs (``--workers``), the same
labels as one case at a time, errors at the case that has them, and the workers range."""

from __future__ import annotations

import threading
from pathlib import Path

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


def _ids(folder, pattern: str) -> set[str]:
    return {p.name.split("_")[0] for p in folder.glob(pattern)}


def test_part_selection_is_nnunets():
    """Sorted case ids, every N-th from K: the same on every task, each case in exactly one part."""
    from neuromap.cohort import Part
    from neuromap.io.case import Case

    cases = [Case(case_id=i, root=None, images={}, layout=None, naming="plain") for i in ("c", "a", "e", "b", "d")]
    parts = [[c.case_id for c in Part(2, k).select(cases)] for k in range(2)]
    assert parts == [["a", "c", "e"], ["b", "d"]]
    assert [c.case_id for c in Part(1, 0).select(cases)] == ["a", "b", "c", "d", "e"]
    assert Part(7, 6).select(cases) == []  # more parts than cases: some are empty


def test_parts_cover_a_cohort_once_and_write_summaries(tmp_path, tiny_checkpoint):
    import json

    cohort, out = _synthetic_folder(tmp_path / "cohort", 5), tmp_path / "out"
    for k in range(2):
        assert main(["segment", str(cohort), "-o", str(out), "--model", str(tiny_checkpoint), "--num-parts", "2",
                     "--part-id", str(k), "--quiet"]) == 0
        summary = json.loads((out / f"summary_part_{k}_of_2.json").read_text())
        expected = [["S0", "S2", "S4"], ["S1", "S3"]][k]
        assert summary["cases"] == summary["segmented"] == expected and summary["skipped_complete"] == []
        assert summary["n_cases_in_input"] == 5 and summary["engine"]
        assert set(summary["results"]) == set(expected)
        assert all(Path(f).is_file() for r in summary["results"].values() for f in r["files"].values())
    assert _ids(out, "*_seg.nii.gz") == {f"S{i}" for i in range(5)}


def test_continue_skips_complete_cases_and_redoes_interrupted_ones(tmp_path, tiny_checkpoint, capsys):
    import json

    cohort, out = _synthetic_folder(tmp_path / "cohort", 3), tmp_path / "out"
    command = ["segment", str(cohort), "-o", str(out), "--model", str(tiny_checkpoint), "--num-parts", "1",
               "--part-id", "0", "--quiet"]
    assert main(command) == 0
    (out / "S1_overlay.png").unlink()  # as if the run had stopped while renaming S1's outputs
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("S[02]_*")}
    assert main(command) == 2 and "output exists" in capsys.readouterr().err  # outputs are kept unless asked
    assert main([*command, "--continue"]) == 0
    printed = capsys.readouterr().out
    assert "S0: outputs complete, skipped (--continue)" in printed and "S1: WT" in printed
    assert (out / "S1_overlay.png").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("S[02]_*")} == kept  # complete cases untouched
    summary = json.loads((out / "summary_part_0_of_1.json").read_text())
    assert summary["segmented"] == ["S1"] and summary["skipped_complete"] == ["S0", "S2"]
    assert summary["cases"] == ["S0", "S1", "S2"]


@pytest.mark.parametrize("options, message", [
    (["--num-parts", "2", "--part-id", "2"], "outside 0..1"),
    (["--part-id", "0"], "go together"),
    (["--num-parts", "0", "--part-id", "0"], "at least 1 part"),
])
def test_part_options_are_checked(tmp_path, tiny_checkpoint, synthetic_case, options, message, capsys):
    code = main(["segment", str(synthetic_case), "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint),
                 *options])
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "out").exists()
