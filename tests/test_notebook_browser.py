"""`result.show()` drawn by a real Jupyter front end: a JupyterLab server (its own port, token and config folders)
serves a notebook that segments a real BraTS case (cut to 24 slices through the tumour, default model) and shows
the result twice, ``result.show()`` and ``result.show(radiological=False)``; headless Chromium (SwiftShader WebGL2)
opens it and runs all cells. Proved from the pixels of each widget's NiiVue canvas: the brain is drawn, every label
present in the views through the crosshair shows in its colour from `neuromap.viewer` (blended at the widget's
opacity), the crosshair is drawn (its lines bound the axial view), the 3D tile is drawn, the axial view is mirrored
between the two conventions and its side letters are R | L radiological and L | R neurological. Needs the Debian
chromium, JupyterLab and ipyniivue (the dev and app extras) and the team's data folder; skipped with the reason
otherwise. Screenshots are saved in the test's tmp folder (``--basetemp`` to keep them)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import cropped_real_case
from PIL import Image
from test_app_browser import (
    BROWSER_MARKS,
    CASE,
    CHROMIUM,
    CHROMIUM_ARGS,
    crop,
    free_port,
    glyph,
    pixels,
    server_process,
)

from neuromap.notebook import DEFAULT_OPACITY
from neuromap.tasks import get_task
from neuromap.viewer import viewer_scene

SRC = Path(__file__).resolve().parents[1] / "src"
DRAW_TIMEOUT_S = 600  # kernel start, torch import, the model and NiiVue's first draw on a software GPU, busy machine

pytestmark = BROWSER_MARKS


def notebook(cells: list[str]) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                        "language": "python"}},
            "cells": [{"cell_type": "code", "id": f"cell{i}", "metadata": {}, "execution_count": None,
                       "outputs": [], "source": source} for i, source in enumerate(cells)]}


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def processes_mentioning(text: str) -> list[int]:
    """Pids of the processes whose command line holds ``text`` (a folder only this test's processes were given)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def jupyter_lab(root: Path, state: Path, log_path: Path, start_timeout_s: float,
                options: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    """JupyterLab serving ``root`` on a free port with a random token, its config, data, runtime and IPython folders
    under ``state`` (never ~/.jupyter), kernels importing neuromap from this checkout: yields (url, token) once it
    answers; always stopped (SIGTERM shuts its kernels down; what is left of its process group or its kernels,
    found by the runtime folder in their command line, is killed)."""
    port, token = free_port(), secrets.token_hex(16)
    folders = {name: state / name for name in ("config", "data", "runtime", "ipython")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    # No pop-up over the notebook asking whether to fetch Jupyter news from the internet.
    (folders["config"] / "labconfig").mkdir()
    (folders["config"] / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    # No websocket pings: a browser busy loading the widget on a loaded 2-core machine once left them unanswered
    # for 2 min and the server closed the kernel's connection (the outputs were lost).
    (folders["config"] / "jupyter_server_config.json").write_text(json.dumps(
        {"ServerApp": {"tornado_settings": {"ws_ping_interval": 0}}}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(folders["config"]), "JUPYTER_DATA_DIR": str(folders["data"]),
           "JUPYTER_RUNTIME_DIR": str(folders["runtime"]), "IPYTHONDIR": str(folders["ipython"]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    env.pop("JUPYTER_PLATFORM_DIRS", None)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
               "--ServerApp.terminals_enabled=False", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               *(["--allow-root"] if os.geteuid() == 0 else []), *options]
    url = f"http://127.0.0.1:{port}"
    try:
        with server_process(command, url, answers, log_path, start_timeout_s, 60, env=env, cwd=root):
            yield url, token
    finally:
        for pid in processes_mentioning(str(folders["runtime"])):  # a kernel the server did not end
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def blended(picture: np.ndarray, colour: tuple[int, int, int], opacity: float) -> np.ndarray:
    """Pixels that are ``colour`` drawn at ``opacity`` over some grey: what is left after taking the colour's
    share away is grey (equal channels) and no brighter than the grey's share can be."""
    rest = picture - opacity * np.asarray(colour, dtype=np.float32)
    return (np.ptp(rest, axis=2) <= 4) & (rest.min(axis=2) >= -4) & (rest.max(axis=2) <= (1 - opacity) * 255 + 4)


def crosshair(picture: np.ndarray) -> np.ndarray:
    """The crosshair's yellow (the widget draws it yellow, 80% opaque); no label colour blended with grey is."""
    return (picture[..., 0] > 200) & (picture[..., 1] > 200) & (picture[..., 2] < 80)


def runs(line: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the runs of True in a 1-D mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], line.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def axial_view(picture: np.ndarray) -> list[int] | None:
    """The axial view's box [left, top, width, height] in the widget's grid (coronal | sagittal over axial | 3D):
    NiiVue draws each crosshair line across its whole view, and the axial view's horizontal line is the lowest
    one (the 3D tile beside it has none). None while no crosshair is drawn."""
    yellow = crosshair(picture)
    rows = [(row, start, stop) for row in range(yellow.shape[0]) for start, stop in runs(yellow[row])
            if stop - start >= 40]
    if not rows:
        return None
    row, left, right = max(rows)
    columns = [(stop - start, start, stop) for column in range(left, right)
               for start, stop in runs(yellow[:, column]) if start <= row < stop]
    if not columns:
        return None
    _, top, bottom = max(columns)
    return [left, top, right - left, bottom - top]


def side_letters(picture: np.ndarray, box: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The letters NiiVue writes at the middle of the view's left and right sides, as glyphs of their grey pixels
    (the crosshair may cross the strip)."""
    left, top, width, height = box
    grey = picture.copy()
    grey[np.ptp(picture, axis=2) > 20] = 0
    strip, middle = max(20, round(0.08 * width)), top + height // 2
    return (glyph(crop(grey, [left, middle - 20, strip, 40])),
            glyph(crop(grey, [left + width - strip, middle - 20, strip, 40])))


def is_l(letter: np.ndarray) -> bool:
    """An L has nothing in the top right quarter of its box; an R has its bowl there."""
    rows, columns = letter.shape
    return letter[: rows // 2, columns // 2 + 1:].mean() < 0.05


def prompts(page) -> list[str]:
    """The cells' input prompts: '[ ]:' not run, '[*]:' queued or running, '[1]:' done."""
    return [text.strip() for text in page.locator(".jp-Cell .jp-InputPrompt").all_inner_texts()]


def run_all_cells(page, attempts: int = 3) -> None:
    """Run > Run All Cells once the kernel is attached, clicked again if no cell was queued: JupyterLab drops the
    cells silently (their prompts stay '[ ]:') when they are run while the session has no kernel yet, which once
    happened in CI although the execution indicator already said idle."""
    for _ in range(attempts):
        page.locator(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status=idle]").wait_for(
            timeout=DRAW_TIMEOUT_S * 1000)  # the kernel has started
        page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=DRAW_TIMEOUT_S * 1000)  # and is attached
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.get_by_text("Run All Cells", exact=True).click()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(text != "[ ]:" for text in prompts(page)):
                return
            page.wait_for_timeout(1000)
    pytest.fail(f"Run All Cells queued no cell in {attempts} attempts; prompts: {prompts(page)}")


def test_result_show_draws_in_jupyterlab(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    for package, extra in (("jupyterlab", "dev"), ("ipyniivue", "app")):  # the kernel runs in this environment
        assert importlib.util.find_spec(package), f"{package} is missing: pip install -e '.[{extra}]'"
    case = cropped_real_case(tmp_path / "in", CASE)
    out = tmp_path / "out"
    root = tmp_path / "notebooks"
    root.mkdir()
    (root / "view.ipynb").write_text(json.dumps(notebook([
        f"import neuromap\n(result,) = neuromap.segment({str(case)!r}, {str(out)!r})",
        "result.show()",
        "result.show(radiological=False)",
    ])))
    with jupyter_lab(root, tmp_path / "jupyter", tmp_path / "jupyter.log", 180) as (url, token), \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1300})
            page.set_default_timeout(180_000)  # a screenshot waits for frames, which a loaded software GPU delays
            page.goto(f"{url}/lab/tree/view.ipynb?token={token}")
            run_all_cells(page)
            canvases = page.locator(".jp-OutputArea-output canvas")
            error = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
            try:
                canvases.nth(1).or_(error.first).wait_for(timeout=DRAW_TIMEOUT_S * 1000)
            except sync_api.TimeoutError:  # what the page showed, for whoever reads the failure
                page.screenshot(path=str(tmp_path / "timeout.png"))
                pytest.fail(f"no second viewer within {DRAW_TIMEOUT_S} s; segmentation written: {out.is_dir()}; "
                            f"canvases drawn: {canvases.count()}; prompts: {prompts(page)}; "
                            f"page: {tmp_path / 'timeout.png'}")
            page.screenshot(path=str(tmp_path / "notebook_running.png"))
            assert not error.count(), f"a cell failed:\n{error.first.inner_text()}"

            report = json.loads((out / f"{CASE}_report.json").read_text())
            seg = nib.load(str(out / f"{CASE}_seg.nii.gz"))
            task = get_task(report["model"]["task"])
            scene = viewer_scene(report["inputs"], seg, report["label_convention"], task)
            # The labels in the three planes through the crosshair (the tumour centre) must all be drawn.
            i, j, k = np.rint(np.linalg.inv(seg.affine) @ [*scene.start_mm, 1.0])[:3].astype(int)
            values = np.asarray(seg.dataobj)
            planes = np.concatenate([values[i].ravel(), values[:, j].ravel(), values[:, :, k].ravel()])
            shown = {s.value: s for s in scene.styles if (planes == s.value).sum() >= 20}
            assert shown, "the model found no tumour to draw"
            colours = {value: tuple(int(s.colour[c:c + 2], 16) for c in (1, 3, 5)) for value, s in shown.items()}

            deadline = time.monotonic() + DRAW_TIMEOUT_S

            def drawn(canvas) -> tuple[np.ndarray, dict[int, int], list[int] | None]:
                """The canvas once NiiVue has drawn the scene (every label colour and the crosshair), or as it is
                at the deadline."""
                while True:
                    picture = pixels(page, canvas)
                    found = {value: int(blended(picture, colour, DEFAULT_OPACITY).sum())
                             for value, colour in colours.items()}
                    box = axial_view(picture)
                    if (min(found.values()) >= 20 and box is not None) or time.monotonic() > deadline:
                        return picture, found, box
                    page.wait_for_timeout(3000)

            radiological, found_r, box_r = drawn(canvases.nth(0))
            neurological, found_n, box_n = drawn(canvases.nth(1))
            page.screenshot(path=str(tmp_path / "notebook.png"))
            for name, picture in (("radiological", radiological), ("neurological", neurological)):
                Image.fromarray(picture.astype(np.uint8)).save(tmp_path / f"widget_{name}.png")
        finally:
            browser.close()

    for name, picture, found, box in (("radiological", radiological, found_r, box_r),
                                      ("neurological", neurological, found_n, box_n)):
        assert (picture.max(axis=2) > 40).mean() > 0.05, f"{name}: the canvas is blank"
        missing = {shown[value].name: count for value, count in found.items() if count < 20}
        assert not missing, f"{name}: label colours not drawn (pixels found): {missing}"
        assert box is not None, f"{name}: no crosshair drawn"
        left, top, width, height = box
        assert width > 100 and height > 100, f"{name}: axial view {box} too small"
        beside = crop(picture, [left + width + 10, top, picture.shape[1] - left - width - 10, height])
        assert (beside.max(axis=2) > 40).mean() > 0.02, f"{name}: the 3D view beside the axial one is empty"
    assert all(abs(a - b) <= 2 for a, b in zip(box_r, box_n, strict=True)), (box_r, box_n)

    # Radiological (default) -> neurological: the axial view is mirrored and its side letters swap.
    axial_r, axial_n = crop(radiological, box_r), crop(neurological, box_r)
    flipped = axial_n[:, ::-1]  # NiiVue places views at fractional pixels: allow a shift of a few pixels
    mirrored = min(np.abs(axial_r[:, 4:-4] - np.roll(flipped, shift, axis=1)[:, 4:-4]).mean() for shift in range(-3, 4))
    assert mirrored < 0.3 * np.abs(axial_r - axial_n).mean()
    left_r, right_r = side_letters(radiological, box_r)
    left_n, right_n = side_letters(neurological, box_n)
    assert not is_l(left_r) and is_l(right_r), "radiological: the axial view is not R | L"
    assert is_l(left_n) and not is_l(right_n), "neurological: the axial view is not L | R"
    assert left_r.shape == right_n.shape and (left_r == right_n).mean() > 0.8  # the same R, drawn alike
