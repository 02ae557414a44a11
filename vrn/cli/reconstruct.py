"""``vrn-reconstruct``: photos in, coloured face meshes (and preview PNGs) out."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from ..atomic import write_bytes_atomic
from ..errors import VRNError
from ..runtime.detect import DEFAULT_SCORE_THRESHOLD, create_detector
from ..runtime.image_io import collect_images, load_image, sample_image_path
from ..runtime.mesh import MESH_FORMATS, save_mesh


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vrn-reconstruct",
        description="Reconstruct 3D face meshes from photos with VRN (CPU reference path). "
                    "Meshes are in the photo's pixel coordinates: x right, y down, "
                    "z toward the camera.")
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR",
                   help="image files or folders of images")
    p.add_argument("--sample", action="store_true",
                   help="reconstruct the bundled sample photo (skimage's astronaut)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--weights", metavar="PATH",
                   help=".t7 or .safetensors weights (default: the package's default model)")
    p.add_argument("--all-faces", action="store_true",
                   help="reconstruct every face found, not only the largest")
    p.add_argument("--formats", default="obj",
                   help=f"comma-separated mesh formats from {','.join(MESH_FORMATS)} "
                        "(default: obj)")
    p.add_argument("--preview", action="store_true",
                   help="also write <stem>_preview.png: the shaded mesh over the photo "
                        "and a side view")
    p.add_argument("--detector-model", metavar="MODEL.onnx",
                   help="a YuNet face detector model (cv2.FaceDetectorYN) replacing the "
                        "shipped one")
    p.add_argument("--yunet", dest="detector_model", help=argparse.SUPPRESS)  # deprecated
    p.add_argument("--detector-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD,
                   metavar="T", help="least face detection score, 0-1 (default "
                                     f"{DEFAULT_SCORE_THRESHOLD}; lower finds more faces)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in MESH_FORMATS]
    if bad or not formats:
        print(f"vrn-reconstruct: unknown mesh format(s) {bad}; choose from "
              f"{','.join(MESH_FORMATS)}", file=sys.stderr)
        return 2
    inputs = list(args.inputs) + ([str(sample_image_path())] if args.sample else [])
    if not inputs:
        print("vrn-reconstruct: give images or folders, or --sample", file=sys.stderr)
        return 2
    outdir = Path(args.output)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / ".vrn-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        print(f"vrn-reconstruct: cannot write to {outdir}: {exc.strerror}", file=sys.stderr)
        return 2

    images, problems = collect_images(inputs)
    for message in problems:
        print(f"error: {message}", file=sys.stderr)

    from ..runtime.pipeline import Reconstructor

    try:
        detector = create_detector(args.detector_model,
                                   score_threshold=args.detector_threshold)
        reconstructor = Reconstructor(args.weights, all_faces=args.all_faces,
                                      detector=detector)
    except (VRNError, ValueError) as exc:
        print(f"vrn-reconstruct: {exc}", file=sys.stderr)
        return 2
    info = reconstructor.model_info
    print(f"model: {info.architecture}, batch norm {info.bn_mode}; {info.provenance}")
    if not info.trained:
        print("WARNING: these weights are NOT trained (seeded random initialisation): the "
              "meshes show the pipeline working, not a face. Pass --weights for real output.")

    produced = 0
    iterator = images
    if len(images) > 3:
        from tqdm import tqdm
        iterator = tqdm(images, desc="reconstructing", unit="image", file=sys.stderr)
    for path in iterator:
        try:
            produced += _process(path, reconstructor, outdir, formats, args.preview)
        except VRNError as exc:
            print(f"error: {exc}", file=sys.stderr)
    print(f"{produced} mesh(es) from {len(images)} image(s) written to {outdir}")
    return 0 if produced else 1


def _process(path: Path, reconstructor, outdir: Path, formats: list[str],
             preview: bool) -> int:
    image = load_image(path)
    start = time.perf_counter()
    result = reconstructor(image)
    elapsed = (time.perf_counter() - start) * 1e3
    if not result.faces:
        print(f"{path}: no face found", file=sys.stderr)
        return 0
    written = 0
    for i, face in enumerate(result.faces):
        stem = path.stem if i == 0 else f"{path.stem}_face{i}"
        if face.mesh.is_empty:
            print(f"{path}: face {i}: the volume has no surface at level "
                  f"{reconstructor.level}; no mesh written", file=sys.stderr)
            continue
        for fmt in formats:
            save_mesh(face.mesh, outdir / f"{stem}.{fmt}")
        written += 1
        print(f"{path}: face {i}: {len(face.mesh.vertices)} vertices, "
              f"{len(face.mesh.faces)} triangles -> {outdir / stem}.{formats[0]}")
    stages = ", ".join(f"{k} {v:.0f}" for k, v in result.timings_ms.items())
    print(f"{path}: {elapsed:.0f} ms ({stages} ms)")
    if preview and written:
        _write_preview(image, result, outdir / f"{path.stem}_preview.png")
    return written


def _write_preview(image: np.ndarray, result, path: Path) -> None:
    from ..runtime.render import overlay, side_view

    meshes = [f.mesh for f in result.faces if not f.mesh.is_empty]
    left = overlay(image, meshes)
    panel = side_view(meshes[0], size=image.shape[0])
    canvas = np.concatenate([left, panel], axis=1)
    ok, data = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise VRNError(f"{path}: PNG encoding failed")
    write_bytes_atomic(path, data.tobytes())


if __name__ == "__main__":
    sys.exit(main())
