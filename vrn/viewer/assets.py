"""The files both viewer pages share, shipped in ``vrn/viewer/static``: the page
template, the viewer module and the vendored three.js (see ``static/NOTICE.md``)."""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from collections.abc import Callable

# The files a page loads, and the import map's names for the two three.js modules.
SCRIPTS = ("three.module.min.js", "OrbitControls.min.js", "viewer.js", "live_socket.js")
IMPORTS = {"three": "three.module.min.js",
           "three/addons/controls/OrbitControls.js": "OrbitControls.min.js"}
_SLOT = re.compile(r"<!--VRN:(\w+)-->")


@functools.cache
def read_static(name: str) -> bytes:
    """The bytes of one shipped file (``page.html`` or one of :data:`SCRIPTS`)."""
    if name not in SCRIPTS + ("page.html",):
        raise KeyError(name)
    return resources.files(__package__).joinpath("static", name).read_bytes()


def import_map(url: Callable[[str], str]) -> str:
    """The page's import map (JSON): each three.js module name -> ``url(file name)``."""
    return json.dumps({"imports": {name: url(file) for name, file in IMPORTS.items()}})


def script_json(value) -> str:
    """``value`` as JSON that is safe inside a ``<script>`` element (no ``<``, ``>``,
    ``&``: no ``</script>`` can end it early)."""
    return (json.dumps(value, separators=(",", ":")).replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("&", "\\u0026"))


def fill_page(*, title: str, import_map: str, script: str, data: str = "") -> str:
    """The page template with its slots filled: ``title`` (plain text, escaped here),
    the import map (JSON), the module ``script`` and optional extra ``data`` elements."""
    import html

    if re.search(r"</script", script, re.IGNORECASE):
        raise ValueError("a page script must not contain '</script'")
    parts = {"title": html.escape(title), "importmap": import_map, "script": script,
             "data": data}
    return _SLOT.sub(lambda m: parts[m.group(1)], read_static("page.html").decode("utf-8"))


def model_label(info) -> dict[str, str]:
    """What the pages say about the model: ``{"name", "detail"}`` from a
    :class:`~vrn.model.checkpoint.ModelInfo` (or ``None``: an engine without one)."""
    if info is None:
        return {"name": "unknown model (no metadata)", "detail": ""}
    name = f"{info.architecture}, batch norm {info.bn_mode}"
    if not info.trained:
        name += " (NOT trained: random weights)"
    return {"name": name, "detail": info.provenance}
