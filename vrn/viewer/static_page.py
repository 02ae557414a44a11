"""The static viewer page: one self-contained HTML file for one face mesh.

It holds the photo (JPEG), the mesh (binary GLB), three.js and the viewer module, all
inline (the JavaScript modules as ``data:`` URLs of an import map), so it opens offline
by double-clicking, from any folder. It shows the photo with the mesh over it, the
coloured mesh in 3D (orbit, zoom, front and side views, wireframe), the per-stage
timings and the model's name. A typical face (100,000 vertices) makes a 7 MB file.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from ..runtime.mesh import FaceMesh
from .assets import fill_page, import_map, read_static, script_json
from ..runtime.mesh import mesh_bytes
from .encode import encode_jpeg

PHOTO_MAX_SIDE = 1600
PHOTO_QUALITY = 88


def _data_url(name: str) -> str:
    return "data:text/javascript;base64," + base64.b64encode(read_static(name)).decode()


def static_page(mesh: FaceMesh, photo: np.ndarray, *, timings_ms: dict[str, float],
                model: dict[str, str], title: str) -> str:
    """The page's HTML.

    Parameters
    ----------
    mesh : FaceMesh
        Vertices ``(N, 3)`` float32 ``(x, y, z)`` in ``photo``'s pixels (x right, y down,
        z toward the camera), faces ``(M, 3)`` int32, colours ``(N, 3)`` uint8 RGB.
    photo : (H, W, 3) uint8 RGB
        The photo the mesh came from (embedded as a JPEG, longer side at most
        :data:`PHOTO_MAX_SIDE`; the overlay stays in its full-size pixels).
    timings_ms : dict
        Per-stage milliseconds, shown as a table.
    model : dict
        ``{"name", "detail"}`` (see :func:`vrn.viewer.assets.model_label`).
    title : str
        The page's title (plain text).
    """
    h, w = photo.shape[:2]
    data = {"model": model,
            "timings": {k: round(float(v), 3) for k, v in timings_ms.items()},
            "photo": {"width": w, "height": h, "jpeg": base64.b64encode(
                encode_jpeg(photo, quality=PHOTO_QUALITY, max_side=PHOTO_MAX_SIDE)).decode()},
            "mesh": {"glb": base64.b64encode(mesh_bytes(mesh, "glb")).decode()}}
    script = (read_static("viewer.js").decode("utf-8")
              + "\nshowStatic(JSON.parse(document.getElementById('vrn-data').textContent));\n")
    return fill_page(title=title, import_map=import_map(_data_url), script=script,
                     data=f'<script type="application/json" id="vrn-data">'
                          f'{script_json(data)}</script>')


def write_static_page(path: str | os.PathLike, mesh: FaceMesh, photo: np.ndarray, *,
                      timings_ms: dict[str, float], model: dict[str, str],
                      title: str | None = None) -> Path:
    """Write :func:`static_page` to ``path`` atomically (title: the file's stem)."""
    path = Path(path)
    return write_text_atomic(path, static_page(mesh, photo, timings_ms=timings_ms,
                                               model=model, title=title or path.stem))
