"""The web app's NiiVue viewer component on its own in headless Chromium (no Streamlit server, no model): a host page
speaks Streamlit's component protocol to ``neuromap/viewer_web/index.html`` and sends it what the app sends
(`neuromap.app_viewer.component_args`) for a real BraTS case with its expert labels, so every tumour label is on
the slices through the tumour centre. Checks per-label opacity from the pixels: raising one label's opacity
moves that label's pixels towards its colour and leaves the others' pixels, and hiding it takes its colour away.
The whole app flow (upload, segment, the other viewer controls) is `tests/test_app_browser.py`'s."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from conftest import BRATS
from scipy import ndimage
from test_app_browser import BROWSER_MARKS, CASE, CHROMIUM, CHROMIUM_ARGS, LOAD_TIMEOUT_MS, pixels

from neuromap.app_viewer import WEB_DIR, component_args

pytestmark = BROWSER_MARKS

# The iframe gets the component's own page; the host answers its "componentReady" with the render message,
# the bytes arguments decoded from base64 into the Uint8Arrays Streamlit would send.
HOST = """<!doctype html><html><body style="margin:0">
<iframe id="viewer" src="viewer/index.html" style="width:1100px;height:900px;border:0"></iframe>
<script>
window.componentReady = new Promise((resolve) => {
  window.addEventListener("message", (event) => {
    if (event.data && event.data.type === "streamlit:componentReady") resolve();
  });
});
window.sendArgs = (args, binary) => {
  for (const [key, text] of Object.entries(binary)) {
    args[key] = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  }
  document.getElementById("viewer").contentWindow.postMessage({ type: "streamlit:render", args }, "*");
};
</script></body></html>"""


@contextlib.contextmanager
def served(root: Path) -> Iterator[str]:
    """A static file server for ``root`` on a free port, stopped afterwards."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


def case_args() -> tuple[dict, dict[str, str]]:
    """What the app sends for ``CASE`` shown with its expert labels: JSON arguments and base64 bytes arguments."""
    case = BRATS / CASE
    result = {"run": "expert", "inputs": {"flair": case / f"{CASE}_flair.nii.gz"},
              "labels_output": case / f"{CASE}_seg.nii.gz", "files": {},
              "report": {"model": {"task": "brats"}, "label_convention": "brats"}}
    args = component_args(result, {"flair": "FLAIR"})
    binary = {k: base64.b64encode(v).decode() for k, v in args.items() if isinstance(v, bytes)}
    return {k: v for k, v in args.items() if k not in binary}, binary


def change(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """How much each pixel changed (the largest of its R, G, B differences)."""
    return np.abs(after - before).max(axis=2)


def inside(mask: np.ndarray) -> np.ndarray:
    """``mask`` without its one-pixel rim: NiiVue draws the label layers with linear interpolation, so a pixel on a
    border between two labels mixes both colours and changes a little with either label's opacity."""
    return ndimage.binary_erosion(mask)


def test_per_label_opacity_changes_only_that_label(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    (tmp_path / "viewer").symlink_to(WEB_DIR)
    (tmp_path / "host.html").write_text(HOST)
    args, binary = case_args()
    with served(tmp_path) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1150, "height": 950})
            page.set_default_timeout(180_000)  # a screenshot waits for frames, which a loaded software GPU delays
            page.goto(f"{url}/host.html")
            page.wait_for_function("window.componentReady !== undefined")
            page.evaluate("window.componentReady")
            page.evaluate("([args, binary]) => window.sendArgs(args, binary)", [args, binary])
            frame = page.frame_locator("#viewer")
            frame.locator("body[data-ready=true]").wait_for(state="attached", timeout=LOAD_TIMEOUT_MS)
            page.wait_for_timeout(1500)
            canvas = frame.locator("#slices")
            tiles = json.loads(canvas.get_attribute("data-tiles"))
            assert set(tiles) == {"axial", "coronal", "sagittal"}
            shown = pixels(page, canvas)
            page.screenshot(path=str(tmp_path / "viewer_start.png"))
            steps = {}  # label name -> how much each pixel changed when its opacity went to 1
            for item in args["label_info"]:
                slider = frame.get_by_label(f"Opacity of {item['name']}")
                slider.fill("1", force=True)
                slider.dispatch_event("change")
                page.wait_for_timeout(1500)
                after = pixels(page, canvas)
                step = steps[item["name"]] = change(shown, after)
                own = inside(step > 12)
                assert own.sum() > 200, f"{item['name']}: opacity 1 changed only {own.sum()} pixels"
                colour = np.array([int(item["colour"][i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)
                closer = (np.linalg.norm(after[own] - colour, axis=1)
                          < np.linalg.norm(shown[own] - colour, axis=1)).mean()
                assert closer > 0.95, f"{item['name']}: only {closer:.0%} of the changed pixels moved to its colour"
                shown = after
            # Raising one label's opacity leaves the others' pixels as they were: on the inside of each other
            # label's pixels, the change is a small fraction of the change on its own (measured: 0-8 %).
            for a, step in steps.items():
                own = step[inside(step > 12)].mean()
                for b, other in steps.items():
                    spill = step[inside(other > 12)].mean()
                    assert b == a or spill < 0.15 * own, f"raising {a} changed {b} by {spill:.1f} (itself: {own:.1f})"
            page.screenshot(path=str(tmp_path / "viewer_opaque.png"))

            # Hiding the first label takes its colour away, and only where it was drawn.
            first = args["label_info"][0]
            frame.get_by_label(f"Show {first['name']}").uncheck(force=True)
            page.wait_for_timeout(1500)
            hidden = change(shown, pixels(page, canvas)) > 12
            drawn = ndimage.binary_dilation(steps[first["name"]] > 12, iterations=2)
            assert hidden.sum() > 200 and (hidden & drawn).sum() > 0.95 * hidden.sum(), [hidden.sum(), drawn.sum()]
        finally:
            browser.close()
