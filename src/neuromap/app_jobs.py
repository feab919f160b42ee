"""The web app's segmentation queue and each browser session's lifetime on the server.

One `JobQueue` per server process runs the segmentations of all sessions, first come first served, with a fixed
number of worker threads (``neuromap app --workers``, default 1; the environment variable ``NEUROMAP_APP_WORKERS``
carries it to the app). So with eight users only ``workers`` cases are in memory and in the model at a time, and
the models are loaded once per process (`neuromap.app.cached_segmenter` shares one `Segmenter` across sessions). A
session owns at most one job; its page follows the job (`follow_job`): "waiting, N ahead" while it is queued, then
the stage the segmenter reports. A job is cancelled by 'Start over', a new upload, or the end of its session: a queued
job is dropped, a running one stops at its next stage (`Job.report_stage` raises `Cancelled`).

Session end: Streamlit calls the ``on_release`` of a session-scoped ``st.cache_resource`` when the session's
browser disconnects (tab closed, network lost) and when the session shuts down (``AppSession.clear_session_caches``;
the hook Streamlit's maintainers point to for this in streamlit/streamlit#8545, and the one its docs name for
releasing per-session resources; no periodic sweep is needed). `session_of` is such a resource: it creates the
session's private temp folder (`neuromap.webapp_io.Workspace`), and its release cancels the session's job and
deletes the folder, at once or, if the job is running, when the job has stopped (it would otherwise write into a
deleted folder and recreate it). A reconnect after a dropped connection therefore starts with a new, empty folder;
the page notices (`neuromap.app.workspace`) and forgets the old case. `Workspace`'s own finalizers stay as a second
line (garbage collection, server exit).
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from neuromap.errors import NeuroMapError
from neuromap.options import DEFAULT_APP_WORKERS, WORKERS
from neuromap.webapp_io import Workspace

WORKERS_ENV = "NEUROMAP_APP_WORKERS"
POLL_S = 0.5  # how often a waiting page redraws its place in the queue or its progress
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
Work = Callable[[Callable[[str], None]], Any]  # the job's function; it reports its stages through its argument


class Cancelled(Exception):
    """Raised inside a running job at its next stage once it has been cancelled."""


@dataclass(eq=False)
class Job:
    """One session's segmentation: queued, then run by a worker; ``result`` or ``error`` when it ends."""

    seq: int  # submission order
    owner: str
    work: Work
    state: str = QUEUED
    stage: str | None = None  # the last stage the work reported
    result: Any = None
    error: BaseException | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    ended: float | None = None
    cancel_requested: bool = False
    _ended: threading.Event = field(default_factory=threading.Event)
    _after: list[Callable[[], None]] = field(default_factory=list)  # run by the worker once the job has stopped

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    def report_stage(self, name: str) -> None:
        """Called by the work as each stage starts; where a cancelled job stops."""
        if self.cancel_requested:
            raise Cancelled(f"job {self.seq} was cancelled")
        self.stage = name

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended (done, failed or cancelled) and what was to run after it has run; False on
        timeout."""
        return self._ended.wait(timeout)


class JobQueue:
    """First come, first served; ``workers`` jobs run at a time, each in its own daemon thread."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._active: dict[str, Job] = {}  # owner -> its queued or running job
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []

    def submit(self, owner: str, work: Work) -> Job:
        """Queue ``work`` for ``owner``, who must not have a job queued or running."""
        with self._lock:
            if owner in self._active:
                raise NeuroMapError("this session already has a segmentation queued or running.")
            job = Job(next(self._seq), owner, work)
            self._waiting.append(job)
            self._active[owner] = job
            if len(self._threads) < self.workers:  # started on demand, never stopped (daemons)
                thread = threading.Thread(target=self._serve, name=f"neuromap-job-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._lock.notify()
        return job

    def ahead(self, job: Job) -> int | None:
        """How many jobs that started or wait before ``job`` have not ended; None once it runs or has ended."""
        with self._lock:
            if job.state != QUEUED:
                return None
            return len(self._running) + next(i for i, other in enumerate(self._waiting) if other is job)

    def cancel(self, owner: str, then: Callable[[], None] | None = None) -> Job | None:
        """Cancel ``owner``'s job without waiting: a queued job ends now, a running one at its next stage. ``then``
        runs once nothing of the job runs any more: now, or in the worker when the running job has stopped."""
        with self._lock:
            job = self._active.get(owner)
            if job is not None and job.state == RUNNING:
                job.cancel_requested = True
                if then is not None:
                    job._after.append(then)
                return job
            if job is not None:
                job.cancel_requested = True
                self._waiting.remove(job)
                self._end(job, CANCELLED)
        if then is not None:
            then()
        if job is not None:
            job._ended.set()
        return job

    def _end(self, job: Job, state: str) -> list[Callable[[], None]]:
        """Mark ``job`` ended (the lock is held); its pending ``then`` callbacks are returned to be run before
        its waiters are woken."""
        job.state, job.ended = state, time.monotonic()
        del self._active[job.owner]
        after, job._after = job._after, []
        return after

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._waiting:
                    self._lock.wait()
                job = self._waiting.popleft()
                job.state, job.started = RUNNING, time.monotonic()
                self._running.append(job)
            try:
                job.result = job.work(job.report_stage)
                state = CANCELLED if job.cancel_requested else DONE
            except BaseException as exc:  # kept for the page, which shows it; the worker goes on
                job.error = exc
                state = CANCELLED if job.cancel_requested else FAILED
            with self._lock:
                self._running.remove(job)
                after = self._end(job, state)
            for callback in after:
                callback()
            job._ended.set()


# ---------------------------------------------------------------------------------------------------- sessions


def queue_workers() -> int:
    """The worker count ``neuromap app --workers`` passed (range checked as the option is)."""
    raw = os.environ.get(WORKERS_ENV, str(DEFAULT_APP_WORKERS))
    try:
        return WORKERS(raw)
    except argparse.ArgumentTypeError as exc:
        raise NeuroMapError(f"{WORKERS_ENV}={exc} (it is set by `neuromap app --workers`).") from None


@st.cache_resource(show_spinner=False)
def shared_queue(workers: int) -> JobQueue:
    """The process's queue (one per worker count; a server has one count)."""
    return JobQueue(workers)


@dataclass(eq=False)
class Session:
    """What one browser session owns on the server: its job owner id and its private temp folder."""

    owner: str
    workspace: Workspace
    queue: JobQueue


def end_session(session: Session) -> None:
    """Streamlit's release hook: runs on the server's event loop thread, so it must not wait for a job."""
    session.queue.cancel(session.owner, then=session.workspace.cleanup)


@st.cache_resource(scope="session", on_release=end_session, show_spinner=False)
def session_of(owner: str, _queue: JobQueue) -> Session:
    """This session's `Session`. ``owner`` (a random id kept in session state) is part of the key so that sessions
    never share one even where Streamlit's session ids collide (AppTest gives every session the same id)."""
    return Session(owner, Workspace(), _queue)


def page_session() -> Session:
    owner = st.session_state.setdefault("job_owner", secrets.token_hex(16))
    return session_of(owner, shared_queue(queue_workers()))


def submit(work: Work) -> Job:
    """Queue ``work`` for this session; the page follows it with `follow_job`."""
    session = page_session()
    job = session.queue.submit(session.owner, work)
    st.session_state.job = job
    return job


def stop_job() -> None:
    """Cancel this session's job and wait until it has stopped (a running job stops at its next stage: seconds),
    so its files can be deleted and nothing writes into the folder afterwards."""
    job = st.session_state.pop("job", None)
    if job is not None:
        page_session().queue.cancel(job.owner)
        job.wait()


def job_busy() -> bool:
    return st.session_state.get("job") is not None


def job_status(job: Job, queue: JobQueue, stages: dict[str, tuple[float, str]]) -> tuple[float, str]:
    """The progress bar of ``job``: its place in the queue, else the fraction and text of ``stages`` (stage name ->
    (fraction, text)) for the stage it reported last, with the seconds so far."""
    ahead = queue.ahead(job)
    if ahead is not None:
        at_a_time = f"{queue.workers} segmentations run at a time" if queue.workers > 1 else \
            "one segmentation runs at a time"
        return 0.0, f"Waiting, {ahead} ahead ({at_a_time}) - {time.monotonic() - job.submitted:.0f} s"
    fraction, text = stages[job.stage or next(iter(stages))]
    return fraction, f"{text} - {time.monotonic() - (job.started or job.submitted):.0f} s"


def follow_job(stages: dict[str, tuple[float, str]]) -> Job | None:
    """Show where this session's job is (`job_status`), redrawn every `POLL_S` seconds, until it ends; then return
    it, taken out of the session, for the page to show its outcome. None when the session has no job.

    The page's script run waits here. Each redraw is one small message; polling from a fragment that reruns every
    second (``st.fragment(run_every=1)``) costs a run of the page each time instead: on a real server, for a bare
    progress bar redrawn once a second, 0.049 CPU seconds per second against 0.0047 this way (ten times; 0.076 for
    this page's fragment), measured on the loaded 2-core VM. A rerun (the user changed something) or the end
    of the session stops the script at its next redraw, as Streamlit stops scripts; the job goes on, and the next
    run of the page follows it again."""
    job = st.session_state.get("job")
    if job is None:
        return None
    queue = page_session().queue
    bar = st.progress(0.0)
    while True:
        bar.progress(*job_status(job, queue, stages))
        if job.wait(POLL_S):
            break
    bar.empty()
    return st.session_state.pop("job")
