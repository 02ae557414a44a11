"""The live web view of ``vrn-live --web``: a page with the camera frame and the mesh
over it, the live mesh in 3D and the HUD, fed over a WebSocket.

Server library: aiohttp (the optional ``web`` extra, imported only when a server
starts), because one well-kept package gives both the HTTP routes and WebSockets on
asyncio, with back-pressure on sends, and no ASGI server beside it.

Threads. :class:`WebViewServer` runs aiohttp on its own thread with its own asyncio
loop. The pipeline's display thread calls :meth:`WebViewServer.publish` once a frame;
that only stores a reference to the newest frame and wakes the loop, so no client
can slow the pipeline. On the loop, the newest frame is encoded once (JPEG, the mesh
message, the stats; on a worker thread), and offered to every client's queue of
:data:`CLIENT_QUEUE` frames: a full queue drops its oldest frame, so a slow client
sees fewer frames, never older ones. Each client has its own sending task; a client
that disconnects is forgotten.

Routes: ``/`` the page, ``/static/<file>`` the viewer module and three.js (package
files, not secret), ``/ws`` the WebSocket. With a token, ``/`` and ``/ws`` require
``?token=<token>``.

Messages, in this order for each frame: a ``JPEG`` message, a ``MESH`` message (see
:mod:`vrn.viewer.encode`) and a text message, the stats (JSON: ``type: "stats"``,
``frame``, ``fps``, ``faces``, ``frames``, ``stages_ms``). On connecting a client
first gets ``{"type": "hello", "model": {"name", "detail"}, "source"}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hmac
import ipaddress
import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import quote

from ..errors import VRNError
from .assets import SCRIPTS, fill_page, import_map, read_static
from .encode import frame_message, mesh_message

DEFAULT_HOST = "127.0.0.1"
CLIENT_QUEUE = 2          # frames waiting per client; a full queue drops its oldest
FRAME_MAX_SIDE = 960      # frames are sent at most this wide or tall
JPEG_QUALITY = 80
START_TIMEOUT_S = 10.0
FLUSH_TIMEOUT_S = 1.0     # on close, how long pages may take to get the last frames


def parse_address(text: str) -> tuple[str, int]:
    """``"[HOST:]PORT"`` -> ``(host, port)``; the host defaults to 127.0.0.1. IPv6
    hosts in brackets (``[::1]:8080``). Raises ``ValueError`` with a one-line reason."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"bad address {text!r}: write an IPv6 host in brackets, "
                         "[::1]:8080")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad address {text!r}: expected [HOST:]PORT with a port "
                         "0-65535, e.g. 8080 or 0.0.0.0:8080")
    return host or DEFAULT_HOST, int(port_text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_aiohttp() -> None:
    """Raise :class:`VRNError` saying how to install the ``web`` extra when aiohttp is
    missing."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise VRNError("the web view needs aiohttp: pip install 'vrn-edge[web]'") from None


@dataclass
class _Snapshot:
    """What one frame gives the page, taken on the display thread: references only
    (the pipeline makes new arrays for every frame and never changes them)."""

    index: int
    image: object          # (H, W, 3) uint8 RGB
    meshes: list           # FaceMesh each
    stats: dict


@dataclass(eq=False)
class _Client:
    """One connected page: its WebSocket and its bounded queue of encoded frames."""

    ws: object
    queue: deque = field(default_factory=lambda: deque(maxlen=CLIENT_QUEUE))
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0
    dropped: int = 0
    sending: bool = False

    def offer(self, messages: tuple) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append(messages)  # a full deque drops its oldest
        self.ready.set()

    async def send_loop(self) -> None:
        """Send queued frames until cancelled; a failed send closes the socket (its
        handler then forgets the client)."""
        try:
            while True:
                await self.ready.wait()
                self.ready.clear()
                while self.queue:
                    self.sending = True
                    for message in self.queue.popleft():
                        if isinstance(message, str):
                            await self.ws.send_str(message)
                        else:
                            await self.ws.send_bytes(message)
                    self.sent += 1
                    self.sending = False
        except (ConnectionError, RuntimeError):
            await self.ws.close()


def stats_message(snapshot: _Snapshot) -> str:
    return json.dumps({"type": "stats", "frame": snapshot.index, **snapshot.stats})


def encode_frame(snapshot: _Snapshot) -> tuple[bytes, bytes, str]:
    """The three messages of one frame (JPEG, MESH, stats), encoded once for all."""
    return (frame_message(snapshot.image, snapshot.index, quality=JPEG_QUALITY,
                          max_side=FRAME_MAX_SIDE),
            mesh_message(snapshot.meshes, snapshot.index),
            stats_message(snapshot))


class WebViewServer:
    """The live page's server, on its own thread (see the module docstring).

    Parameters
    ----------
    host, port : str, int
        Where to listen; port 0 picks a free one (:attr:`port` then says which).
    token : str, optional
        Required as ``?token=`` on the page and the WebSocket.
    title : str
        The page's title.

    Use :meth:`start`, then :meth:`publish` once a frame (the ``web`` argument of
    :func:`vrn.runtime.live.run_live`), and :meth:`close` (or ``with``).
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = 8080, *,
                 token: str | None = None, title: str = "vrn-live"):
        self.host, self.port, self.token, self.title = host, port, token, title
        self.info = {"model": {"name": "", "detail": ""}, "source": ""}
        self.frames_published = 0
        self.frames_encoded = 0
        self._clients: set[_Client] = set()
        self._latest: _Snapshot | None = None
        self._encoding = False
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the calling threads

    @property
    def url(self) -> str:
        """The page's address (with the token)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?token={quote(self.token, safe='')}" if self.token else ""
        return f"http://{host}:{self.port}/{query}"

    @property
    def clients(self) -> int:
        """Pages connected now."""
        return len(self._clients)

    def client_counts(self) -> list[dict[str, int]]:
        """Per connected page: frames ``sent`` to it and ``dropped`` from its queue."""
        return [{"sent": c.sent, "dropped": c.dropped} for c in list(self._clients)]

    def start(self) -> WebViewServer:
        """Listen, on a new thread; returns once listening. Raises :class:`VRNError`
        when aiohttp is missing or the address cannot be used (in use, not here)."""
        require_aiohttp()
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,),
                                        name="vrn-web", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout=START_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise VRNError(f"the web view did not start on {self.host}:{self.port} "
                           f"within {START_TIMEOUT_S:.0f} s") from None
        return self

    def set_info(self, *, model: dict | None = None, source: str | None = None) -> None:
        """What the page says about the run; sent to pages connected now and later."""
        if model is not None:
            self.info["model"] = model
        if source is not None:
            self.info["source"] = source
        self._call(self._send_hello_to_all)

    def publish(self, item, stats) -> None:
        """Hand over one processed frame (a :class:`~vrn.runtime.live.LiveFrame` and the
        run's :class:`~vrn.runtime.live.LiveStats`). Never blocks; nothing is kept when
        no page is connected. Called on the pipeline's display thread."""
        self.frames_published += 1
        if not self._clients:
            return
        snapshot = _Snapshot(
            item.frame.index, item.frame.image, [f.mesh for f in item.result.faces],
            {"fps": round(stats.fps, 3), "faces": len(item.result.faces),
             "frames": stats.frames,
             "stages_ms": {s: round(stats.recent_ms(s), 2) for s in list(stats.stage_ms)}})
        with self._lock:
            self._latest = snapshot
        self._call(self._wake.set)

    def wait_for_client(self, timeout: float | None = None) -> bool:
        """Block until a page is connected (``False`` after ``timeout`` seconds). Ctrl-C
        still interrupts it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._connected.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    def close(self) -> None:
        """Send what is queued (for at most :data:`FLUSH_TIMEOUT_S`), close every
        WebSocket (code 1001, going away) and stop listening."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._call(self._stop.set)
        thread.join(timeout=5.0)
        self._loop = None

    def __enter__(self) -> WebViewServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, callback) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:  # the loop has just closed
                pass

    # ------------------------------------------------------------------ the loop thread

    def _thread_main(self, ready: concurrent.futures.Future) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(loop, ready))
        except BaseException as exc:  # reported to start() if it is still waiting
            if not ready.done():
                ready.set_exception(exc)
        finally:
            loop.close()

    async def _serve(self, loop, ready: concurrent.futures.Future) -> None:
        from aiohttp import web

        self._wake, self._stop = asyncio.Event(), asyncio.Event()
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/ws", self._websocket)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=FLUSH_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            ready.set_exception(VRNError(self._bind_error(exc)))
            return
        self.port = runner.addresses[0][1]
        self._loop = loop
        ready.set_result(None)
        broadcaster = asyncio.create_task(self._broadcast())
        try:
            await self._stop.wait()
            await self._flush()
        finally:
            broadcaster.cancel()
            await asyncio.gather(*(self._close(c.ws) for c in list(self._clients)))
            await runner.cleanup()

    @staticmethod
    async def _close(ws) -> None:
        """Close one page's socket, going away (1001); a stalled page is not waited for."""
        try:
            await asyncio.wait_for(ws.close(code=1001, message=b"vrn-live stopped"),
                                   FLUSH_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass

    async def _flush(self) -> None:
        """Wait until the newest frame is encoded and every page has been sent its
        queue, or :data:`FLUSH_TIMEOUT_S` has passed (a stalled page waits no longer)."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while time.monotonic() < deadline and (
                self._latest is not None or self._encoding
                or any(c.queue or c.sending for c in list(self._clients))):
            await asyncio.sleep(0.02)

    def _bind_error(self, exc: OSError) -> str:
        where = f"{self.host}:{self.port}"
        if exc.errno == errno.EADDRINUSE:
            return f"cannot serve the web view on {where}: the port is in use (choose " \
                   "another with --web [HOST:]PORT)"
        if exc.errno == errno.EACCES:
            return f"cannot serve the web view on {where}: permission denied (ports " \
                   "below 1024 need privileges)"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"cannot serve the web view on {where}: no such address on this machine"
        return f"cannot serve the web view on {where}: {exc.strerror or exc}"

    def _authorised(self, request) -> bool:
        if not self.token:
            return True
        given = request.query.get("token", "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _page(self, request):
        from aiohttp import web

        if not self._authorised(request):
            raise web.HTTPForbidden(text="vrn-live: this page needs the token: open the "
                                         "URL that vrn-live printed\n")
        page = fill_page(title=self.title, import_map=import_map(lambda f: f"./static/{f}"),
                         script='import { startLive } from "./static/viewer.js";\n'
                                'startLive({ path: "ws" });\n')
        return web.Response(text=page, content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def _static(self, request):
        from aiohttp import web

        name = request.match_info["name"]
        if name not in SCRIPTS:
            raise web.HTTPNotFound()
        return web.Response(body=read_static(name), content_type="text/javascript",
                            charset="utf-8", headers={"Cache-Control": "no-cache"})

    async def _websocket(self, request):
        from aiohttp import web

        if not self._authorised(request):
            raise web.HTTPForbidden(text="vrn-live: a token is required\n")
        # No permessage-deflate: compressing a 3 MB mesh per client would take the
        # pipeline's CPU; nothing is read from the page but control frames.
        ws = web.WebSocketResponse(heartbeat=20.0, compress=False, max_msg_size=1 << 16)
        await ws.prepare(request)
        client, sender = _Client(ws), None
        try:
            await ws.send_str(self._hello())  # first, before any frame
            self._clients.add(client)
            self._connected.set()
            sender = asyncio.create_task(client.send_loop())
            async for _ in ws:  # the page sends nothing; this ends when it goes away
                pass
        except (ConnectionError, RuntimeError):
            pass  # it went away while being greeted
        finally:
            self._clients.discard(client)
            if not self._clients:
                self._connected.clear()
            if sender is not None:
                sender.cancel()
        return ws

    def _hello(self) -> str:
        return json.dumps({"type": "hello", **self.info})

    def _send_hello_to_all(self) -> None:
        hello = self._hello()
        for client in list(self._clients):
            asyncio.ensure_future(self._send_quietly(client.ws, hello))

    @staticmethod
    async def _send_quietly(ws, text: str) -> None:
        try:
            await ws.send_str(text)
        except (ConnectionError, RuntimeError):
            pass  # the page is going away; its handler forgets it

    async def _broadcast(self) -> None:
        """Encode the newest frame once and offer it to every client."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            with self._lock:
                snapshot, self._latest = self._latest, None
            if snapshot is None or not self._clients:
                continue
            self._encoding = True
            try:
                messages = await asyncio.to_thread(encode_frame, snapshot)
            except Exception as exc:  # one frame the page cannot be sent; not the run
                print(f"[vrn-live] web view: frame {snapshot.index} not sent: "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                continue
            finally:
                self._encoding = False
            self.frames_encoded += 1
            for client in list(self._clients):
                client.offer(messages)
