"""The web app under load and between users (issue 11): the process-wide job queue (`neuromap.app_jobs`) on its own,
then eight Streamlit sessions (AppTest, one thread each) uploading eight different real BraTS cases at once and
segmenting them with one worker: the queue positions each page showed, one case in the model at a time, first come
first served, every session's own correct result (its upload's grid, the labels and volumes `neuromap segment`
gives for that case), nothing of one session reachable from another's page, and every temp folder gone when the
sessions end (through Streamlit's own session-end hook). The cases are cut to 24 axial slices through the tumour
and the model is the tiny checkpoint, so the eight segmentations take seconds; `benchmarks/app_load.py` runs full
cases with the shipped model against a real server.

AppTest is not thread-safe (each run swaps Streamlit's global Runtime), so the threads take turns for each page
run (`PAGE_RUN`); the sessions, their jobs and the queue are concurrent, as on a server.
"""

from __future__ import annotations

import gzip
import json
import re
import stat
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import streamlit.testing.v1.app_test as app_test_module
from conftest import BRATS, cropped_real_case, needs_real_data
from streamlit.runtime.caching import clear_session_resource_cache
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest
from test_app import APP, button, downloads, tiny_checkpoint

import neuromap.zoo
from neuromap import app_jobs, cli
from neuromap.app_jobs import CANCELLED, DONE, FAILED, Cancelled, JobQueue
from neuromap.errors import NeuroMapError
from neuromap.segmenter import Segmenter

CASES = ("Brats18_2013_23_1", "Brats18_2013_3_1", "Brats18_CBICA_AMH_1", "Brats18_CBICA_AQQ_1",
         "Brats18_CBICA_ASV_1", "Brats18_TCIA01_378_1", "Brats18_TCIA02_606_1", "Brats18_TCIA10_628_1")
SEQUENCES = ("t1", "t1ce", "t2", "flair")
APPTEST_SESSION_ID = "test session id"  # every AppTest session has this id (streamlit.testing LocalScriptRunner)
PAGE_RUN = threading.Lock()  # AppTest runs one page at a time (see the module docstring)
WAITING = re.compile(r"Waiting, (\d+) ahead")


# ------------------------------------------------------------------------------------------------ the queue alone


def gated_work(gate: threading.Event, log: list, name: str, stages=("reading", "model")):
    def work(report_stage):
        log.append(("start", name))
        for stage in stages:
            report_stage(stage)
            assert gate.wait(30), "gate never opened"
        log.append(("end", name))
        return name
    return work


def test_queue_is_first_come_first_served_and_counts_who_is_ahead():
    queue, gate, log = JobQueue(1), threading.Event(), []
    jobs = [queue.submit(f"s{i}", gated_work(gate, log, f"s{i}")) for i in range(4)]
    deadline = time.monotonic() + 30
    while jobs[0].state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [queue.ahead(job) for job in jobs] == [None, 1, 2, 3]  # the running job counts as ahead
    assert queue.active("s2") is jobs[2] and queue.active("nobody") is None
    with pytest.raises(NeuroMapError, match="already has a segmentation queued or running"):
        queue.submit("s1", gated_work(gate, log, "again"))
    gate.set()
    assert all(job.wait(30) for job in jobs)
    assert [job.state for job in jobs] == [DONE] * 4 and [job.result for job in jobs] == ["s0", "s1", "s2", "s3"]
    # one at a time, in submission order
    assert log == [(event, f"s{i}") for i in range(4) for event in ("start", "end")]
    assert queue.active("s0") is None and queue.ahead(jobs[3]) is None


def test_two_workers_run_two_jobs_at_once_and_a_failure_does_not_stop_the_queue():
    queue, both = JobQueue(2), threading.Barrier(2, timeout=30)

    def meet(report_stage):
        both.wait()  # only returns when the other job runs at the same time
        return "met"

    def broken(report_stage):
        raise ValueError("bad case")

    first, second = queue.submit("a", meet), queue.submit("b", meet)
    failing, after = queue.submit("c", broken), queue.submit("d", lambda report_stage: "still served")
    assert all(job.wait(30) for job in (first, second, failing, after))
    assert (first.result, second.result) == ("met", "met")
    assert failing.state == FAILED and isinstance(failing.error, ValueError)
    assert after.state == DONE and after.result == "still served"


def test_cancel_drops_a_queued_job_and_stops_a_running_one_at_its_next_stage():
    queue, gate, log, cleaned = JobQueue(1), threading.Event(), [], []
    running = queue.submit("a", gated_work(gate, log, "a"))
    queued = queue.submit("b", gated_work(gate, log, "b"))
    while running.stage != "reading":
        time.sleep(0.01)
    assert queue.cancel("b", then=lambda: cleaned.append("b")) is queued
    assert queued.state == CANCELLED and cleaned == ["b"]  # at once: it never started
    queue.cancel("a", then=lambda: cleaned.append(("a", list(log))))
    assert cleaned == ["b"] and running.state == "running"  # not while it runs ...
    gate.set()
    assert running.wait(30)
    assert running.state == CANCELLED and isinstance(running.error, Cancelled)  # ... it stopped at "model"
    assert cleaned == ["b", ("a", [("start", "a")])]  # ... and then, after its work had returned
    assert ("start", "b") not in log
    assert queue.cancel("nobody", then=lambda: cleaned.append("now")) is None and cleaned[-1] == "now"


def test_worker_setting_is_range_checked_on_the_page(monkeypatch):
    for bad in ("0", "65", "two", "1.5"):
        monkeypatch.setenv("NEUROMAP_APP_WORKERS", bad)
        at = AppTest.from_file(str(APP), default_timeout=120).run()
        assert not at.exception
        assert any(f"NEUROMAP_APP_WORKERS='{bad}'" in e.value for e in at.error), [e.value for e in at.error]
    with pytest.raises(SystemExit) as refused:
        cli.main(["app", "--workers", "0"])
    assert refused.value.code == cli.EXIT_USER_ERROR


# ------------------------------------------------------------------------------------------------ eight sessions


class Recording(MemoryMediaFileStorage):
    """Keeps every file a download button serves, by id: the bytes a browser would get from the URL."""

    served: dict[str, bytes] = {}

    def load_and_get_id(self, path_or_data, mimetype, kind, filename=None):
        file_id = super().load_and_get_id(path_or_data, mimetype, kind, filename)
        Recording.served[file_id] = self._files_by_id[file_id].content
        return file_id


class User:
    """One browser session driven in its own thread: upload its case, press Segment, follow the page."""

    def __init__(self, case: Path) -> None:
        self.case = case
        self.shown: list[str] = []  # the job panel's texts, in order
        self.error: BaseException | None = None

    def run(self, submitted: threading.Barrier) -> None:
        try:
            with PAGE_RUN:
                self.at = AppTest.from_file(str(APP), default_timeout=300).run()
            files = [(p.name, p.read_bytes(), "application/gzip") for p in self.inputs()]
            with PAGE_RUN:
                self.at.file_uploader[0].set_value(files).run()
            with PAGE_RUN:
                button(self.at, "Segment").click().run()
                self.job = self.at.session_state.job
                self.note()
            submitted.wait()
            while "job" in self.at.session_state:
                time.sleep(0.5)
                with PAGE_RUN:
                    self.at.run()
                    self.note()
        except BaseException as exc:  # reported by the test's thread
            self.error = exc

    def inputs(self) -> list[Path]:
        return [self.case / f"{self.case.name}_{m}.nii.gz" for m in SEQUENCES]

    def note(self) -> None:
        self.shown += [p.text for p in self.at.get("progress")]


def page_bytes(at: AppTest) -> bytes:
    """Everything the session's browser was sent for its page: every element, serialized."""
    out = []

    def walk(node) -> None:
        proto = getattr(node, "proto", None)
        if proto is not None:
            out.append(proto.SerializeToString())
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at.main)
    walk(at.sidebar)
    return b"".join(out)


def viewer_files(at: AppTest) -> dict[str, bytes]:
    """The files the page's viewer component was given (sequences and labels), by argument name."""
    (viewer,) = [e for e in at.get("component_instance")]
    return {arg.key: arg.bytes for arg in viewer.proto.special_args if arg.bytes}


@pytest.fixture(scope="module")
def eight_sessions(tmp_path_factory):
    """Eight sessions at once, one worker. The first case to reach the model waits there until all eight pages
    have submitted, so the positions they show are known; then the queue runs freely."""
    if not BRATS.is_dir():
        pytest.skip(f"real data folder {BRATS} is absent")
    root = tmp_path_factory.mktemp("load")
    cases = [cropped_real_case(root / "cases", name) for name in CASES]
    model = tiny_checkpoint(root / "tiny.pt")
    gate, entered, running, peak = threading.Event(), [], [0], [0]
    count = threading.Lock()
    real = Segmenter.segment_case

    def gated(self, case, *args, **kwargs):
        with count:
            entered.append(case.case_id)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            assert gate.wait(300), "the sessions never all submitted"
            return real(self, case, *args, **kwargs)
        finally:
            with count:
                running[0] -= 1

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(neuromap.zoo, "WEIGHTS_DIR", root / "no_weights")
        mp.setenv("NEUROMAP_APP_MODEL", str(model))
        mp.setenv("NEUROMAP_APP_WORKERS", "1")
        mp.delenv("NEUROMAP_APP_MAX_UPLOAD_MB", raising=False)
        mp.setattr(app_test_module, "MemoryMediaFileStorage", Recording)
        mp.setattr(Segmenter, "segment_case", gated)
        users = [User(case) for case in cases]
        submitted = threading.Barrier(len(users) + 1, timeout=600)
        threads = [threading.Thread(target=user.run, args=(submitted,)) for user in users]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        submitted.wait()
        gate.set()
        for thread in threads:
            thread.join(900)
        elapsed = time.monotonic() - started
    for user in users:
        if user.error is not None:
            raise user.error
    yield {"users": users, "entered": entered, "peak": peak[0], "model": model, "root": root, "elapsed": elapsed}
    clear_session_resource_cache(APPTEST_SESSION_ID)  # in case a test failed before ending the sessions


@needs_real_data
def test_queue_positions_shown_and_one_case_at_a_time(eight_sessions):
    users = sorted(eight_sessions["users"], key=lambda u: u.job.seq)  # in the order they reached the queue
    for rank, user in enumerate(users):
        first = user.shown[0]
        if rank == 0:  # first: either still waiting for the idle worker to pick it up, or running
            assert first.startswith(("Waiting, 0 ahead", "Arranging the files")), first
        else:
            assert first.startswith(f"Waiting, {rank} ahead (one segmentation runs at a time)"), first
        places = [int(m.group(1)) for text in user.shown if (m := WAITING.match(text))]
        assert places == sorted(places, reverse=True), f"{user.case.name}: its place went back: {places}"
        assert user.shown[-1].startswith(f"Done: {user.case.name} in ")
    assert eight_sessions["entered"] == [u.case.name for u in users]  # first come, first served
    assert eight_sessions["peak"] == 1  # one worker: never two cases in the model's stage at once


@needs_real_data
def test_every_session_gets_its_own_result_as_the_cli_gives_it(eight_sessions):
    root, model = eight_sessions["root"], eight_sessions["model"]
    for user in eight_sessions["users"]:
        at = user.at
        assert not at.exception and not at.error, [e.value for e in at.error]
        files = downloads(at, Recording.served)
        labels = nib.Nifti1Image.from_bytes(gzip.decompress(files["Label map (NIfTI, input grid)"]))
        upload = nib.load(str(user.inputs()[0]))
        assert labels.shape == upload.shape and np.array_equal(labels.affine, upload.affine)
        report = at.session_state.result["report"]
        assert report["case_id"] == user.case.name
        assert report["inputs"] == {m: f"{user.case.name}_{m}.nii.gz" for m in SEQUENCES}
        # The same case through `neuromap segment` with the same model: the same labels and volumes.
        out = root / "cli" / user.case.name
        assert cli.main(["segment", str(user.case), "-o", str(out), "--model", str(model)]) == 0
        expected = nib.load(str(out / f"{user.case.name}_seg.nii.gz"))
        assert np.array_equal(np.asarray(labels.dataobj), np.asarray(expected.dataobj))
        cli_report = json.loads((out / f"{user.case.name}_report.json").read_text())
        assert report["volumes_ml"] == cli_report["volumes_ml"]
        table = at.table[0].value
        assert list(table["Volume (mL)"]) == [f"{report['volumes_ml'][k]:.2f}" for k in ("NCR", "ED", "ET", "WT", "TC")]
    volumes = {u.case.name: u.at.session_state.result["report"]["volumes_ml"]["WT"] for u in eight_sessions["users"]}
    assert len(set(volumes.values())) == len(CASES), volumes  # eight different answers, not one shared


@needs_real_data
def test_no_session_can_reach_another_sessions_files(eight_sessions):
    """Everything a page was sent (every element, the download URLs and bytes, the viewer's files) holds only its
    own case; the folders are distinct, private to the server's user and named with a 128-bit random token."""
    users = eight_sessions["users"]
    roots = [u.at.session_state.workspace.root for u in users]
    assert len(set(roots)) == len(users)
    for root in roots:
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert re.fullmatch(r"neuromap-app-[0-9a-f]{32}-\w+", root.name)
    urls = {u.case.name: {e.proto.url for e in u.at.get("download_button")} for u in users}
    for user in users:
        mine = page_bytes(user.at)
        own = downloads(user.at, Recording.served)
        sequences = viewer_files(user.at)
        assert sequences["labels"] == own["Label map (NIfTI, input grid)"]
        assert {k: v for k, v in sequences.items() if k.startswith("seq_")} == {
            f"seq_{m}": (user.case / f"{user.case.name}_{m}.nii.gz").read_bytes() for m in SEQUENCES}
        for other in users:
            if other is user:
                continue
            assert other.case.name.encode() not in mine
            assert str(other.at.session_state.workspace.root).encode() not in mine
            assert not urls[other.case.name] & urls[user.case.name]
            assert not set(downloads(other.at, Recording.served).values()) & set(own.values())
        assert str(user.at.session_state.workspace.root).encode() not in mine  # not even its own path


@needs_real_data
def test_ending_the_sessions_deletes_every_folder(eight_sessions):
    roots = [u.at.session_state.workspace.root for u in eight_sessions["users"]]
    assert all(root.is_dir() and any(root.iterdir()) for root in roots)
    clear_session_resource_cache(APPTEST_SESSION_ID)  # what Streamlit does when a session disconnects or ends
    assert not [root for root in roots if root.exists()]


# ------------------------------------------------------------------------------------------------ session end


@needs_real_data
def test_session_end_cancels_a_queued_job_at_once_and_a_running_one_at_its_next_stage(monkeypatch, tmp_path):
    """Two sessions, one worker: A's case is in the segmenter (held there), B's waits. Both sessions end: B's job
    is dropped and its folder deleted at once; A's folder stays until A's job has stopped, then goes too."""
    case_a = cropped_real_case(tmp_path / "a", CASES[0])
    case_b = cropped_real_case(tmp_path / "b", CASES[1])
    monkeypatch.setattr(neuromap.zoo, "WEIGHTS_DIR", tmp_path / "no_weights")
    monkeypatch.setenv("NEUROMAP_APP_MODEL", str(tiny_checkpoint(tmp_path / "tiny.pt")))
    monkeypatch.delenv("NEUROMAP_APP_WORKERS", raising=False)  # the default: one worker
    gate, entered = threading.Event(), []
    real = Segmenter.segment_case

    def held(self, case, *args, **kwargs):
        entered.append(case.case_id)
        assert gate.wait(120)
        return real(self, case, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "segment_case", held)
    pages = []
    for case in (case_a, case_b):
        at = AppTest.from_file(str(APP), default_timeout=120).run()
        at.file_uploader[0].set_value([(p.name, p.read_bytes(), "application/gzip") for p in User(case).inputs()])
        button(at.run(), "Segment").click().run()
        pages.append(at)
    a, b = pages
    assert b.get("progress")[0].text.startswith("Waiting, 1 ahead")
    job_a, job_b = a.session_state.job, b.session_state.job
    root_a, root_b = a.session_state.workspace.root, b.session_state.workspace.root
    clear_session_resource_cache(APPTEST_SESSION_ID)  # Streamlit's session end (disconnect or shutdown)
    assert job_b.state == CANCELLED and not root_b.exists()
    assert job_a.state == "running" and job_a.cancel_requested and root_a.is_dir()
    gate.set()
    assert job_a.wait(120)
    assert job_a.state == CANCELLED and isinstance(job_a.error, Cancelled)
    assert not root_a.exists() and entered == [CASES[0]]
    assert app_jobs.shared_queue(1).active(job_b.owner) is None
