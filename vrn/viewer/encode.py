"""What the browser is sent: JPEG photos and frames, and binary mesh messages (GLB files
come from :func:`vrn.runtime.mesh.mesh_bytes`).

Binary messages (the live page's WebSocket) are one layout, read by ``parseMessage`` in
``static/viewer.js``::

    tag        4 bytes ASCII: b"JPEG" or b"MESH"
    length     uint32, little endian: the header's length in bytes
    header     UTF-8 JSON
    padding    zero bytes up to a multiple of 4
    body       JPEG: the JPEG file; MESH: the sections named in header["sections"]
               (byte offsets from the body's start, each 4-byte aligned)

A MESH body: vertices ``(N, 3)`` uint16, quantised over the mesh's bounding box
(``x = origin + q * scale`` per axis, so half a step, ``scale / 2``, off; a
face of 300 px is then 0.002 px off), triangles ``(M, 3)`` uint32, colours ``(N, 3)``
uint8 RGB. Vertices are in photo pixels, ``(x, y, z)``: x right, y down, z toward the
camera.
"""

from __future__ import annotations

import json
import struct

import cv2
import numpy as np

from ..runtime.mesh import FaceMesh

QUANT_LEVELS = 65535


def encode_jpeg(image: np.ndarray, *, quality: int = 85,
                max_side: int | None = None) -> bytes:
    """``(H, W, 3)`` uint8 RGB -> JPEG bytes, shrunk (area filter) so that its longer
    side is at most ``max_side`` pixels."""
    h, w = image.shape[:2]
    if max_side is not None and max(h, w) > max_side:
        f = max_side / max(h, w)
        image = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))),
                           interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


def _message(tag: bytes, header: dict, sections: dict[str, bytes]) -> bytes:
    """One binary message (the layout in the module docstring)."""
    offsets, chunks, at = {}, [], 0
    for i, (name, data) in enumerate(sections.items()):
        offsets[name] = at
        pad = -len(data) % 4 if i < len(sections) - 1 else 0
        chunks += [data, b"\0" * pad]
        at += len(data) + pad
    if len(sections) > 1:
        header = header | {"sections": offsets}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join([tag, struct.pack("<I", len(head)), head, b"\0" * (-len(head) % 4),
                     *chunks])


def frame_message(image: np.ndarray, index: int, *, quality: int = 80,
                  max_side: int | None = 960) -> bytes:
    """A JPEG message: the ``(H, W, 3)`` uint8 RGB frame (shrunk to ``max_side``); its
    header ``{"frame", "width", "height"}`` gives the frame's full size, the photo frame
    the meshes are in."""
    h, w = image.shape[:2]
    return _message(b"JPEG", {"frame": int(index), "width": int(w), "height": int(h)},
                    {"jpeg": encode_jpeg(image, quality=quality, max_side=max_side)})


def quantise(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(N, 3)`` float vertices -> ``(q, origin, scale)``: ``q`` ``(N, 3)`` uint16 and
    ``vertices ~ origin + q * scale`` (``origin``, ``scale`` ``(3,)`` float64)."""
    v = np.asarray(vertices, np.float32)  # float32 throughout: 4x faster than float64
    if len(v) == 0:
        return np.zeros((0, 3), np.uint16), np.zeros(3), np.ones(3)
    # Per column: a reduction over axis 0 of an (N, 3) array is 20x slower.
    low = np.array([v[:, k].min() for k in range(3)], np.float32)
    origin = low.astype(np.float64)
    span = np.array([v[:, k].max() for k in range(3)], np.float64) - origin
    scale = np.where(span > 0, span / QUANT_LEVELS, 1.0)
    q = v - low
    q *= (1.0 / scale).astype(np.float32)
    np.rint(q, out=q)
    np.clip(q, 0, QUANT_LEVELS, out=q)
    return q.astype(np.uint16), origin, scale


def merge_meshes(meshes: list[FaceMesh]) -> FaceMesh:
    """The non-empty ``meshes`` as one mesh (triangle indices offset)."""
    meshes = [m for m in meshes if not m.is_empty]
    if not meshes:
        return FaceMesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32),
                        np.zeros((0, 3), np.uint8))
    if len(meshes) == 1:
        return meshes[0]
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    return FaceMesh(np.concatenate([m.vertices for m in meshes]),
                    np.concatenate([m.faces + o for m, o in zip(meshes, offsets)]),
                    np.concatenate([m.colors for m in meshes]))


def mesh_message(meshes: list[FaceMesh], index: int) -> bytes:
    """A MESH message: the frame's face meshes (all of them, as one), quantised; header
    ``{"frame", "vertices": N, "triangles": M, "origin", "scale", "sections"}``. No
    face: ``N = M = 0``, the page then shows none."""
    mesh = merge_meshes(meshes)
    q, origin, scale = quantise(mesh.vertices)
    header = {"frame": int(index), "vertices": len(q), "triangles": len(mesh.faces),
              "origin": origin.tolist(), "scale": scale.tolist()}
    return _message(b"MESH", header, {
        "vertices": q.astype("<u2").tobytes(),
        "triangles": np.ascontiguousarray(mesh.faces, "<u4").tobytes(),
        "colors": np.ascontiguousarray(mesh.colors, np.uint8).tobytes()})


def decode_message(data: bytes) -> tuple[bytes, dict, memoryview]:
    """A binary message -> ``(tag, header, body)`` (the reader tests and tools use; the
    page has its own in ``viewer.js``)."""
    tag = bytes(data[:4])
    (length,) = struct.unpack_from("<I", data, 4)
    header = json.loads(bytes(data[8:8 + length]))
    return tag, header, memoryview(data)[(8 + length + 3) & ~3:]
