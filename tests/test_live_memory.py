"""Memory of long ``vrn-live`` runs: ``--save-meshes`` writes a mesh per frame through
trimesh, whose meshes are reference cycles; :func:`save_mesh` must not leave them (and
their arrays) to the cycle collector, or hundreds of megabytes pile up between full
collections (``benchmarks/soak_live.py`` measures the whole loop)."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import trimesh

from vrn.runtime.mesh import FaceMesh, save_mesh


def _mesh() -> FaceMesh:
    rng = np.random.default_rng(0)
    vertices = rng.uniform(0, 100, (300, 3)).astype(np.float32)
    faces = np.concatenate([np.arange(300).reshape(100, 3),  # every vertex used
                            rng.integers(0, 300, (400, 3))]).astype(np.int32)
    colors = rng.integers(0, 256, (300, 3)).astype(np.uint8)
    return FaceMesh(vertices, faces, colors)


@pytest.mark.parametrize("fmt", ["ply", "obj", "glb"])
def test_save_mesh_releases_the_trimesh_without_a_collection(fmt, tmp_path, monkeypatch):
    mesh = _mesh()
    made = []
    to_trimesh = FaceMesh.to_trimesh

    def remember(self):
        tm = to_trimesh(self)
        made.append(weakref.ref(tm))
        return tm

    monkeypatch.setattr(FaceMesh, "to_trimesh", remember)
    gc.collect()
    gc.disable()
    try:
        for i in range(5):
            save_mesh(mesh, tmp_path / f"frame_{i}.{fmt}")
        # Gone, or (glb: the exporter's scene keeps the object) emptied of its arrays.
        assert all(r() is None or not vars(r()) for r in made)
        if fmt != "glb":
            assert all(r() is None for r in made)
    finally:
        gc.enable()

    loaded = trimesh.load(tmp_path / f"frame_4.{fmt}", process=False, force="mesh")
    frame = [1, -1, 1] if fmt == "glb" else [1, 1, 1]  # a GLB is in glTF's y-up frame
    np.testing.assert_allclose(loaded.vertices, mesh.vertices * frame, atol=1e-4)
    np.testing.assert_array_equal(loaded.visual.vertex_colors[:, :3], mesh.colors)


def test_live_stats_keep_a_bounded_window(monkeypatch):
    """Per-stage timings are kept for the last STATS_WINDOW frames only, however long
    the loop runs; the frame count and the recent means stay exact."""
    import types

    import vrn.runtime.live as live

    monkeypatch.setattr(live, "STATS_WINDOW", 50)
    stats = live.LiveStats()
    for i in range(500):
        frame = types.SimpleNamespace(timestamp=i * 0.05, index=i)
        item = types.SimpleNamespace(result=types.SimpleNamespace(faces=[]), done_at=i * 0.05,
                                     frame=frame, timings_ms={"infer": float(i)})
        stats.add(item)
    assert stats.frames == 500
    assert len(stats.stage_ms["infer"]) == 50
    assert stats.recent_ms("infer", last=10) == np.mean(np.arange(490, 500))
    assert stats.summary()["stages_ms"]["infer"]["p50"] == np.median(np.arange(450, 500))
