"""The viewer: its wire format and GLB, the self-contained page ``vrn-reconstruct
--formats html`` writes, and that page in a real browser (headless Chromium, software
WebGL): it renders the bundled photo's mesh with the GLB's counts, face-coloured
pixels land where the mesh projects, the overlay sits on the face, and a drag orbits.

The browser tests skip, saying why, where Chromium, chromedriver or selenium is missing
(``make test`` installs Chromium where it can). :func:`browser` is shared with
``test_web.py``."""

from __future__ import annotations

import base64
import json
import re
import shutil
import time

import cv2
import numpy as np
import pytest
import trimesh

from vrn.runtime.mesh import FaceMesh, mesh_bytes
from vrn.viewer.assets import model_label, script_json
from vrn.viewer.encode import decode_message, frame_message, merge_meshes, mesh_message
from vrn.viewer.static_page import static_page

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                  "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
                  "--window-size=1280,760", "--force-device-scale-factor=1")
BACKGROUND = (0x20, 0x22, 0x26)  # the 3D view's clear colour (viewer.js)


def random_mesh(rng, n: int = 500, m: int = 900, offset=(100.0, 50.0, 0.0)) -> FaceMesh:
    vertices = (rng.uniform(0, 200, (n, 3)) + offset).astype(np.float32)
    return FaceMesh(vertices, rng.integers(0, n, (m, 3)).astype(np.int32),
                    rng.integers(0, 256, (n, 3)).astype(np.uint8))


# ------------------------------------------------------------------ without a browser

def test_mesh_message_round_trip():
    rng = np.random.default_rng(0)
    a, b = random_mesh(rng), random_mesh(rng, 300, 400, offset=(900.0, 700.0, -40.0))
    tag, header, body = decode_message(mesh_message([a, b], 17))
    assert tag == b"MESH" and header["frame"] == 17
    n, m = header["vertices"], header["triangles"]
    assert (n, m) == (800, 1300)
    sections = header["sections"]
    assert all(offset % 4 == 0 for offset in sections.values())
    q = np.frombuffer(body, "<u2", n * 3, sections["vertices"]).reshape(n, 3)
    faces = np.frombuffer(body, "<u4", m * 3, sections["triangles"]).reshape(m, 3)
    colors = np.frombuffer(body, np.uint8, n * 3, sections["colors"]).reshape(n, 3)
    merged = merge_meshes([a, b])
    vertices = np.array(header["origin"]) + q * np.array(header["scale"])
    # Quantised to 16 bits over the box: half a step off (and float32 rounding).
    assert np.abs(vertices - merged.vertices).max() <= max(header["scale"]) / 2 + 1e-4
    assert np.array_equal(faces, np.concatenate([a.faces, b.faces + 500]))
    assert np.array_equal(colors, merged.colors)
    # Compact: 6 + 12 * M / N + 3 bytes a vertex, plus a short header.
    assert len(body) == n * 6 + m * 12 + n * 3


def test_mesh_message_without_a_face():
    tag, header, body = decode_message(mesh_message([], 3))
    assert tag == b"MESH" and header["vertices"] == header["triangles"] == 0
    assert len(body) == 0


def test_frame_message_is_a_jpeg_with_the_full_size():
    image = np.zeros((600, 1200, 3), np.uint8)
    image[:, :600] = (255, 0, 0)
    tag, header, body = decode_message(frame_message(image, 5, max_side=480))
    assert tag == b"JPEG" and header == {"frame": 5, "width": 1200, "height": 600}
    decoded = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (240, 480, 3)                  # shrunk for the wire
    assert decoded[120, 100, 2] > 200 and decoded[120, 400, 2] < 50  # RGB in, red left


def test_static_page_is_self_contained_and_escaped():
    rng = np.random.default_rng(1)
    mesh = random_mesh(rng)
    photo = rng.integers(0, 256, (240, 320, 3)).astype(np.uint8)
    model = {"name": "Net </script><b>x</b>", "detail": "a & b"}
    page = static_page(mesh, photo, timings_ms={"infer": 12.5}, model=model,
                       title="<photo>.jpg")
    # Nothing is fetched: every module is a data: URL, no http(s) address anywhere.
    imports = json.loads(re.search(r'<script type="importmap">(.*?)</script>', page,
                                   re.S).group(1))["imports"]
    assert set(imports) == {"three", "three/addons/controls/OrbitControls.js"}
    assert all(url.startswith("data:text/javascript;base64,") for url in imports.values())
    assert not re.search(r"https?://", page.replace("http://www.w3.org", ""))
    assert "<title>&lt;photo&gt;.jpg</title>" in page
    # The data element cannot be ended early by a string in it.
    data_text = re.search(r'<script type="application/json" id="vrn-data">(.*?)</script>',
                          page, re.S).group(1)
    data = json.loads(data_text)
    assert data["model"] == model and data["timings"] == {"infer": 12.5}
    assert (data["photo"]["width"], data["photo"]["height"]) == (320, 240)
    glb = base64.b64decode(data["mesh"]["glb"])
    assert glb == mesh_bytes(mesh, "glb")
    loaded = trimesh.load(trimesh.util.wrap_as_stream(glb), file_type="glb", process=False,
                          force="mesh")
    # glTF's frame: y up, and the mirror undone by reversing each triangle's winding
    assert np.allclose(loaded.vertices, mesh.vertices * [1, -1, 1], atol=1e-4)
    assert np.array_equal(loaded.faces, mesh.faces[:, ::-1])
    assert script_json("</script>") == '"\\u003c/script\\u003e"'


def test_model_label():
    assert model_label(None)["name"].startswith("unknown model")

    class Info:
        architecture, bn_mode, trained, provenance = "VRN", "instance", False, "seeded"

    label = model_label(Info())
    assert "NOT trained" in label["name"] and label["detail"] == "seeded"


# ----------------------------------------------------------------------- in a browser

def _which(*names: str) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (WebGL in software) through chromedriver; skips where absent."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
    from selenium.webdriver.chrome.service import Service

    chrome = _which("chromium", "chromium-browser", "google-chrome")
    driver = _which("chromedriver")
    if chrome is None or driver is None:
        pytest.skip("no Chromium/chromedriver here: apt-get install chromium "
                    "chromium-driver (`make test` does where it can)")
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=Service(driver))
    session.set_script_timeout(30)
    yield session
    session.quit()


def wait_for(session, script: str, timeout: float = 60.0, what: str = "the page"):
    """Poll ``script`` (JavaScript returning a value) until it is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = session.execute_script(script)
        if value:
            return value
        error = session.execute_script("return document.documentElement.dataset.error")
        assert not error, f"{what} reported an error: {error}"
        time.sleep(0.1)
    raise AssertionError(f"{what}: timed out after {timeout:.0f} s waiting for {script}")


def screenshot(element) -> np.ndarray:
    """An element's pixels, ``(H, W, 3)`` uint8 RGB."""
    png = np.frombuffer(element.screenshot_as_png, np.uint8)
    return cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def next_frames(session, frames: int = 2) -> None:
    """Wait until the page has painted ``frames`` more frames."""
    session.execute_async_script(
        "const done = arguments[arguments.length - 1]; let left = arguments[0];"
        "const tick = () => (--left > 0 ? requestAnimationFrame(tick) : done());"
        "requestAnimationFrame(tick);", frames)


def rendered_after(session, action) -> None:
    """Run ``action`` and wait until the page has drawn a frame after it."""
    session.execute_script("window.__drawn = false; const v = window.vrnViewer;"
                           "const old = v.onRender; v.onRender = () => {"
                           "window.__drawn = true; v.onRender = old; };")
    action()
    wait_for(session, "return window.__drawn", 30, "a redraw")


@pytest.fixture(scope="module")
def astronaut_page(tmp_path_factory):
    """``vrn-reconstruct --sample --formats glb,html`` (the shipped default model)."""
    from vrn.cli.reconstruct import main

    out = tmp_path_factory.mktemp("static")
    assert main(["--sample", "-o", str(out), "--formats", "glb,html"]) == 0
    return out / "astronaut.html", out / "astronaut.glb"


def test_static_page_in_chromium(browser, astronaut_page):
    from selenium.webdriver.common.action_chains import ActionChains

    page, glb_path = astronaut_page
    glb = trimesh.load(glb_path, process=False, force="mesh")
    photo_vertices = glb.vertices * [1, -1, 1]  # the GLB is in glTF's y-up frame
    browser.get(page.as_uri())
    wait_for(browser, "return document.documentElement.dataset.rendered === 'true'",
             what="the static page")
    state = browser.execute_script("return window.vrnViewer.state")
    assert (state["vertices"], state["faces"]) == (len(glb.vertices), len(glb.faces))
    assert f"{len(glb.vertices):,} vertices" in browser.find_element("id", "status").text
    assert "VRNLandmarkGuided" in browser.find_element("id", "model").text
    assert "isosurface" in browser.find_element("id", "timings").text
    # Offline: nothing but the page itself was fetched (its modules are data: URLs).
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert not [url for url in fetched if url.startswith(("http:", "https:"))]

    view = browser.find_element("id", "view")
    front = screenshot(view).astype(int)
    h, w = front.shape[:2]
    # Where sampled vertices project, the pixels are the mesh's, in its colours.
    rng = np.random.default_rng(0)
    picked = rng.choice(len(glb.vertices), 400, replace=False)
    points = browser.execute_script("return window.vrnViewer.projectToView(arguments[0])",
                                    photo_vertices[picked].tolist())
    xy = np.rint(np.array(points)[:, :2]).astype(int)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    assert inside.all()
    pixels = front[xy[:, 1], xy[:, 0]]
    colors = glb.visual.vertex_colors[picked, :3].astype(int)
    background = np.abs(pixels - BACKGROUND).sum(1) < 12
    assert background.mean() < 0.02, "the mesh is not drawn where it projects"
    # Shading scales brightness; the hue is the vertex colours' (skin, hair, not grey).
    chroma = lambda c: c / np.maximum(c.sum(1, keepdims=True), 1)  # noqa: E731
    assert np.median(np.abs(chroma(pixels) - chroma(colors)).sum(1)) < 0.08
    assert np.corrcoef(pixels.sum(1), colors.sum(1))[0, 1] > 0.5
    corners = np.concatenate([front[:8, :8], front[-8:, -8:]]).reshape(-1, 3)
    assert (np.abs(corners - BACKGROUND).sum(1) < 12).all()

    # The overlay: the photo with the mesh over it differs from the photo alone exactly
    # around the face (the mesh's box in the photo, scaled to the page).
    stack = browser.find_element("css selector", ".stack")
    with_mesh = screenshot(stack).astype(int)
    toggle = browser.find_element("id", "show-overlay")
    toggle.click()
    next_frames(browser)
    photo_only = screenshot(stack).astype(int)
    toggle.click()
    next_frames(browser)
    changed = np.abs(with_mesh - photo_only).sum(2) > 30
    ys, xs = np.nonzero(changed)
    scale = with_mesh.shape[1] / 512
    box = np.array([photo_vertices[:, 0].min(), photo_vertices[:, 1].min(),
                    photo_vertices[:, 0].max(), photo_vertices[:, 1].max()]) * scale
    seen = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
    assert np.abs(seen - box).max() < 0.05 * (box[2] - box[0]), (seen, box)

    # A drag orbits the mesh; Front puts it back; Side and wireframe change it again.
    rendered_after(browser, lambda: ActionChains(browser).move_to_element(view)
                   .click_and_hold().move_by_offset(140, 30).release().perform())
    orbited = screenshot(view).astype(int)
    assert np.abs(orbited - front).mean() > 4
    rendered_after(browser, lambda: browser.find_element("id", "front").click())
    assert np.abs(screenshot(view).astype(int) - front).mean() < 1
    rendered_after(browser, lambda: browser.find_element("id", "side").click())
    assert np.abs(screenshot(view).astype(int) - front).mean() > 4
    rendered_after(browser, lambda: browser.find_element("id", "front").click())
    rendered_after(browser, lambda: browser.find_element("id", "wireframe").click())
    assert np.abs(screenshot(view).astype(int) - front).mean() > 1
