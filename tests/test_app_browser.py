"""End to end in headless Chromium: `neuromap app` serves the page, a real BraTS case is uploaded, segmented with a
tiny checkpoint, the label NIfTI is downloaded and checked against the input grid; a failed run clears that result
and shows why; an empty file and a text file named .nii.gz are refused on the page. Needs the Debian chromium and
the team's data folder; skipped with the reason otherwise."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BRATS
from test_app import tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
CASE = "Brats18_2013_2_1"
SEQUENCES = ("t1", "t1ce", "t2", "flair")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.real,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} missing (apt-get install chromium; `make browser`)"),
    pytest.mark.skipif(not (BRATS / CASE).is_dir(), reason=f"real case {BRATS / CASE} is absent (team data folder)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(tmp_path: Path, server_tmp: Path) -> Iterator[str]:
    """``neuromap app`` on a free port with the tiny checkpoint and its own TMPDIR; always stopped (the CLI
    forwards SIGTERM to Streamlit; the whole process group is killed if that hangs)."""
    model = tiny_checkpoint(tmp_path / "tiny.pt")
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "neuromap", "app", "--port", str(port), "--model", str(model)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "TMPDIR": str(server_tmp)},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while not healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app did not start:\n{log_path.read_text()}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
            return reply.read() == b"ok"
    except OSError:
        return False


def test_upload_segment_download_and_refusal_in_chromium(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    inputs = [BRATS / CASE / f"{CASE}_{m}.nii.gz" for m in SEQUENCES]
    source = nib.load(str(inputs[0]))
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    with running_app(tmp_path, server_tmp) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 2100}, accept_downloads=True)
            page.set_default_timeout(60_000)
            page.goto(server)
            page.get_by_role("heading", name="NeuroMap: brain tumour segmentation").wait_for()
            page.get_by_text("Research use only.").wait_for()

            scans = page.get_by_test_id("stFileUploader").first.locator("input[type=file]")
            scans.set_input_files([str(path) for path in inputs])
            page.get_by_text(f"{CASE}_flair.nii.gz", exact=True).wait_for()
            page.get_by_role("button", name="Segment").click()
            table = page.get_by_test_id("stTable")
            table.wait_for(timeout=120_000)
            assert all(region in table.inner_text() for region in ("NCR/NET", "ED", "ET", "WT", "TC"))
            page.get_by_text(f"Done: {CASE}").wait_for()

            with page.expect_download() as download:
                page.get_by_role("button", name="Label map (NIfTI, input grid)").click()
            assert download.value.suggested_filename == f"{CASE}_seg.nii.gz"
            target = tmp_path / download.value.suggested_filename
            download.value.save_as(target)
            labels = nib.load(str(target))
            assert labels.shape == source.shape
            assert np.array_equal(labels.affine, source.affine)
            (session_dir,) = server_tmp.glob("neuromap-app-*")  # the session's files live in its own folder
            assert target.read_bytes() == (session_dir / "out" / f"{CASE}_seg.nii.gz").read_bytes()
            page.wait_for_timeout(500)  # let the slice images finish loading for the picture
            page.screenshot(path=str(tmp_path / "app.png"))

            # A failed run (T1ce set to 'ignore': the model needs it) removes the previous result and its
            # downloads, and the reason is on screen, not folded away in the status box.
            page.get_by_label(f"Sequence of {CASE}_t1ce.nii.gz").click()
            page.get_by_role("option", name="ignore (not used)").click()
            page.get_by_role("button", name="Segment").click()
            reason = page.get_by_test_id("stAlertContentError").filter(has_text="Segmentation failed")
            sync_api.expect(reason).to_contain_text("missing modality ['t1ce']")
            sync_api.expect(reason).to_be_visible()
            sync_api.expect(page.get_by_test_id("stTable")).to_have_count(0)
            sync_api.expect(page.get_by_role("button", name="Label map (NIfTI, input grid)")).to_have_count(0)
            page.screenshot(path=str(tmp_path / "failed.png"))

            scans.set_input_files([{"name": "empty_t1.nii.gz", "mimeType": "application/gzip", "buffer": b""}])
            page.get_by_text("empty_t1.nii.gz: the file is empty (0 bytes)").wait_for()

            scans.set_input_files([{"name": "notes_t2.nii.gz", "mimeType": "application/gzip",
                                    "buffer": b"these are my notes, not a scan\n"}])
            page.get_by_text("named .nii.gz but its content is text").wait_for()
            # Streamlit keeps the previous run's elements until the new run ends: wait for the button to go.
            sync_api.expect(page.get_by_role("button", name="Segment")).to_have_count(0)
            page.screenshot(path=str(tmp_path / "refused.png"))
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
    assert not list(server_tmp.glob("neuromap-app-*")), "session folder left behind after the server stopped"
