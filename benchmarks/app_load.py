"""The web app under load: 1, 4 and 8 users at once on one real ``neuromap app`` server, each in its own Chromium
context (Playwright), each uploading a different full BraTS case (240x240x155, four sequences) and pressing Segment
at the same moment; the shipped default model (the page's automatic choice), ``--workers 1`` unless told.

Per wave (a fresh server each, so its peak memory is its own): one untimed user first, who presses Segment and
closes the tab once the page shows that the case is being read (so the model is loaded, and on a new machine the
engine cache filled; its job is cancelled at its next stage and its folder deleted), then the N users: the pages
are loaded and the files uploaded, then Segment is pressed on every page in turn and each page is watched until it
shows "Done: <its case>". Measured:
  - throughput: N cases / (last page done - first Segment pressed), in cases per minute of wall time, and per
    minute of the server's CPU time (user + system, all its threads, from /proc: the work itself, which a busy
    machine does not inflate as it inflates wall time);
  - each user's wait, Segment to Done, and the places in the queue the pages showed right after Segment;
  - the server's peak resident memory (VmHWM of the Streamlit process) over the wave and its warm-up, and its
    resident memory once every page shows its result (all sessions open) and after the tabs are closed;
  - that every page got its own case (the result heading names it) and that no session folder is left once the
    tabs are closed (the server still running).
The browser does not load the NiiVue viewer (its component route is blocked: on a machine without a GPU it draws
with a software renderer, which would compete with the server for the CPU). The browser runs on the same machine:
its CPU time is not the server's, but it is taken from the same cores, so wall-time rates are lower bounds.

    python benchmarks/app_load.py [--users 1 4 8] [--workers 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from machine import cpu_info, load_now

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_app_browser import CHROMIUM, CHROMIUM_ARGS, app_process  # noqa: E402  (the browser test's setup)

DATA = ROOT.parent / "shared" / "data" / "brats2018"
RESULT = ROOT / "benchmarks" / "results" / "app_load.json"
SEQUENCES = ("t1", "t1ce", "t2", "flair")
TICKS = os.sysconf("SC_CLK_TCK")


class Server:
    """``neuromap app`` in its own process group with a private TMPDIR; ``pid`` is the Streamlit process the
    command starts (the one that holds the sessions, the queue and the models)."""

    def __init__(self, url: str, process: subprocess.Popen, tmp: Path) -> None:
        self.url, self.process, self.tmp = url, process, tmp
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        self.pid = int(children[0])

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime

    def memory_mb(self, key: str) -> float:
        """VmHWM (peak resident set) or VmRSS (now) of the server process, in MB."""
        line = next(x for x in Path(f"/proc/{self.pid}/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) / 1024

    def session_folders(self) -> list[Path]:
        return list(self.tmp.glob("neuromap-app-*"))


@contextlib.contextmanager
def running_server(tmp: Path, workers: int) -> Iterator[Server]:
    server_tmp = tmp / "server-tmp"
    server_tmp.mkdir()
    with app_process(["--workers", str(workers)], tmp / "server.log", server_tmp, 300) as (url, process):
        yield Server(url, process, server_tmp)


def open_user(browser, url: str, case: Path):
    """A new browser context on the page with ``case`` uploaded and the automatic model chosen."""
    context = browser.new_context()
    context.route("**/component/**", lambda route: route.abort())  # no viewer (see the module docstring)
    page = context.new_page()
    page.set_default_timeout(600_000)
    page.goto(url)
    page.get_by_role("heading", name="NeuroMap: brain tumour segmentation").wait_for()
    page.get_by_test_id("stFileUploader").first.locator("input[type=file]").set_input_files(
        [str(case / f"{case.name}_{m}.nii.gz") for m in SEQUENCES])
    page.get_by_text("Automatic choice:").wait_for()
    return context, page


def progress_text(page) -> str:
    bar = page.get_by_test_id("stProgress")
    return bar.first.inner_text() if bar.count() else ""


def wave(browser, server: Server, cases: list[Path]) -> dict:
    """N users at once (see the module docstring); returns what was measured."""
    users = [open_user(browser, server.url, case) for case in cases]
    cpu0, t0 = server.cpu_s(), time.monotonic()
    for _, page in users:
        page.get_by_role("button", name="Segment").click()
    for _, page in users:
        page.get_by_test_id("stProgress").first.wait_for()
    places = [progress_text(page) for _, page in users]
    done: dict[str, float] = {}
    while len(done) < len(users):
        for case, (_, page) in zip(cases, users, strict=True):
            if case.name not in done and page.get_by_text(f"Done: {case.name} in").count():
                done[case.name] = time.monotonic() - t0
        time.sleep(0.5)
    wall, cpu = max(done.values()), server.cpu_s() - cpu0
    own = all(page.get_by_text(f"Result: {case.name}").count() == 1 for case, (_, page) in zip(cases, users,
                                                                                              strict=True))
    rss_open = server.memory_mb("VmRSS")
    for context, _ in users:
        context.close()
    deadline = time.monotonic() + 60
    while server.session_folders() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(5)
    return {"users": len(cases), "cases": [c.name for c in cases], "wall_s": round(wall, 1),
            "rss_results_open_mb": round(rss_open, 1), "rss_tabs_closed_mb": round(server.memory_mb("VmRSS"), 1),
            "server_cpu_s": round(cpu, 1), "cases_per_min": round(60 * len(cases) / wall, 2),
            "cases_per_server_cpu_min": round(60 * len(cases) / cpu, 2),
            "done_after_s": {k: round(v, 1) for k, v in done.items()}, "shown_after_segment": places,
            "every_page_its_own_case": own, "session_folders_left": len(server.session_folders())}


def warm_up(browser, server: Server, case: Path) -> float:
    """The untimed first user (see the module docstring); returns its seconds from Segment to the closed tab."""
    context, page = open_user(browser, server.url, case)
    start = time.monotonic()
    page.get_by_role("button", name="Segment").click()
    page.get_by_text("Reading the sequences").wait_for()
    context.close()
    return time.monotonic() - start


def measure(users: int, workers: int, cases: list[Path]) -> dict:
    from playwright.sync_api import sync_playwright

    with (tempfile.TemporaryDirectory(prefix="neuromap-app-load-") as tmp, running_server(Path(tmp), workers) as server,
          sync_playwright() as pw):
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            load_before = load_now()
            warm = warm_up(browser, server, cases[-1])
            deadline = time.monotonic() + 120
            while server.session_folders() and time.monotonic() < deadline:
                time.sleep(0.5)
            rss_idle = server.memory_mb("VmRSS")
            measured = wave(browser, server, cases[:users])
            return {**measured, "workers": workers, "warm_up_wall_s": round(warm, 1),
                    "rss_after_warm_up_mb": round(rss_idle, 1), "peak_rss_mb": round(server.memory_mb("VmHWM"), 1),
                    "load_before": load_before, "load_after": load_now()}
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path, default=RESULT)
    args = parser.parse_args()
    cases = sorted(p for p in DATA.iterdir() if p.is_dir())
    if len(cases) < max(args.users) + 1:
        raise SystemExit(f"{DATA}: need {max(args.users) + 1} cases (one per user and one to warm up)")
    results = {"machine": cpu_info(), "model": "shipped default (the page's automatic choice)", "waves": []}
    for users in args.users:
        measured = measure(users, args.workers, cases)
        results["waves"].append(measured)
        print(f"{users} users, {args.workers} worker(s): {measured['cases_per_min']:.2f} cases/min "
              f"({measured['cases_per_server_cpu_min']:.2f} per server CPU min), peak RSS "
              f"{measured['peak_rss_mb']:.0f} MB, last done after {measured['wall_s']:.0f} s", flush=True)
    results["machine"]["load_avg_end"] = list(os.getloadavg())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
