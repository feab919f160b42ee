"""End to end in headless Chromium: `neuromap app` serves the page, a real BraTS case is uploaded, segmented with a
tiny checkpoint (progress bar, scroll to the result), the label NIfTI is downloaded and checked against the input
grid; the NiiVue viewer is driven (a click moves the crosshair and the slice readout, the radiological toggle
mirrors the view and swaps the orientation letters, window/level and the sequence change the pixels, the 3D render
draws the tumour); Segment is disabled with the reason when a needed sequence is unset; an empty file and a text
file named .nii.gz are refused on the page. Needs the Debian chromium and the team's data folder; skipped with the
reason otherwise. Screenshots are saved in the test's tmp folder (``--basetemp`` to keep them)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BRATS
from PIL import Image
from test_app import tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
CASE = "Brats18_2013_2_1"
SEQUENCES = ("t1", "t1ce", "t2", "flair")
# No GPU here: WebGL2 (NiiVue) runs on SwiftShader, Chromium's software renderer, which newer Chromium only
# enables for WebGL when asked explicitly.
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWER_FRAME = 'iframe[title="neuromap.app_viewer.neuromap_viewer"]'
LOAD_TIMEOUT_MS = 300_000  # NiiVue's first draw on a software GPU; seconds on an idle machine, minutes on a busy one

# Shared by every test that drives Chromium over a real case (this module's and the notebook's).
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.real,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} missing (apt-get install chromium; `make browser`)"),
    pytest.mark.skipif(not (BRATS / CASE).is_dir(), reason=f"real case {BRATS / CASE} is absent (team data folder)"),
]
pytestmark = BROWSER_MARKS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(command: list[str], url: str, ready: Callable[[str], bool], log_path: Path,
                   start_timeout_s: float, stop_timeout_s: float, **popen) -> Iterator[subprocess.Popen]:
    """``command`` (a web server) in its own process group, logging to ``log_path``, once ``ready(url)``; always
    stopped: SIGTERM, then the whole process group killed if it hangs. The app and JupyterLab tests and
    ``benchmarks/app_load.py`` start their servers here."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)
        try:
            deadline = time.monotonic() + start_timeout_s
            while not ready(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[2:4]} did not start:\n{log_path.read_text()}")
                time.sleep(0.5)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextlib.contextmanager
def app_process(options: list[str], log_path: Path, server_tmp: Path,
                start_timeout_s: float) -> Iterator[tuple[str, subprocess.Popen]]:
    """``neuromap app OPTIONS`` on a free port with its own TMPDIR, once it answers its health check: (url,
    process); the CLI forwards SIGTERM to Streamlit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "neuromap", "app", "--port", str(port), *options]
    with server_process(command, url, healthy, log_path, start_timeout_s, 30,
                        env={**os.environ, "TMPDIR": str(server_tmp)}) as process:
        yield url, process


@contextlib.contextmanager
def running_app(tmp_path: Path, server_tmp: Path) -> Iterator[str]:
    """The app with the tiny checkpoint (fast enough for a browser test on a busy machine)."""
    model = tiny_checkpoint(tmp_path / "tiny.pt")
    with app_process(["--model", str(model)], tmp_path / "server.log", server_tmp, 60) as (url, _):
        yield url


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
            return reply.read() == b"ok"
    except OSError:
        return False


def pixels(page, locator) -> np.ndarray:
    """What the browser shows of an element, as an RGB array: a real screenshot (WebGL included) of the page
    clipped to the element (an element screenshot first waits for animation frames, which a busy software GPU
    may not deliver in time). The element is scrolled to the middle of the view first, so it is not cut off."""
    locator.evaluate("element => element.scrollIntoView({block: 'center'})")
    shot = page.screenshot(clip=locator.bounding_box())
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.float32)


def crop(picture: np.ndarray, box: list[float]) -> np.ndarray:
    left, top, width, height = (round(v) for v in box)
    return picture[top:top + height, left:left + width]


def glyph(strip: np.ndarray) -> np.ndarray:
    """The lit pixels of a letter drawn on black, cut to their bounding box (so position does not matter)."""
    lit = strip.max(axis=2) > 40
    rows, cols = np.nonzero(lit)
    assert len(rows), "no letter found"
    return lit[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the selectbox ``label`` as a user does: bring it into view, let that scroll reach the page,
    then click. Streamlit's selectbox (react-aria) closes its list on any scroll of the page, and the scroll event of
    a click's own scroll-into-view arrives a frame later: when the page is slow to draw (a busy machine, NiiVue on
    a software GPU), after the click has opened the list, which then closes at once (the input keeps the focus)."""
    box = page.get_by_label(label)
    box.scroll_into_view_if_needed()
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
    box.click(force=True)
    page.get_by_role("option", name=option).click(force=True)


def readout(frame, plane: str) -> str:
    return frame.locator(f"#readout [data-plane={plane}]").inner_text()


def test_upload_segment_view_download_and_refusal_in_chromium(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    inputs = [BRATS / CASE / f"{CASE}_{m}.nii.gz" for m in SEQUENCES]
    source = nib.load(str(inputs[0]))
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    with running_app(tmp_path, server_tmp) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1200}, accept_downloads=True)
            page.set_default_timeout(180_000)  # a screenshot waits for frames, which a loaded software GPU delays
            page.goto(server)
            # The first run of the page imports torch: allow for a busy machine.
            page.get_by_role("heading", name="NeuroMap: brain tumour segmentation").wait_for(timeout=LOAD_TIMEOUT_MS)
            page.get_by_text("Research use only.").wait_for()

            scans = page.get_by_test_id("stFileUploader").first.locator("input[type=file]")
            scans.set_input_files([str(path) for path in inputs])
            page.get_by_text(f"{CASE}_flair.nii.gz", exact=True).wait_for()
            page.get_by_text("Model tiny.pt on T1, T1ce (contrast), T2, FLAIR").wait_for()
            page.get_by_role("button", name="Segment").click()
            page.get_by_text("Running the model").or_(page.get_by_text(f"Done: {CASE} in")).wait_for(timeout=120_000)
            table = page.get_by_test_id("stTable")
            table.wait_for(timeout=180_000)
            assert all(region in table.inner_text() for region in ("NCR/NET", "ED", "ET", "WT", "TC"))
            page.get_by_text(f"Done: {CASE} in").wait_for()
            expect(page.locator("#result")).to_be_in_viewport(timeout=60_000)  # the page scrolled to the result

            # The viewer first: while NiiVue loads (a software GPU, same process) the page's frames stall, and
            # Playwright's clicks wait for stable frames.
            view_in_browser(page, expect, tmp_path)
            with page.expect_download() as download:
                page.get_by_role("button", name="Label map (NIfTI, input grid)").click(force=True)
            assert download.value.suggested_filename == f"{CASE}_seg.nii.gz"
            target = tmp_path / download.value.suggested_filename
            download.value.save_as(target)
            labels = nib.load(str(target))
            assert labels.shape == source.shape
            assert np.array_equal(labels.affine, source.affine)
            (session_dir,) = server_tmp.glob("neuromap-app-*")  # the session's files live in its own folder
            assert target.read_bytes() == (session_dir / "out" / f"{CASE}_seg.nii.gz").read_bytes()
            with page.expect_download() as download:
                page.get_by_role("button", name="Report (JSON)").click(force=True)
            report = json.loads(Path(download.value.path()).read_text())
            assert report["inputs"] == {m: f"{CASE}_{m}.nii.gz" for m in SEQUENCES}

            # A sequence the model needs set to 'ignore': Segment is disabled and the page says why.
            choose(page, f"Sequence of {CASE}_t1ce.nii.gz", "ignore (not used)")
            expect(page.get_by_text("This model needs T1ce (contrast), which no file is set to")).to_be_visible()
            expect(page.get_by_role("button", name="Segment")).to_be_disabled()
            page.screenshot(path=str(tmp_path / "blocked.png"))

            scans.set_input_files([{"name": "empty_t1.nii.gz", "mimeType": "application/gzip", "buffer": b""}])
            page.get_by_text("empty_t1.nii.gz: the file is empty (0 bytes)").wait_for()

            scans.set_input_files([{"name": "notes_t2.nii.gz", "mimeType": "application/gzip",
                                    "buffer": b"these are my notes, not a scan\n"}])
            page.get_by_text("named .nii.gz but its content is text").wait_for()
            # Streamlit keeps the previous run's elements until the new run ends: wait for the button to go.
            expect(page.get_by_role("button", name="Segment")).to_have_count(0)
            page.screenshot(path=str(tmp_path / "refused.png"))
        finally:
            browser.close()
    assert (tmp_path / "viewer.png").stat().st_size > 10_000
    assert not list(server_tmp.glob("neuromap-app-*")), "session folder left behind after the server stopped"


def view_in_browser(page, expect, tmp_path: Path) -> None:
    """Drive the NiiVue viewer of the result on the page, checking what a user would see change. Clicks are
    forced: Playwright's wait for two equal animation frames can take minutes while a software GPU draws WebGL
    on a busy machine, though the elements are there and still."""
    frame = page.frame_locator(VIEWER_FRAME)
    frame.locator("body[data-ready=true]").wait_for(state="attached", timeout=LOAD_TIMEOUT_MS)
    canvas = frame.locator("#slices")
    canvas.evaluate("element => element.scrollIntoView({block: 'center'})")
    page.screenshot(path=str(tmp_path / "viewer.png"))
    tiles = json.loads(canvas.get_attribute("data-tiles"))
    assert set(tiles) == {"axial", "coronal", "sagittal"}

    # Click in the axial view away from the crosshair: the sagittal and coronal slices follow, the axial stays.
    before = {plane: readout(frame, plane) for plane in tiles}
    left, top, width, height = tiles["axial"]
    canvas.click(position={"x": left + 0.3 * width, "y": top + 0.35 * height}, force=True)
    expect(frame.locator("#readout [data-plane=sagittal]")).not_to_have_text(before["sagittal"])
    after = {plane: readout(frame, plane) for plane in tiles}
    assert after["coronal"] != before["coronal"] and after["axial"] == before["axial"]
    assert " mm " in after["sagittal"] and "slice " in after["sagittal"]

    # Radiological (default) -> neurological: the axial view is mirrored, the side letters swap.
    radiological = pixels(page, canvas)
    expect(frame.locator("#convention")).to_have_text("screen left = patient Right (R | L)")
    frame.get_by_label("Radiological").uncheck(force=True)
    expect(frame.locator("#convention")).to_have_text("screen left = patient Left (L | R)")
    page.wait_for_timeout(1000)
    neurological = pixels(page, canvas)
    for name, picture in (("radiological", radiological), ("neurological", neurological)):
        Image.fromarray(picture.astype(np.uint8)).save(tmp_path / f"views_{name}.png")
    axial_r, axial_n = crop(radiological, tiles["axial"]), crop(neurological, tiles["axial"])
    flipped = axial_n[:, ::-1]  # NiiVue places tiles at fractional pixels: allow a shift of a few pixels
    mirrored = min(np.abs(axial_r[:, 4:-4] - np.roll(flipped, shift, axis=1)[:, 4:-4]).mean() for shift in range(-3, 4))
    assert mirrored < 0.3 * np.abs(axial_r - axial_n).mean()
    # NiiVue writes a letter at the middle of each side of the view: the radiological left letter (R) must be
    # the neurological right letter, not its left one (L).
    strip = max(24, round(0.08 * width))
    row = top + height / 2 - 20
    left_box, right_box = [left, row, strip, 40], [left + width - strip, row, strip, 40]
    left_r, left_n, right_n = (glyph(crop(radiological, left_box)), glyph(crop(neurological, left_box)),
                               glyph(crop(neurological, right_box)))
    assert left_r.shape == right_n.shape
    same = (left_r == right_n).mean()  # the same letter (R), antialiased alike but for a few edge pixels ...
    other = (left_r == left_n).mean() if left_r.shape == left_n.shape else 0.0  # ... and not the one now there (L)
    assert same > 0.8 and same > other + 0.15
    page.screenshot(path=str(tmp_path / "viewer_neurological.png"))
    frame.get_by_label("Radiological").check(force=True)

    # Window/level: a narrow window changes what the views show.
    shown = pixels(page, canvas)
    frame.locator("#width").fill("50", force=True)
    frame.locator("#width").dispatch_event("change")
    page.wait_for_timeout(1000)
    assert np.abs(pixels(page, canvas) - shown).mean() > 3

    # Another sequence under the labels.
    shown = pixels(page, canvas)
    frame.get_by_label("T1ce (contrast)").check(force=True)
    expect(frame.locator("#width")).not_to_have_value("50", timeout=LOAD_TIMEOUT_MS)  # the new volume's window
    assert np.abs(pixels(page, canvas) - shown).mean() > 3

    # The 3D render of the tumour labels.
    frame.get_by_role("button", name="Show the tumour in 3D").click(force=True)
    frame.locator("#render-box[data-ready=true]").wait_for(state="attached", timeout=LOAD_TIMEOUT_MS)
    page.wait_for_timeout(1000)
    render = pixels(page, frame.locator("#render3d"))
    assert (render.max(axis=2) > 40).mean() > 0.001  # coloured tumour voxels on the black background
    page.screenshot(path=str(tmp_path / "viewer_3d.png"))
