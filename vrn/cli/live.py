"""``vrn-live``: a camera (or video, or stream) in, its faces reconstructed in 3D live.

Shows the shaded surface over each face, a side view of the mesh and a HUD with FPS and
per-stage milliseconds (keys: ``q`` quit, ``s`` save the current mesh, ``v`` switch
view), or with ``--headless`` prints a stats line every few seconds. ``--web
[HOST:]PORT`` also serves the live view to browsers (with or without the window): the
frame with the mesh over it, the mesh in 3D and the HUD. Always ends with a summary:
frames, FPS and per-stage p50/p90/p99.
"""

from __future__ import annotations

import argparse
import sys

from ..signals import EXIT_CODES
from .command import UsageError, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vrn-live",
        description="Live 3D face reconstruction with VRN from a camera, video file or "
                    "stream URL.")
    p.add_argument("--source", default="0", metavar="0|VIDEO|URL",
                   help="camera index, video file or stream URL (default: camera 0)")
    p.add_argument("--backend", default="auto",
                   choices=("auto", "tensorrt", "onnxruntime", "torch"),
                   help="inference backend (default: auto, the fastest available here)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", metavar="PATH",
                         help=".t7, .safetensors or .onnx weights (default: the package's "
                              "default model)")
    weights.add_argument("--engine", metavar="PATH", help="a TensorRT engine (vrn-export)")
    p.add_argument("--device", type=_device, metavar="cpu|cuda|cuda:N",
                   help="run the backend here (default: CUDA when the backend can use it; "
                        "cuda:N for the N-th GPU)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                   help="compute precision (default: fp16 on CUDA, fp32 on the CPU; bf16: "
                        "PyTorch autocast with channels-last, on CPUs with native bf16 "
                        "(AVX-512 BF16, AMX, Arm BF16); --backend auto then means torch)")
    p.add_argument("--headless", action="store_true",
                   help="no window: print a stats line periodically (for SSH sessions)")
    p.add_argument("--max-frames", type=int, metavar="N",
                   help="stop after N processed frames")
    p.add_argument("--record", metavar="OUT.mp4",
                   help="record the display (overlay, side view, HUD) to a video file")
    p.add_argument("--record-fps", type=float, metavar="FPS",
                   help="frame rate of the recording (default: the source's, else 15)")
    p.add_argument("--save-meshes", metavar="DIR",
                   help="write every frame's meshes to DIR as frame_<index>.ply")
    p.add_argument("--detect-every", type=int, default=5, metavar="K",
                   help="run the face detector every K frames; in between, follow each "
                        "face's landmarks from frame to frame (default 5)")
    p.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap the network of each frame with the mesh of the frame "
                        "before, on two threads: more FPS, a little more latency "
                        "(default: on for CPU backends)")
    p.add_argument("--all-faces", action="store_true",
                   help="reconstruct every face (as one batch), not only the largest")
    p.add_argument("--detector-model", metavar="MODEL.onnx",
                   help="a YuNet face detector model (cv2.FaceDetectorYN) replacing the "
                        "shipped one")
    p.add_argument("--yunet", dest="detector_model", help=argparse.SUPPRESS)  # deprecated
    p.add_argument("--detector-threshold", type=float, metavar="T",
                   help="least face detection score, 0-1 (default 0.6; lower finds more "
                        "faces)")
    p.add_argument("--stats-json", metavar="PATH",
                   help="write the summary and per-frame records (boxes, mesh sizes, ms)")
    p.add_argument("--stats-interval", type=float, default=2.0, metavar="S",
                   help="seconds between headless stats lines (default 2)")
    web = p.add_argument_group("web view (needs the web extra: pip install 'vrn-edge[web]')")
    web.add_argument("--web", metavar="[HOST:]PORT",
                     help="serve the live view to browsers on PORT (host 127.0.0.1 "
                          "unless given; 0.0.0.0 serves the whole network)")
    web.add_argument("--web-token", metavar="TOKEN",
                     help="require ?token=TOKEN in the page's URL")
    web.add_argument("--web-wait", action=argparse.BooleanOptionalAction, default=None,
                     help="start the source only once a browser has the page open "
                          "(default: yes for a video file, which then plays from its "
                          "start; no for a camera or stream)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command("vrn-live", build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    if args.detect_every < 1:
        raise UsageError("--detect-every must be >= 1")
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError("--max-frames must be >= 1")
    web_address = _web_address(args)
    backend_name, device = _bf16_backend(args)

    from ..runtime.threads import configure_threads, prefer_passive_openmp

    prefer_passive_openmp()  # before torch loads: its idle threads must not spin
    configure_threads()      # torch, ONNX Runtime, our kernels and OpenCV, one budget
    from ..runtime.capture import FrameGrabber, is_live_source, parse_source
    from ..runtime.detect import create_detector
    from ..runtime.live import check_display, format_summary, run_live
    from ..runtime.pipeline import Reconstructor

    if not args.headless:
        check_display()
    grabber = FrameGrabber(args.source, start=False)  # a bad source fails before loading
    web = None
    try:
        if web_address is not None:  # a port in use fails before loading, too
            web = _start_web(web_address, args.web_token, args.source)
        print(f"preparing the {args.backend} backend (the first onnxruntime run of new "
              "weights exports them to ONNX once; this can take a minute)", flush=True)
        threshold = ({} if args.detector_threshold is None
                     else {"score_threshold": args.detector_threshold})
        try:
            detector = create_detector(args.detector_model, **threshold)
            reconstructor = Reconstructor(args.engine or args.weights, backend=backend_name,
                                          device=device, precision=args.precision,
                                          all_faces=args.all_faces, detector=detector)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        backend = reconstructor.backend
        print(f"backend: {backend.describe()} [{getattr(backend, 'selection_reason', '')}]",
              flush=True)
        info = reconstructor.model_info
        if info is not None:
            print(f"model: {info.architecture}, batch norm {info.bn_mode}; {info.provenance}")
            if not info.trained:
                print("WARNING: these weights are NOT trained (seeded random initialisation): "
                      "the meshes show the pipeline working, not a face.")
        reconstructor.warmup()
        if web is not None:
            from ..viewer.assets import model_label

            web.set_info(model=model_label(info))
            wait = args.web_wait
            if wait is None:  # a video file waits for its audience; a camera does not
                wait = not is_live_source(parse_source(args.source))
            if wait:
                print(f"waiting for a browser at {web.url}", flush=True)
                web.wait_for_client()
        grabber.start()
        summary = run_live(reconstructor, grabber, detect_every=args.detect_every,
                           headless=args.headless, max_frames=args.max_frames,
                           record=args.record, record_fps=args.record_fps,
                           save_meshes=args.save_meshes, stats_json=args.stats_json,
                           stats_interval_s=args.stats_interval, web=web,
                           pipelined=args.pipeline)
    finally:
        grabber.stop()
        if web is not None:
            web.close()
    print(format_summary(summary), flush=True)
    if summary.get("record"):
        print(f"recording: {summary['record']} ({summary['recorded_frames']} frames)")
    # The loop ended on Ctrl-C or SIGTERM after finalising its outputs.
    return EXIT_CODES.get(summary.get("ended"), 0)


def _device(text: str) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N``."""
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index or kind == "cuda" and (not index or index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _bf16_backend(args: argparse.Namespace) -> tuple[str, str | None]:
    """The backend and device to ask for: ``--precision bf16`` runs on PyTorch on the
    CPU (``--backend auto`` becomes torch), and only where the CPU computes in bf16
    natively; emulated bf16 is slower than fp32."""
    if args.precision != "bf16":
        return args.backend, args.device
    if args.backend not in ("auto", "torch") or (args.device or "").startswith("cuda"):
        raise UsageError("--precision bf16 runs on the torch backend on the CPU")
    from ..runtime.cpu import cpu_info

    if not cpu_info().bf16:
        raise UsageError("--precision bf16: this CPU has no native bf16 (no avx512_bf16, "
                         "amx_bf16 or Arm bf16 in its flags); use fp32")
    return "torch", "cpu"


def _web_address(args: argparse.Namespace) -> tuple[str, int] | None:
    """``--web``'s (host, port), checked with the options that need it."""
    if args.web is None:
        if args.web_token is not None or args.web_wait is not None:
            raise UsageError("--web-token and --web-wait need --web [HOST:]PORT")
        return None
    from ..viewer.server import parse_address, require_aiohttp

    try:
        address = parse_address(args.web)
    except ValueError as exc:
        raise UsageError(f"--web: {exc}") from None
    if args.web_token is not None and not args.web_token.strip():
        raise UsageError("--web-token must not be empty")
    require_aiohttp()
    return address


def _start_web(address: tuple[str, int], token: str | None, source: str):
    """Start the web view's server; print its address, and a warning when it is
    reachable from other machines."""
    from ..viewer.server import WebViewServer, is_loopback

    web = WebViewServer(*address, token=token).start()
    web.set_info(source=f"source: {source}")
    print(f"web view: {web.url}", flush=True)
    if not is_loopback(web.host):
        print(f"WARNING: the web view listens on {web.host}:{web.port}, not only on this "
              "machine: anyone who can reach it can watch this camera"
              + ("" if token else " (set --web-token to require a token)"), flush=True)
    return web


if __name__ == "__main__":
    sys.exit(main())
