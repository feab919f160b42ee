"""Two users of one real `neuromap app` server (one worker) in two Chromium contexts: both press Segment at once,
one of them is queued behind the other and its page says so; closing that tab ends its session on the server (the
websocket closes and Streamlit releases the session's resources: `neuromap.app_jobs.end_session`), so its job is
dropped and its temp folder deleted while the server runs on; the other user still gets its own result, and its
folder goes when its tab closes. (That a queued job is dropped at once and a running one stopped first is proven
deterministically in `test_app_load.py`; here the tab is closed as soon as its page showed it waiting.) Needs the
Debian chromium and the team's data folder (skipped otherwise). The NiiVue viewer is not loaded (its component
route is blocked): `test_app_browser.py` drives it; here it would only cost the software GPU's time."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BRATS
from test_app_browser import CHROMIUM, CHROMIUM_ARGS, LOAD_TIMEOUT_MS, running_app

CASES = ("Brats18_2013_2_1", "Brats18_CBICA_AQQ_1")
SEQUENCES = ("t1", "t1ce", "t2", "flair")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.real,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} missing (apt-get install chromium; `make browser`)"),
    pytest.mark.skipif(not all((BRATS / c).is_dir() for c in CASES), reason=f"real cases in {BRATS} are absent"),
]


def folders(server_tmp: Path) -> set[Path]:
    return set(server_tmp.glob("neuromap-app-*"))


def eventually(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_closing_a_queued_users_tab_drops_its_job_and_folder(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    with running_app(tmp_path, server_tmp) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            users = {}
            for case in CASES:
                context = browser.new_context(accept_downloads=True)
                context.route("**/component/**", lambda route: route.abort())  # no viewer (see the docstring)
                page = context.new_page()
                page.set_default_timeout(60_000)
                page.goto(server)
                heading = page.get_by_role("heading", name="NeuroMap: brain tumour segmentation")
                heading.wait_for(timeout=LOAD_TIMEOUT_MS)
                page.get_by_test_id("stFileUploader").first.locator("input[type=file]").set_input_files(
                    [str(BRATS / case / f"{case}_{m}.nii.gz") for m in SEQUENCES])
                page.get_by_text("Model tiny.pt on T1, T1ce (contrast), T2, FLAIR").wait_for()
                users[case] = (context, page)
            assert eventually(lambda: len(folders(server_tmp)) == 2)  # one private folder per session
            for _, page in users.values():  # both at once: one runs, the other waits behind it
                page.get_by_role("button", name="Segment").click()
            seen: list[str] = []

            def someone_waits() -> bool:
                seen.extend(case for case, (_, page) in users.items()
                            if page.get_by_text("Waiting, 1 ahead (one segmentation runs at a time)").count())
                return bool(seen)

            shown = {case: page.get_by_test_id("stProgress") for case, (_, page) in users.items()}
            done = {case: page.get_by_text(f"Done: {case} in") for case, (_, page) in users.items()}
            assert eventually(someone_waits, 60), (  # what each page showed instead, for whoever reads a failure
                "neither page showed that it waits behind the other; progress bars: "
                f"{ {case: bar.all_inner_texts() for case, bar in shown.items()} }, "
                f"finished: {[case for case, text in done.items() if text.count()]}")
            waiting = seen[0]
            (running,) = set(CASES) - {waiting}
            before = folders(server_tmp)
            users[waiting][0].close()  # the queued user closes the tab
            assert eventually(lambda: len(folders(server_tmp)) == 1), "the closed session's folder was not deleted"

            context, page = users[running]
            page.get_by_text(f"Done: {running} in").wait_for(timeout=300_000)
            assert folders(server_tmp) < before  # the remaining folder is the running user's
            with page.expect_download() as download:
                page.get_by_role("button", name="Label map (NIfTI, input grid)").click()
            labels = nib.Nifti1Image.from_bytes(gzip.decompress(Path(download.value.path()).read_bytes()))
            source = nib.load(str(BRATS / running / f"{running}_t1.nii.gz"))
            assert labels.shape == source.shape and np.array_equal(labels.affine, source.affine)
            assert page.get_by_text(waiting).count() == 0  # nothing of the other user on this page
            context.close()
            assert eventually(lambda: not folders(server_tmp)), "the last session's folder outlived its tab"
        finally:
            browser.close()
