"""``vrn-live --web``: the server (routes, token, messages in order), its promises to
the pipeline (publishing never blocks, a stalled page only loses its own frames,
several pages, a page that leaves is forgotten), the command's one-line errors, and
the live page in headless Chromium on a test video."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from test_live import plane_weights, write_video  # noqa: F401  (a fixture, and a helper)
from test_viewer import browser, wait_for  # noqa: F401  (a fixture, and a helper)
from vrn.errors import VRNError
from vrn.runtime.mesh import FaceMesh
from vrn.viewer.encode import decode_message
from vrn.viewer.server import WebViewServer, is_loopback, parse_address

aiohttp = pytest.importorskip("aiohttp", reason="aiohttp is not installed (the web extra)")


def face_mesh(n: int, seed: int = 0) -> FaceMesh:
    rng = np.random.default_rng(seed)
    return FaceMesh(rng.uniform(100, 300, (n, 3)).astype(np.float32),
                    rng.integers(0, n, (2 * n, 3)).astype(np.int32),
                    rng.integers(0, 256, (n, 3)).astype(np.uint8))


def fake_frame(index: int, mesh: FaceMesh | None, size=(240, 320)):
    """What ``publish`` reads of a LiveFrame and a LiveStats."""
    image = np.full((*size, 3), index % 256, np.uint8)
    faces = [SimpleNamespace(mesh=mesh)] if mesh is not None else []
    item = SimpleNamespace(frame=SimpleNamespace(index=index, image=image),
                           result=SimpleNamespace(faces=faces))
    stats = SimpleNamespace(fps=12.5, frames=index + 1, stage_ms={"infer": [1.0]},
                            recent_ms=lambda stage: 40.0)
    return item, stats


@pytest.fixture
def server():
    with WebViewServer("127.0.0.1", 0) as web:
        yield web


def ws_url(web: WebViewServer, token: str | None = None) -> str:
    return f"ws://127.0.0.1:{web.port}/ws" + (f"?token={token}" if token else "")


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


async def _receive(ws, n: int) -> list:
    messages = []
    for _ in range(n):
        msg = await ws.receive(timeout=10)
        messages.append(msg.data)
    return messages


# -------------------------------------------------------------------------- addresses

@pytest.mark.parametrize("text, expected", [
    ("8080", ("127.0.0.1", 8080)), (":8080", ("127.0.0.1", 8080)),
    ("0.0.0.0:9000", ("0.0.0.0", 9000)), ("[::1]:80", ("::1", 80)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["abc", "host:", "1.2.3.4:70000", "::1:80", "", "80.5"])
def test_bad_addresses_are_refused(text):
    with pytest.raises(ValueError, match="bad address"):
        parse_address(text)


def test_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


# ----------------------------------------------------------------------------- server

def test_messages_in_order(server):
    server.set_info(model={"name": "VRN test", "detail": ""}, source="video.avi")
    mesh = face_mesh(1000)

    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url(server)) as ws:
                hello = json.loads((await ws.receive(timeout=10)).data)
                wait_until(lambda: server.clients == 1)
                server.publish(*fake_frame(7, mesh))
                return hello, await _receive(ws, 3)

    hello, (jpeg, mesh_bytes, stats) = asyncio.run(run())
    assert hello == {"type": "hello", "model": {"name": "VRN test", "detail": ""},
                     "source": "video.avi"}
    tag, header, body = decode_message(jpeg)
    assert tag == b"JPEG" and header == {"frame": 7, "width": 320, "height": 240}
    assert bytes(body[:2]) == b"\xff\xd8"
    tag, header, _ = decode_message(mesh_bytes)
    assert tag == b"MESH" and (header["frame"], header["vertices"]) == (7, 1000)
    stats = json.loads(stats)
    assert stats["type"] == "stats" and stats["frame"] == 7 and stats["fps"] == 12.5
    assert stats["stages_ms"] == {"infer": 40.0}


def test_routes_and_token():
    async def run(web):
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{web.port}"
            results = {}
            for path in ("/", "/?token=wrong", "/?token=s%20cret", "/static/viewer.js",
                         "/static/live_socket.js", "/static/page.html",
                         "/static/..%2Fserver.py", "/static/NOTICE.md"):
                async with session.get(base + path) as response:
                    results[path] = (response.status, response.content_type,
                                     await response.text())
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(ws_url(web))
            async with session.ws_connect(ws_url(web, "s%20cret")) as ws:
                hello = json.loads((await ws.receive(timeout=10)).data)
            return results, refused.value.status, hello

    with WebViewServer("127.0.0.1", 0, token="s cret") as web:
        assert web.url == f"http://127.0.0.1:{web.port}/?token=s%20cret"
        results, ws_status, hello = asyncio.run(run(web))
    assert results["/"][0] == results["/?token=wrong"][0] == 403
    assert ws_status == 403 and hello["type"] == "hello"
    status, kind, page = results["/?token=s%20cret"]
    assert status == 200 and kind == "text/html"
    imports = json.loads(re.search(r'<script type="importmap">(.*?)</script>', page,
                                   re.S).group(1))["imports"]
    assert imports["three"] == "./static/three.module.min.js"
    assert "./static/viewer.js" in page and "startLive" in page
    assert results["/static/viewer.js"][:2] == (200, "text/javascript")
    assert "export function startLive" in results["/static/viewer.js"][2]
    assert results["/static/live_socket.js"][0] == 200
    for path in ("/static/page.html", "/static/..%2Fserver.py", "/static/NOTICE.md"):
        assert results[path][0] == 404, path


def stalled_client(port: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(1)
    assert b" 101 " in reply.split(b"\r\n")[0]
    return sock


def test_stalled_page_never_slows_publishing(server):
    """60 frames of 100,000-vertex meshes (3 MB each) to a page that reads nothing and
    one that reads: each publish returns at once, the stalled page's queue drops, the
    reading page gets the newest frame, and the stalled page is forgotten when it
    goes."""
    mesh = face_mesh(100_000)
    stalled = stalled_client(server.port)

    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url(server), max_msg_size=0) as ws:
                await ws.receive(timeout=10)  # hello
                wait_until(lambda: server.clients == 2)
                took = []
                for i in range(60):
                    item, stats = fake_frame(i, mesh)
                    start = time.perf_counter()
                    server.publish(item, stats)
                    took.append(time.perf_counter() - start)
                    time.sleep(0.01)
                last = -1
                while last < 59:
                    msg = await ws.receive(timeout=20)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        last = decode_message(msg.data)[1]["frame"]
                counts = server.client_counts()
                stalled.close()
                wait_until(lambda: server.clients == 1)
                return took, counts

    took, counts = asyncio.run(run())
    assert max(took) < 0.02, max(took)                  # a reference handed over, no more
    assert server.frames_published == 60
    dropped = sorted(c["dropped"] for c in counts)
    assert dropped[-1] > 10                               # the stalled page lost frames


def test_several_pages_and_one_leaves(server):
    mesh = face_mesh(500)

    async def run():
        async with aiohttp.ClientSession() as session:
            a = await session.ws_connect(ws_url(server))
            b = await session.ws_connect(ws_url(server))
            await a.receive(timeout=10), await b.receive(timeout=10)  # hellos
            wait_until(lambda: server.clients == 2)
            server.publish(*fake_frame(0, mesh))
            first = await _receive(a, 3), await _receive(b, 3)
            await b.close()
            wait_until(lambda: server.clients == 1)
            server.publish(*fake_frame(1, mesh))
            after = await _receive(a, 3)
            server.close()                                # the run ends: pages are told
            closing = await a.receive(timeout=10)
            return first, after, closing

    first, after, closing = asyncio.run(run())
    assert first[0] == first[1]                           # the same bytes to both pages
    assert decode_message(after[0])[1]["frame"] == 1
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001


def test_frames_without_a_face_and_no_page():
    with WebViewServer("127.0.0.1", 0) as web:
        web.publish(*fake_frame(0, face_mesh(10)))        # nobody watching: nothing kept
        assert web.frames_published == 1 and web.frames_encoded == 0

        async def run():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(ws_url(web)) as ws:
                    await ws.receive(timeout=10)
                    wait_until(lambda: web.clients == 1)
                    web.publish(*fake_frame(1, None))
                    return await _receive(ws, 3)

        jpeg, mesh, stats = asyncio.run(run())
    assert decode_message(mesh)[1]["vertices"] == 0
    assert json.loads(stats)["faces"] == 0


def test_port_in_use_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(VRNError, match=f"127.0.0.1:{port}: the port is in use"):
            WebViewServer("127.0.0.1", port).start()


def test_run_live_publishes_every_frame(tmp_path, plane_weights):  # noqa: F811
    from vrn.runtime.capture import FrameGrabber
    from vrn.runtime.live import run_live
    from vrn.runtime.pipeline import Reconstructor

    path = tmp_path / "six.avi"
    write_video(path, 6)
    seen = []

    class Publisher:
        def publish(self, item, stats):
            seen.append((item.frame.index, stats.frames, len(item.result.faces)))

    summary = run_live(Reconstructor(plane_weights, backend="torch"), FrameGrabber(path),
                       headless=True, web=Publisher(), out=open(os.devnull, "w"))
    assert summary["frames"] == 6
    assert seen == [(i, i + 1, 1) for i in range(6)]


# ---------------------------------------------------------------------------- the CLI

def test_cli_refuses_bad_web_options(tmp_path, capsys):
    from vrn.cli.live import main

    for argv, message in [(["--web", "localhost:http"], "--web: bad address"),
                          (["--web-token", "x"], "need --web"),
                          (["--web-wait"], "need --web"),
                          (["--no-web-wait"], "need --web"),
                          (["--web", "8080", "--web-token", " "], "must not be empty")]:
        assert main(["--source", "missing.avi", "--headless", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_port_in_use_and_missing_aiohttp(tmp_path, capsys, monkeypatch):
    from vrn.cli.live import main

    video = tmp_path / "v.avi"
    write_video(video, 2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = main(["--source", str(video), "--headless", "--web", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 1 and "the port is in use" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "aiohttp", None)    # as if not installed
    assert main(["--source", str(video), "--headless", "--web", "8080"]) == 1
    assert "pip install 'vrn-edge[web]'" in capsys.readouterr().err


def test_cli_warns_when_serving_beyond_this_machine(capsys):
    from vrn.cli.live import _start_web

    web = _start_web(("0.0.0.0", 0), None, "video.avi")
    web.close()
    out = capsys.readouterr().out
    assert f"web view: http://0.0.0.0:{web.port}/" in out
    assert "WARNING" in out and "--web-token" in out


# ----------------------------------------------------------------- the page, in Chromium

N_FRAMES = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_live(argv: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """``vrn-live argv`` in a subprocess, its output collected; returns once it waits
    for a browser (``--web-wait``, the default for a video file)."""
    proc = subprocess.Popen([sys.executable, "-m", "vrn.cli.live", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 120
    while not any("waiting for a browser" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("".join(lines))
        time.sleep(0.05)
    return proc, lines


@pytest.mark.slow
def test_live_page_in_chromium(browser, tmp_path):  # noqa: F811
    """``vrn-live --web`` on a test video (the shipped model): the page gets at least
    half the frames and meshes and shows the FPS, while a second page comes and goes
    and a third stalls; the pipeline still processes every frame."""
    video = tmp_path / "moving_face.avi"
    write_video(video, N_FRAMES)
    port = free_port()
    proc, lines = start_live(["--source", str(video), "--headless", "--backend", "torch",
                              "--max-frames", str(N_FRAMES), "--web", f"127.0.0.1:{port}"])
    # (a video file waits for the first page by default)
    try:
        url = f"http://127.0.0.1:{port}/"
        assert any(f"web view: {url}" in line for line in lines)
        browser.get(url)
        wait_for(browser, "return document.documentElement.dataset.rendered === 'true'",
                 what="the live page")
        stalled = stalled_client(port)

        async def visit():  # a second page that watches three frames and leaves
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"ws://127.0.0.1:{port}/ws",
                                              max_msg_size=0) as ws:
                    return [m async for m in _take(ws, 10)]

        visited = asyncio.run(visit())
        proc.wait(timeout=120)
        stalled.close()
    finally:
        proc.kill()
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert f"{N_FRAMES} frames ({N_FRAMES} with a face" in out and "max frames reached" in out
    assert json.loads(visited[0])["type"] == "hello"
    assert sum(isinstance(m, bytes) for m in visited) >= 6   # the second page saw frames
    received = browser.execute_script("return window.vrnViewer.state.received")
    assert received["frames"] >= N_FRAMES / 2 and received["meshes"] >= N_FRAMES / 2, received
    assert re.search(r"\d+\.\d FPS", browser.find_element("id", "hud").text)
    assert "infer" in browser.find_element("id", "timings").text


async def _take(ws, n: int):
    for _ in range(n):
        yield (await ws.receive(timeout=30)).data


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_closes_the_pages_and_ctrl_c_ends_the_wait(tmp_path, plane_weights):  # noqa: F811
    import signal

    video = tmp_path / "long.avi"
    write_video(video, 300)
    port = free_port()
    argv = ["--source", str(video), "--headless", "--backend", "torch", "--weights",
            str(plane_weights), "--web", f"127.0.0.1:{port}", "--web-wait"]
    proc, lines = start_live(argv)

    async def watch():
        frames = 0
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{port}/ws", max_msg_size=0) as ws:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        frames += 1
                        if frames == 6:  # once: a second signal would cut the clean-up
                            proc.send_signal(signal.SIGTERM)
                return frames, ws.close_code

    try:
        frames, code = asyncio.run(watch())
        proc.wait(timeout=30)
    finally:
        proc.kill()
    out = "".join(lines)
    assert proc.returncode == 143 and code == 1001, out
    assert "ended: terminated" in out and "Traceback" not in out
    assert frames >= 6

    proc, lines = start_live(argv)                       # Ctrl-C before a page came
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    finally:
        proc.kill()
    out = "".join(lines)
    assert proc.returncode == 130 and "vrn-live: interrupted" in out, out
    assert "Traceback" not in out
