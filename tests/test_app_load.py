"""The web app under load and between users (issue 11): the process-wide job queue (`neuromap.app_jobs`) on its own,
then eight Streamlit sessions (AppTest, one thread each) uploading eight different real BraTS cases at once and
segmenting them with one worker: the queue positions each page showed, one case in the model at a time, first come
first served, every session's own correct result (its upload's grid, the labels and volumes `neuromap segment`
gives for that case), nothing of one session reachable from another's page, and every temp folder gone when the
sessions end (through Streamlit's own session-end hook). The cases are cut to 24 axial slices through the tumour
and the model is the tiny checkpoint, so the eight segmentations take seconds; `benchmarks/app_load.py` runs full
cases with the shipped model against a real server.

A page waits for its job inside its run (`neuromap.app_jobs.follow_job`), so the eight page runs overlap. AppTest
is not made for that: each run installs its own Streamlit Runtime singleton and config patch and removes them at
its end. `one_runtime` gives all sessions one runtime for the test instead, as on a server; the texts each page's
progress bar showed are recorded from `neuromap.app_jobs.job_status`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import stat
import threading
import time
from collections import defaultdict
from pathlib import Path
from unittest.mock import MagicMock

import nibabel as nib
import numpy as np
import pytest
import streamlit.testing.v1.app_test as app_test_module
import streamlit.testing.v1.local_script_runner as local_script_runner
from conftest import BRATS, cropped_real_case, needs_real_data
from streamlit.runtime import Runtime
from streamlit.runtime.caching import clear_session_resource_cache
from streamlit.runtime.caching.storage.dummy_cache_storage import MemoryCacheStorageManager
from streamlit.runtime.dataframe_source_manager import DataframeSourceManager
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.runtime.scriptrunner.script_cache import ScriptCache
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.util import patch_config_options
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
    with pytest.raises(NeuroMapError, match="already has a segmentation queued or running"):
        queue.submit("s1", gated_work(gate, log, "again"))
    gate.set()
    assert all(job.wait(30) for job in jobs)
    assert [job.state for job in jobs] == [DONE] * 4 and [job.result for job in jobs] == ["s0", "s1", "s2", "s3"]
    # one at a time, in submission order
    assert log == [(event, f"s{i}") for i in range(4) for event in ("start", "end")]
    assert queue.ahead(jobs[3]) is None
    assert queue.submit("s1", lambda report_stage: "next").wait(30)  # an owner whose job ended may submit again


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


@contextlib.contextmanager
def one_runtime(mp: pytest.MonkeyPatch):
    """Let AppTest pages run at the same time (see the module docstring): one Streamlit runtime for all of them
    (AppTest's per-run swaps land on a subclass nothing reads), one script cache (AppTest compiles the page anew
    for every run, and CPython 3.11's parser is not safe to run in several threads at once), the AppTest config
    patch applied once, and the progress-bar texts of every page recorded by job owner."""
    runtime = MagicMock(spec=Runtime)
    runtime.media_file_mgr = MediaFileManager(Recording("/mock/media"))
    runtime.dataframe_source_mgr = DataframeSourceManager()
    runtime.cache_storage_manager = MemoryCacheStorageManager()
    mp.setattr(Runtime, "_instance", runtime)
    mp.setattr(app_test_module, "Runtime", type("PerRunRuntime", (Runtime,), {}))
    mp.setattr(app_test_module, "patch_config_options", lambda overrides: contextlib.nullcontext())
    script_cache = ScriptCache()
    mp.setattr(local_script_runner, "ScriptCache", lambda: script_cache)
    shown = Shown(list)
    status = app_jobs.job_status

    def recorded(job, queue, stages):
        fraction, text = status(job, queue, stages)
        shown.followed[job.owner] = (job, queue)
        if not shown[job.owner] or shown[job.owner][-1] != text:
            shown[job.owner].append(text)
        return fraction, text

    mp.setattr(app_jobs, "job_status", recorded)
    with patch_config_options({"global.appTest": True}):
        yield shown


class Shown(defaultdict):
    """The progress-bar texts each page showed, by job owner, and the job and queue each page follows."""

    followed: dict

    def __init__(self, factory) -> None:
        super().__init__(factory)
        self.followed = {}

    def caught_up(self) -> bool:
        """Every page whose job still waits shows its current place (a page redraws every `POLL_S` seconds)."""
        for owner, (job, queue) in list(self.followed.items()):
            ahead = queue.ahead(job)
            if ahead is not None and not self[owner][-1].startswith(f"Waiting, {ahead} ahead"):
                return False
        return True


class User:
    """One browser session driven in its own thread: upload its case, press Segment; the run returns when the
    page has the result."""

    def __init__(self, case: Path) -> None:
        self.case = case
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.at = AppTest.from_file(str(APP), default_timeout=900).run()
            self.at.file_uploader[0].set_value([(p.name, p.read_bytes(), "application/gzip")
                                                for p in self.inputs()]).run()
            button(self.at, "Segment").click().run()
        except BaseException as exc:  # reported by the test's thread
            self.error = exc

    def inputs(self) -> list[Path]:
        return [self.case / f"{self.case.name}_{m}.nii.gz" for m in SEQUENCES]

    @property
    def owner(self) -> str:
        return self.at.session_state.job_owner


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


def held_segmenter(mp: pytest.MonkeyPatch, gate: threading.Event, caught_up=lambda: True) -> dict:
    """Every case waits at the segmenter's door until ``gate`` opens and then until ``caught_up()`` (so a page
    cannot miss a place: its next redraw comes before the queue moves on, however slow the machine); returns the
    cases in the order they entered and the most that were inside at once."""
    seen = {"entered": [], "inside": 0, "peak": 0}
    count = threading.Lock()
    real = Segmenter.segment_case

    def held(self, case, *args, **kwargs):
        with count:
            seen["entered"].append(case.case_id)
            seen["inside"] += 1
            seen["peak"] = max(seen["peak"], seen["inside"])
        try:
            assert gate.wait(600), "the gate never opened"
            wait_until(caught_up, 120)
            return real(self, case, *args, **kwargs)
        finally:
            with count:
                seen["inside"] -= 1

    mp.setattr(Segmenter, "segment_case", held)
    return seen


def wait_until(condition, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def eight_sessions(tmp_path_factory):
    """Eight sessions at once, one worker. The first case to reach the segmenter waits there until all eight pages
    show their place, so the positions they show are known; then the queue runs freely."""
    if not BRATS.is_dir():
        pytest.skip(f"real data folder {BRATS} is absent")
    root = tmp_path_factory.mktemp("load")
    cases = [cropped_real_case(root / "cases", name) for name in CASES]
    model = tiny_checkpoint(root / "tiny.pt")
    gate = threading.Event()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(neuromap.zoo, "WEIGHTS_DIR", root / "no_weights")
        mp.setenv("NEUROMAP_APP_MODEL", str(model))
        mp.setenv("NEUROMAP_APP_WORKERS", "1")
        mp.delenv("NEUROMAP_APP_MAX_UPLOAD_MB", raising=False)
        with one_runtime(mp) as shown:
            seen = held_segmenter(mp, gate, shown.caught_up)
            users = [User(case) for case in cases]
            threads = [threading.Thread(target=user.run) for user in users]
            for thread in threads:
                thread.start()
            wait_until(lambda: len(shown) == len(users) or any(u.error for u in users))
            gate.set()
            for thread in threads:
                thread.join(900)
    for user in users:
        if user.error is not None:
            raise user.error
    yield {"users": users, "shown": shown, "seen": seen, "model": model, "root": root}
    clear_session_resource_cache(APPTEST_SESSION_ID)  # in case a test failed before ending the sessions


@needs_real_data
def test_queue_positions_shown_and_one_case_at_a_time(eight_sessions):
    shown, seen = eight_sessions["shown"], eight_sessions["seen"]
    # The order the jobs reached the queue: the order their cases entered the segmenter (first come, first served,
    # checked by the places below).
    users = sorted(eight_sessions["users"], key=lambda u: seen["entered"].index(u.case.name))
    for rank, user in enumerate(users):
        texts = shown[user.owner]
        if rank == 0:  # first: either still waiting for the idle worker to pick it up, or running
            assert texts[0].startswith(("Waiting, 0 ahead", "Reading the sequences")), texts[0]
        else:
            assert texts[0].startswith(f"Waiting, {rank} ahead (one segmentation runs at a time)"), texts[0]
        places = [int(m.group(1)) for text in texts if (m := WAITING.match(text))]
        places = [p for i, p in enumerate(places) if i == 0 or p != places[i - 1]]  # the seconds change too
        # Each place from its first down to 1, none skipped (the queue waits for the pages, see held_segmenter); a
        # last 0 is the moment between the case before it ending and this one starting.
        expected = list(range(rank, 0, -1))
        assert places in (expected, [*expected, 0]), f"{user.case.name} (came {rank + 1}th): places shown {places}"
        assert user.at.get("progress")[0].text.startswith(f"Done: {user.case.name} in ")
    assert seen["peak"] == 1  # one worker: never two cases in the segmenter at once


@needs_real_data
def test_every_session_gets_its_own_result_as_the_cli_gives_it(eight_sessions):
    root, model = eight_sessions["root"], eight_sessions["model"]
    # The same cases through `neuromap segment` with the same model (one batch): the same labels and volumes.
    cli_out = root / "cli"
    assert cli.main(["segment", str(root / "cases"), "-o", str(cli_out), "--model", str(model)]) == 0
    for user in eight_sessions["users"]:
        at = user.at
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert "job" not in at.session_state
        files = downloads(at, Recording.served)
        labels = nib.Nifti1Image.from_bytes(gzip.decompress(files["Label map (NIfTI, input grid)"]))
        upload = nib.load(str(user.inputs()[0]))
        assert labels.shape == upload.shape and np.array_equal(labels.affine, upload.affine)
        report = at.session_state.result["report"]
        assert report["case_id"] == user.case.name
        assert report["inputs"] == {m: f"{user.case.name}_{m}.nii.gz" for m in SEQUENCES}
        expected = nib.load(str(cli_out / f"{user.case.name}_seg.nii.gz"))
        assert np.array_equal(np.asarray(labels.dataobj), np.asarray(expected.dataobj))
        cli_report = json.loads((cli_out / f"{user.case.name}_report.json").read_text())
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
    users = [User(cropped_real_case(tmp_path / "cases", name)) for name in CASES[:2]]
    monkeypatch.setattr(neuromap.zoo, "WEIGHTS_DIR", tmp_path / "no_weights")
    monkeypatch.setenv("NEUROMAP_APP_MODEL", str(tiny_checkpoint(tmp_path / "tiny.pt")))
    monkeypatch.delenv("NEUROMAP_APP_WORKERS", raising=False)  # the default: one worker
    gate = threading.Event()
    seen = held_segmenter(monkeypatch, gate)
    with one_runtime(monkeypatch) as shown:
        threads = [threading.Thread(target=user.run) for user in users]
        for user, thread in zip(users, threads, strict=True):
            thread.start()
            wait_until(lambda user=user: hasattr(user, "at") and "job" in user.at.session_state
                       and user.owner in shown, 300)
        a, b = users
        job_a, job_b = a.at.session_state.job, b.at.session_state.job
        wait_until(lambda: job_a.state == "running" and seen["entered"] == [a.case.name], 300)
        assert shown[b.owner][-1].startswith("Waiting, 1 ahead")
        root_a, root_b = a.at.session_state.workspace.root, b.at.session_state.workspace.root
        clear_session_resource_cache(APPTEST_SESSION_ID)  # Streamlit's session end (disconnect or shutdown)
        assert job_b.state == CANCELLED and not root_b.exists()
        assert job_a.state == "running" and job_a.cancel_requested and root_a.is_dir()
        gate.set()
        assert job_a.wait(120)
        assert job_a.state == CANCELLED and isinstance(job_a.error, Cancelled)
        assert not root_a.exists() and seen["entered"] == [a.case.name]
        for thread in threads:
            thread.join(120)
    # Unlike a server, AppTest does not stop the two page runs when their sessions end: they went on and made new
    # sessions (as a reconnecting page would); end those too.
    clear_session_resource_cache(APPTEST_SESSION_ID)
    assert not any(user.error for user in users)
