"""The quickstart, change and similarity notebooks served by Voila (live kernel, local widget
bundles) through the offline launcher (notebooks/offline.py: offline copies of the notebooks, the
local stand-ins' environment for the Voila process and its kernels) and opened in Debian's headless
Chromium through Playwright: the map is not blank, the
embedding overlay is there, a slider moved in the page redraws the change layer in the kernel, and
a mouse click on the map runs a similarity query (a click beside the data shows a message), and
clicks on notebook 03's series map plot a position's distance over time: the red change-date line
on the test scene's known change (tests/support/scene.py), none far from it.

Set TERRAFM_UPDATE_SCREENSHOTS=1 to copy the screenshots to docs/ (they are shown in README).
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("TERRAFM_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's browser with `apt-get install -y chromium` "
                    "(.ci/run does); Playwright's own download is not used")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium")), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1200, "height": 1100})
        yield context
        context.close()


class Voila:
    """``voila notebook.ipynb`` on 127.0.0.1 with isolated Jupyter dirs; stopped by its PID."""

    def __init__(self, notebook: Path, env: dict, workdir: Path):
        self.port = _free_port()
        home = workdir / "home"
        for sub in ("config", "data", "runtime"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        env = {**env, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home / "config"),
               "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
        self.log = open(workdir / "voila.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voila", "--no-browser", f"--port={self.port}", "--Voila.ip=127.0.0.1",
             "--VoilaConfiguration.file_allowlist=['.*']", notebook.name],
            cwd=notebook.parent, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:  # wait for the port; a GET of / would start a kernel
            if self.proc.poll() is not None:
                raise RuntimeError(f"voila exited: {(workdir / 'voila.log').read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def offline_copies(offline_stack, tmp_path_factory) -> Path:
    """Offline copies of the three notebooks (settings cell rewritten by the launcher)."""
    from offline import write_offline_copies

    folder = tmp_path_factory.mktemp("notebooks")
    write_offline_copies(offline_stack, ["01_quickstart.ipynb", "03_change_detection.ipynb",
                                         "04_similarity_search.ipynb"], folder)
    return folder


@pytest.fixture(scope="module")
def voila_env(offline_stack):
    return offline_stack.environment(OMP_NUM_THREADS="1")


def coloured_pixels(png: bytes) -> int:
    """Pixels far from grey (max - min channel > 40): overlay colours, not an empty tile grid."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((rgb.max(-1) - rgb.min(-1)) > 40).sum())


def _open(context, voila: Voila, timeout_ms: int = 90_000):
    page = context.new_page()
    page.goto(voila.url, timeout=timeout_ms)
    page.wait_for_selector("img.leaflet-image-layer", timeout=timeout_ms)
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.leaflet-image-layer')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=timeout_ms)
    page.wait_for_timeout(500)
    return page


def _save(page, element, name: str, tmp_path: Path) -> bytes:
    """Screenshot of the map (returned) and of the whole app around it (saved, docs/ on request)."""
    shot = element.screenshot()
    app = element.evaluate_handle("e => e.closest('.widget-vbox') || e").as_element()
    (tmp_path / f"{name}.png").write_bytes(app.screenshot())
    if os.environ.get("TERRAFM_UPDATE_SCREENSHOTS"):
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(tmp_path / f"{name}.png", REPO / "docs" / f"{name}.png")
    return shot


def test_quickstart_map_renders_with_the_embedding_layer(browser_context, offline_copies, voila_env, tmp_path):
    voila = Voila(offline_copies / "01_quickstart.ipynb", voila_env, tmp_path)
    try:
        page = _open(browser_context, voila)
        maps = page.query_selector_all(".leaflet-container")
        assert len(maps) == 1
        images = page.query_selector_all("img.leaflet-image-layer")
        assert len(images) == 1 and images[0].get_attribute("src").startswith("data:image/png;base64,")
        assert page.query_selector(".terrafm-legend") is None  # an RGB layer has no legend
        box = maps[0].bounding_box()
        assert box["width"] > 300 and box["height"] > 300
        shot = _save(page, maps[0], "quickstart_map", tmp_path)
        assert coloured_pixels(shot) > 20_000, "the map area is blank"
        assert "Traceback" not in page.content()
    finally:
        voila.stop()


def test_change_explorer_in_the_browser(browser_context, offline_copies, voila_env, offline_stack, tmp_path):
    voila = Voila(offline_copies / "03_change_detection.ipynb", voila_env, tmp_path)
    try:
        page = _open(browser_context, voila, timeout_ms=300_000)  # Voila runs every cell first: two embeds
        maps = page.query_selector_all(".leaflet-container")
        assert len(maps) == 2  # the two-season pair, then the series
        assert len(maps[0].query_selector_all("img.leaflet-image-layer")) == 2  # distance + changed
        assert page.query_selector(".terrafm-colorbar") is not None
        assert page.query_selector(".terrafm-error") is None
        shot = _save(page, maps[0], "change_explorer", tmp_path)
        assert coloured_pixels(shot) > 20_000, "the map area is blank"
        # move the threshold slider to its maximum with the keyboard: the kernel re-thresholds and the
        # 'changed' overlay (the pair map's last image layer) gets a new picture
        before = maps[0].query_selector_all("img.leaflet-image-layer")[-1].get_attribute("src")
        handle = page.query_selector(".widget-slider .noUi-handle")
        handle.focus()
        page.keyboard.press("End")
        page.wait_for_function(
            "() => { const m = document.querySelector('.terrafm-message');"
            " return m && m.innerText.includes('0.0% of valid positions changed'); }", timeout=30_000)
        readout = page.inner_text(".widget-slider .widget-readout")
        after = maps[0].query_selector_all("img.leaflet-image-layer")[-1].get_attribute("src")
        assert after != before, "the changed layer was not redrawn"
        assert float(readout) > 0
        _series_click(page, maps[1], offline_stack.scene, tmp_path)
    finally:
        voila.stop()


LONLAT = re.compile(r"\((-?\d+\.\d+), (-?\d+\.\d+)\)")
TRAJECTORY, THRESHOLD, CHANGE = "31, 119, 180", "136, 136, 136", "214, 39, 40"  # bqplot line colours (RGB)


def _mercator_y(lat: float) -> float:
    return math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))


def _click_series(page, series_map, x: float, y: float) -> tuple[str, tuple[float, float], dict]:
    """Click the series map at page point (x, y); wait for the kernel's answer and the redrawn plot.
    Returns the message, the (lon, lat) it names and the plot's lines by colour (style, points, shown)."""
    map_box = series_map.bounding_box()  # clear of the map's corner controls
    assert map_box["x"] + 60 < x < map_box["x"] + map_box["width"] - 60, (x, map_box)
    assert map_box["y"] + 90 < y < map_box["y"] + map_box["height"] - 60, (y, map_box)
    before = page.query_selector_all(".terrafm-message")[-1].inner_text()
    page.mouse.click(x, y)
    page.wait_for_function(
        "(before) => { const m = [...document.querySelectorAll('.terrafm-message')].pop();"
        " return m && m.innerText !== before && m.innerText.includes('persistent change'); }",
        arg=before, timeout=30_000)
    message = page.query_selector_all(".terrafm-message")[-1].inner_text()
    assert page.query_selector(".terrafm-error") is None, message
    figure = page.query_selector_all(".bqplot")[-1]
    # the change line's visibility is the last thing the click changes in the figure
    page.wait_for_function(
        "([f, want]) => { const p = [...f.querySelectorAll('path.line')].find("
        "  q => (q.getAttribute('style') || '').includes('214, 39, 40'));"
        " return p && (p.closest('g[style*=\"display: none\"]') === null) === want; }",
        arg=[figure, "First persistent change" in message], timeout=30_000)
    lines = figure.evaluate(
        "f => [...f.querySelectorAll('path.line')].map(p => ({style: p.getAttribute('style') || '',"
        " d: p.getAttribute('d') || '', shown: p.closest('g[style*=\"display: none\"]') === null}))")
    by_colour = {}
    for colour in (TRAJECTORY, THRESHOLD, CHANGE):
        line = next(line for line in lines if colour in line["style"])
        points = [(float(a), float(b)) for a, b in re.findall(r"[ML]\s*(-?[\d.e+-]+)[ ,]\s*(-?[\d.e+-]+)", line["d"])]
        by_colour[colour] = {**line, "points": points}
    found = LONLAT.search(message)
    assert found, message
    return message, (float(found.group(1)), float(found.group(2))), by_colour


def _series_click(page, series_map, scene, tmp_path: Path) -> None:
    """The series app: a click draws that position's distance over time in the bqplot figure (one point
    per date, the dashed threshold) and names its first persistent change, or that there is none.

    Far from the test scene's known change (``scene.change_bounds``: an 840 m block that changed on
    ``scene.change_date``) the red change line stays hidden. Two such clicks also measure the page ->
    lon/lat mapping the map itself uses (the lon/lat the kernel reports; Web Mercator is linear in page
    pixels on each axis), which places a third click in the middle of the block: its message names the
    change date and the red line stands on the trajectory's vertex of that date."""
    from pyproj import Transformer

    series_map.scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    images = series_map.query_selector_all("img.leaflet-image-layer")
    assert len(images) == 4  # the first-last pair (distance, changed), first persistent change, distance to baseline
    box = images[-1].bounding_box()
    first_change_src = images[2].get_attribute("src")
    slider_dates = page.query_selector_all(".widget-slider")[-1].inner_text()
    assert slider_dates.strip(), "the date slider shows no date"
    to_utm = Transformer.from_crs(4326, scene.epsg, always_xy=True)
    left, bottom, right, top = scene.change_bounds

    # 1. far from the block (west and south of it; clear on every date): no persistent change, red line hidden
    clicks = []
    for fx, fy in ((0.12, 0.88), (0.85, 0.72)):
        x, y = round(box["x"] + fx * box["width"]), round(box["y"] + fy * box["height"])
        message, lonlat, lines = _click_series(page, series_map, x, y)
        ux, uy = to_utm.transform(*lonlat)
        assert not (left - 300 < ux < right + 300 and bottom - 300 < uy < top + 300), (lonlat, scene.change_bounds)
        assert "No persistent change" in message, message
        assert not lines[CHANGE]["shown"], message
        assert _alpha_at(first_change_src, images[2].bounding_box(), x, y) == 0  # the change layer agrees
        trajectory, threshold = lines[TRAJECTORY], lines[THRESHOLD]
        assert trajectory["shown"] and len(trajectory["points"]) >= 3     # one vertex per valid date
        assert threshold["shown"] and "dasharray: 10" in threshold["style"]
        clicks.append(((x, y), lonlat))

    # 2. the middle of the block, placed with the mapping the two clicks measured
    ((x1, y1), (lon1, lat1)), ((x2, y2), (lon2, lat2)) = clicks
    lon, lat = Transformer.from_crs(scene.epsg, 4326, always_xy=True).transform((left + right) / 2, (bottom + top) / 2)
    x = x1 + (lon - lon1) * (x2 - x1) / (lon2 - lon1)
    y = y1 + (_mercator_y(lat) - _mercator_y(lat1)) * (y2 - y1) / (_mercator_y(lat2) - _mercator_y(lat1))
    x, y = round(x), round(y)
    message, lonlat, lines = _click_series(page, series_map, x, y)
    ux, uy = to_utm.transform(*lonlat)
    assert abs(ux - (left + right) / 2) < 40 and abs(uy - (bottom + top) / 2) < 40, (lonlat, scene.change_bounds)
    assert f"First persistent change: {scene.change_date.date()}." in message, message
    assert _alpha_at(first_change_src, images[2].bounding_box(), x, y) > 0
    trajectory, change = lines[TRAJECTORY], lines[CHANGE]
    figure = page.query_selector_all(".bqplot")[-1]
    assert len(figure.query_selector_all("path.dot")) == len(trajectory["points"]) >= 3
    # the block is clear on every date, so its trajectory has a vertex for each series date; the dates
    # before the change (the baseline and those up to change_step) are all in the series
    assert change["shown"] and len(change["points"]) == 2 and change["points"][0][0] == change["points"][1][0]
    change_x = change["points"][0][0]
    vertex_x = trajectory["points"][scene.change_step][0]
    assert abs(change_x - vertex_x) < 1.0, (change_x, [p[0] for p in trajectory["points"]])
    assert all(abs(change_x - p[0]) > 10 for i, p in enumerate(trajectory["points"]) if i != scene.change_step)
    (tmp_path / "series_trajectory.png").write_bytes(figure.screenshot())


def _alpha_at(src: str, box: dict, x: float, y: float) -> int:
    """Opacity (0-255) of the overlay picture ``src`` (drawn in ``box``) at page point (x, y)."""
    import base64

    from PIL import Image

    rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGBA"))
    h, w = rgba.shape[:2]
    return int(rgba[int((y - box["y"]) / box["height"] * h), int((x - box["x"]) / box["width"] * w), 3])


def _png_pixels(src: str) -> np.ndarray:
    import base64

    from PIL import Image

    assert src.startswith("data:image/png;base64,"), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")).astype(int)


def _near_colour_at(src: str, box: dict, x: float, y: float, colour, tol: int = 8) -> bool:
    """Whether the overlay picture ``src`` (drawn in ``box``) has ``colour`` within one pixel of page point (x, y)."""
    rgb = _png_pixels(src)
    h, w = rgb.shape[:2]
    col = int((x - box["x"]) / box["width"] * w)
    row = int((y - box["y"]) / box["height"] * h)
    patch = rgb[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2]
    return bool((np.abs(patch - np.asarray(colour)).max(-1) <= tol).any())


QUERY_MARKER = "path.leaflet-interactive[fill='#ff00aa']"


def test_similarity_click_in_the_browser(browser_context, offline_copies, voila_env, tmp_path):
    """A real mouse click on the map reaches the kernel: new similarity picture, query marker under the
    pointer, top-k markers redrawn, and the clicked place has similarity 1 (magma's top colour).
    A click beside the data shows the error in the page."""
    from matplotlib import colormaps

    top = np.round(np.asarray(colormaps["magma"](1.0)[:3]) * 255).astype(int)
    voila = Voila(offline_copies / "04_similarity_search.ipynb", voila_env, tmp_path)
    try:
        page = _open(browser_context, voila, timeout_ms=300_000)  # Voila runs every cell first: two embeds + an index
        page.wait_for_selector(QUERY_MARKER, timeout=30_000)
        maps = page.query_selector_all(".leaflet-container")
        assert len(maps) == 1
        images = page.query_selector_all("img.leaflet-image-layer")
        assert len(images) == 2  # PCA colours + similarity
        assert len(page.query_selector_all("path.leaflet-interactive")) == 16  # 15 matches + the query
        assert page.query_selector(".terrafm-error") is None
        message_before = page.inner_text(".terrafm-message")
        similarity_before = images[-1].get_attribute("src")
        marker_before = page.query_selector(QUERY_MARKER).bounding_box()

        # a point inside the data, a quarter of the way in from the overlay's top-left corner
        # (the starting query is the centre), clear of the map's corner controls
        box = images[0].bounding_box()
        x, y = box["x"] + 0.27 * box["width"], box["y"] + 0.3 * box["height"]
        map_box = maps[0].bounding_box()
        assert map_box["x"] + 60 < x < map_box["x"] + map_box["width"] - 60
        assert map_box["y"] + 90 < y < map_box["y"] + map_box["height"] - 60
        assert not _near_colour_at(similarity_before, images[-1].bounding_box(), x, y, top)
        page.mouse.click(x, y)
        page.wait_for_function(
            "(before) => { const m = document.querySelector('.terrafm-message');"
            " return m && m.innerText.startsWith('Query') && m.innerText !== before; }",
            arg=message_before, timeout=30_000)
        page.wait_for_function(
            "(before) => { const i = [...document.querySelectorAll('img.leaflet-image-layer')].pop();"
            " return i.getAttribute('src') !== before && i.complete && i.naturalWidth > 0; }",
            arg=similarity_before, timeout=30_000)
        page.wait_for_timeout(300)
        assert page.query_selector(".terrafm-error") is None
        images = page.query_selector_all("img.leaflet-image-layer")
        assert len(images) == 2
        marker = page.query_selector(QUERY_MARKER).bounding_box()
        centre = (marker["x"] + marker["width"] / 2, marker["y"] + marker["height"] / 2)
        assert abs(centre[0] - x) < 3 and abs(centre[1] - y) < 3, (centre, (x, y))
        assert abs(marker["x"] - marker_before["x"]) > 20 or abs(marker["y"] - marker_before["y"]) > 20
        assert len(page.query_selector_all("path.leaflet-interactive")) == 16
        similarity_after = images[-1].get_attribute("src")
        assert _near_colour_at(similarity_after, images[-1].bounding_box(), x, y, top), \
            "the clicked place is not at similarity 1 in the new layer"
        _save(page, maps[0], "similarity_click", tmp_path)
        # a click beside the data: the message line says so, in the page, and the layer stays
        outside_x = (map_box["x"] + 70 + box["x"]) / 2
        assert outside_x < box["x"] - 20
        page.mouse.click(outside_x, box["y"] + box["height"] / 2)
        page.wait_for_selector(".terrafm-error", timeout=30_000)
        assert "outside the data" in page.inner_text(".terrafm-error")
        assert page.query_selector_all("img.leaflet-image-layer")[-1].get_attribute("src") == similarity_after
    finally:
        voila.stop()
