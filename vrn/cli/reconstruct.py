"""``vrn-reconstruct``: photos in, coloured face meshes (and preview PNGs, and
self-contained HTML viewer pages) out."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from ..atomic import write_bytes_atomic
from ..errors import VRNError
from ..runtime.detect import DEFAULT_SCORE_THRESHOLD, create_detector
from ..image_io import collect_images, load_image, sample_image_path
from ..runtime.mesh import MESH_FORMATS, save_mesh
from ..signals import interrupt_exit, interrupt_word
from ..viewer.assets import model_label
from ..viewer.static_page import write_static_page
from .command import UsageError, describe_error, run_command

# Mesh formats, and "html": the viewer page (vrn.viewer.static_page), one per mesh too.
OUTPUT_FORMATS = MESH_FORMATS + ("html",)


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
                   help=f"comma-separated output formats from {','.join(OUTPUT_FORMATS)} "
                        "(default: obj); html is a self-contained page per mesh: the "
                        "photo with the mesh over it and the mesh in 3D, opens offline")
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
    p.add_argument("--strict", action="store_true",
                   help="exit non-zero if any image fails (default: only if none succeeds)")
    return p


class OutputNames:
    """Unique output stems for a batch of input images.

    An image's stem is its file's stem; inputs that share one (``a/face.jpg`` and
    ``b/face.jpg``, or ``face.jpg`` and ``face.png``) are written as
    ``<folder>_<stem>_<extension>`` instead. Every name written is claimed, and a name
    already taken (``group.jpg``'s second face ``group_face1`` beside ``group_face1.jpg``)
    gets the first free ``-2``, ``-3``, ... suffix: nothing is overwritten.
    """

    def __init__(self, images: list[Path]):
        shared = Counter(p.stem for p in images)
        self._stems = {p: (p.stem if shared[p.stem] == 1 else
                           f"{p.parent.name or 'root'}_{p.stem}_{p.suffix.lstrip('.').lower()}")
                       for p in images}
        self._taken: set[str] = set()

    def stem(self, image: Path) -> str:
        """The disambiguated stem of ``image`` (not claimed)."""
        return self._stems[image]

    def claim(self, name: str) -> str:
        """``name``, or ``name-2``, ``name-3``, ... whichever is free first; now taken."""
        candidate, k = name, 1
        while candidate in self._taken:
            k += 1
            candidate = f"{name}-{k}"
        self._taken.add(candidate)
        return candidate


def _check_writable(outdir: Path) -> None:
    """Create ``outdir`` and prove it writable with an exclusive temporary file (never
    through an existing name or symlink). Raises ``OSError``."""
    outdir.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".vrn-write-test.", dir=outdir)
    os.close(fd)
    os.unlink(probe)


def main(argv: list[str] | None = None) -> int:
    return run_command("vrn-reconstruct", build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in OUTPUT_FORMATS]
    if bad or not formats:
        raise UsageError(f"unknown format(s) {bad}; choose from {','.join(OUTPUT_FORMATS)}")
    inputs = list(args.inputs) + ([str(sample_image_path())] if args.sample else [])
    if not inputs:
        raise UsageError("give images or folders, or --sample")
    outdir = Path(args.output)
    try:
        _check_writable(outdir)
    except OSError as exc:
        raise VRNError(f"cannot write to {outdir}: {exc.strerror}") from None

    images, problems = collect_images(inputs)
    for message in problems:
        print(f"error: {message}", file=sys.stderr)

    from ..runtime.pipeline import Reconstructor

    try:
        detector = create_detector(args.detector_model,
                                   score_threshold=args.detector_threshold)
        reconstructor = Reconstructor(args.weights, all_faces=args.all_faces,
                                      detector=detector)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    info = reconstructor.model_info
    print(f"model: {info.architecture}, batch norm {info.bn_mode}; {info.provenance}")
    if not info.trained:
        print("WARNING: these weights are NOT trained (seeded random initialisation): the "
              "meshes show the pipeline working, not a face. Pass --weights for real output.")

    names = OutputNames(images)
    meshes = files = succeeded = faceless = 0
    failed = len(problems)
    iterator = images
    if len(images) > 3:
        from tqdm import tqdm
        iterator = tqdm(images, desc="reconstructing", unit="image", file=sys.stderr)
    for path in iterator:
        try:
            written, written_files = _process(path, reconstructor, outdir, formats,
                                              args.preview, names)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the current image is dropped
            print(f"vrn-reconstruct: {interrupt_word(exc)} at {path}; {meshes} mesh(es) in "
                  f"{files} file(s) written to {outdir}", file=sys.stderr)
            return interrupt_exit(exc)
        except VRNError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        except Exception as exc:  # one bad file (disk full, a decoder's refusal) is one line
            print(f"error: {path}: {describe_error(exc)}", file=sys.stderr)
            failed += 1
            continue
        meshes += written
        files += written_files
        succeeded += written > 0
        faceless += written == 0
    print(f"{meshes} mesh(es) in {files} file(s) written to {outdir}: {succeeded} image(s) "
          f"with a mesh, {faceless} without, {failed} failed")
    if args.strict and failed:
        return 1
    return 0 if meshes else 1


def _process(path: Path, reconstructor, outdir: Path, formats: list[str],
             preview: bool, names: OutputNames) -> tuple[int, int]:
    """Reconstruct one photo; returns ``(meshes written, files written)``."""
    image = load_image(path)
    start = time.perf_counter()
    result = reconstructor(image)
    elapsed = (time.perf_counter() - start) * 1e3
    if not result.faces:
        print(f"{path}: no face found", file=sys.stderr)
        return 0, 0
    base = names.stem(path)
    if base != path.stem:
        print(f"{path}: another input has the stem {path.stem!r}; written as {base!r}")
    written = files = 0
    for i, face in enumerate(result.faces):
        if face.mesh.is_empty:
            print(f"{path}: face {i}: the volume has no surface at level "
                  f"{reconstructor.level}; no mesh written", file=sys.stderr)
            continue
        stem = names.claim(base if i == 0 else f"{base}_face{i}")
        for fmt in formats:
            if fmt == "html":
                write_static_page(outdir / f"{stem}.html", face.mesh, image,
                                  timings_ms=result.timings_ms,
                                  model=model_label(reconstructor.model_info),
                                  title=f"{path.name}: face {i}")
            else:
                save_mesh(face.mesh, outdir / f"{stem}.{fmt}")
            files += 1
        written += 1
        print(f"{path}: face {i}: {len(face.mesh.vertices)} vertices, "
              f"{len(face.mesh.faces)} triangles -> {outdir / stem}.{formats[0]}")
    stages = ", ".join(f"{k} {v:.0f}" for k, v in result.timings_ms.items())
    print(f"{path}: {elapsed:.0f} ms ({stages} ms)")
    if preview and written:
        _write_preview(image, result, outdir / f"{names.claim(base + '_preview')}.png")
        files += 1
    return written, files


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
