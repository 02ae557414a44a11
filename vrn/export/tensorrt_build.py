"""ONNX -> TensorRT engine (TensorRT 10.3 to 11.x), inspected after the build.

The canonical strongly typed path: the engine's precision is the ONNX graph's (an fp16
engine comes from :mod:`.fp16`'s graph); no precision builder flag is ever set, so
there is no weakly typed fallback to drift into. TensorRT 11 is always strongly typed
and deprecates ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; 10.x needs the flag.

Build: ``parse_from_file``, a workspace limit, one optimization profile over the batch
range (tuned for batch 1, live use, unless asked otherwise; its maximum is the one the
graph was exported for), the timing cache read from and written back beside the engine,
detailed profiling verbosity (for the inspector), ``build_serialized_network``, all on
the chosen CUDA device. Then the engine is deserialized and inspected with concrete
shapes; an fp16 graph whose engine holds no fp16 layer fails the build.

``tensorrt`` is imported inside the functions; nothing here runs without it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..atomic import write_bytes_atomic
from ..errors import BackendUnavailableError, EngineError
from .engine_file import EngineMetadata, cuda_device, current_gpu, sha256_file, write_engine
from .tensorrt_lib import import_tensorrt, parse_version, tensorrt_logger

TIMING_CACHE_NAME = "timing.cache"


def network_flags(trt) -> int:
    """``create_network`` flags: ``STRONGLY_TYPED`` on 10.x; none on 11+, where every
    network is strongly typed and the flag is deprecated."""
    if parse_version(trt.__version__)[0] >= 11:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} has no strongly typed "
                                      "networks; vrn-export needs 10.3 or newer")
    return 1 << int(flag)


def classify_precision(description: str) -> str:
    """``"fp16"``, ``"fp32"``, ``"int8"`` or ``"unknown"`` for a tensor's data type or
    format string from the engine inspector (``"Half"``, ``"Row major linear FP16
    format"``, ``"Float"``, ``"Channel major FP32 format where ..."``)."""
    text = description.lower()
    if re.search(r"\bfp16\b|\bhalf\b", text):
        return "fp16"
    if re.search(r"\bint8\b", text):
        return "int8"
    if re.search(r"\bfp32\b|\bfloat\b", text):
        return "fp32"
    return "unknown"


def layer_precisions(information: dict) -> Counter:
    """Count layers by precision in the inspector's JSON (``get_engine_information``).

    A layer counts as fp16 when any of its inputs or outputs is fp16, else by its first
    known type. Tensor types are read from ``"DataType"`` (TensorRT 11) or
    ``"Format/Datatype"`` (10.x). Layers given as bare names (the engine was built
    without detailed profiling verbosity) count as ``"unknown"``.
    """
    counts: Counter = Counter()
    for layer in information.get("Layers", []):
        if not isinstance(layer, dict):
            counts["unknown"] += 1
            continue
        kinds = []
        for tensor in [*layer.get("Inputs", []), *layer.get("Outputs", [])]:
            if isinstance(tensor, dict):
                text = tensor.get("DataType") or tensor.get("Format/Datatype") or ""
                kinds.append(classify_precision(str(text)))
        known = [k for k in kinds if k != "unknown"]
        counts["fp16" if "fp16" in known else (known[0] if known else "unknown")] += 1
    return counts


def inspect_engine(engine, input_shapes: dict[str, tuple[int, ...]]) -> dict:
    """The inspector's JSON for ``engine`` with concrete ``input_shapes`` set on an
    execution context (with dynamic shapes and no context, TensorRT reports no formats)."""
    trt = import_tensorrt()
    context = engine.create_execution_context()
    for name, shape in input_shapes.items():
        if not context.set_input_shape(name, shape):
            raise EngineError(f"engine rejects input shape {shape} for {name!r}")
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def engine_io(engine) -> tuple[list[dict], list[dict]]:
    """``(inputs, outputs)`` of an engine as ``{"name", "shape", "dtype"}`` dicts (shape
    with ``-1`` for dynamic dimensions)."""
    trt = import_tensorrt()
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry = {"name": name, "shape": [int(d) for d in engine.get_tensor_shape(name)],
                 "dtype": np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name}
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        (inputs if is_input else outputs).append(entry)
    return inputs, outputs


@dataclass
class EngineBuild:
    """What :func:`build_engine` wrote and measured."""

    engine_path: Path
    metadata: EngineMetadata
    build_seconds: float
    timing_cache_path: Path
    timing_cache_reused: bool


def _timing_cache(config, path: Path) -> bool:
    """Attach the timing cache stored at ``path`` (or a fresh one) to ``config``;
    ``True`` when a stored cache was accepted."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data) if data else None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return True
    # Missing, corrupt, or from another device or version: start afresh.
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return False


def graph_max_batch(onnx_path: str | os.PathLike) -> int:
    """The largest batch ``onnx_path`` was exported for (its ``max_batch`` metadata, as
    :mod:`.onnx_export` writes it), else the export's default."""
    from .onnx_export import DEFAULT_MAX_BATCH, onnx_metadata

    try:
        return max(1, int(onnx_metadata(onnx_path).get("max_batch", DEFAULT_MAX_BATCH)))
    except ValueError:
        return DEFAULT_MAX_BATCH


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                 max_batch: int | None = None, min_batch: int = 1, opt_batch: int = 1,
                 workspace_gb: float | None = None, precision: str,
                 timing_cache: str | os.PathLike | None = None,
                 device_id: int = 0) -> EngineBuild:
    """Build ``engine_path`` (and its sidecar) from ``onnx_path`` on this GPU.

    Parameters
    ----------
    onnx_path : path
        fp32 or fp16 graph with a dynamic batch dimension (first axis of each input).
    engine_path : path
        Written atomically with ``<engine>.json`` beside it.
    max_batch, min_batch, opt_batch : int
        The optimization profile's batch range, ``min <= opt <= max``; TensorRT picks its
        kernels for ``opt_batch`` (default 1: the live pipeline's batch). ``max_batch``
        defaults to the batch the graph was exported for (:func:`graph_max_batch`).
    workspace_gb : float, optional
        Limit on the builder's workspace memory pool (GiB); TensorRT's default otherwise.
    precision : {"fp16", "fp32"}
        The graph's compute precision. For ``"fp16"`` the built engine must hold fp16
        layers; for ``"fp32"`` TF32 is switched off so results match fp32 references.
    timing_cache : path, optional
        Timing cache file, read if present and written back after the build
        (default: ``timing.cache`` beside the engine).
    device_id : int
        The CUDA device to build on (the engine runs on that GPU model).
    """
    from .onnx_export import onnx_metadata

    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if max_batch is None:
        max_batch = graph_max_batch(onnx_path)
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batch range must satisfy 1 <= min <= opt <= max, got min "
                         f"{min_batch}, opt {opt_batch}, max {max_batch}")
    batch = {"min": min_batch, "opt": opt_batch, "max": max_batch}
    cache_path = Path(timing_cache) if timing_cache else engine_path.parent / TIMING_CACHE_NAME
    gpu = current_gpu(device_id)
    if gpu is None:
        raise BackendUnavailableError(f"no CUDA GPU {device_id} found: engines are built on "
                                      "the GPU that will run them")
    with cuda_device(device_id):
        # The parser holds the weights: it stays alive until the build is done.
        builder, network, _parser = parse_network(trt, onnx_path)
        config, shapes = builder_config(trt, builder, network, batch,
                                        workspace_gb=workspace_gb, precision=precision,
                                        source=onnx_path)
        cache_reused = _timing_cache(config, cache_path)
        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - start
        if serialized is None:
            raise EngineError(f"{onnx_path}: TensorRT failed to build an engine (see its "
                              "messages above)")
        engine_bytes = bytes(serialized)
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
        precisions, inputs, outputs = _inspect_build(engine_bytes, shapes, precision,
                                                     onnx_path)
    metadata = EngineMetadata(
        tensorrt_version=str(trt.__version__), gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        onnx_file=os.path.relpath(onnx_path.resolve(), engine_path.parent.resolve()),
        onnx_sha256=sha256_file(onnx_path), engine_sha256="", engine_bytes=0,
        precision=precision, inputs=inputs, outputs=outputs, batch=batch,
        layer_precisions=dict(precisions), model_info=onnx_metadata(onnx_path),
        build_seconds=round(seconds, 3),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_engine(engine_path, engine_bytes, metadata)
    return EngineBuild(engine_path=engine_path, metadata=metadata, build_seconds=seconds,
                       timing_cache_path=cache_path, timing_cache_reused=cache_reused)


def parse_network(trt, onnx_path: Path) -> tuple:
    """``(builder, network, parser)``: a strongly typed network parsed from the ONNX file
    (:class:`EngineError` with the parser's messages when it cannot be)."""
    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    return builder, network, parser


def builder_config(trt, builder, network, batch: dict, *, workspace_gb: float | None,
                   precision: str, source: Path) -> tuple:
    """``(config, shapes)``: the builder config (workspace limit, detailed profiling
    verbosity, TF32 off for fp32, one optimization profile over ``batch`` ``{"min",
    "opt", "max"}`` for every input) and each input's shape at the ``opt`` batch."""
    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if precision == "fp32" and tf32 is not None:
        config.clear_flag(tf32)
    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise EngineError(f"{source}: input {tensor.name!r} has dynamic dimensions "
                              f"other than the batch: {shape}")
        profile.set_shape(tensor.name, *([batch[k], *shape[1:]] for k in ("min", "opt", "max")))
        shapes[tensor.name] = (batch["opt"], *shape[1:])
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"{source}: TensorRT rejects the optimization profile {batch} "
                          f"for inputs {shapes}")
    return config, shapes


def _inspect_build(engine_bytes: bytes, shapes: dict, precision: str, source: Path) -> tuple:
    """``(layer precision counts, inputs, outputs)`` of the built engine, inspected at
    ``shapes``; :class:`EngineError` when an fp16 graph built no fp16 layer."""
    from .engine_file import tensorrt_runtime

    engine = tensorrt_runtime().deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise EngineError(f"{source}: TensorRT built an engine it cannot deserialize")
    precisions = layer_precisions(inspect_engine(engine, shapes))
    if precision == "fp16" and not precisions.get("fp16"):
        raise EngineError(f"{source}: the fp16 graph built an engine without a single fp16 "
                          f"layer ({dict(precisions)}); refusing a silent fp32 engine")
    inputs, outputs = engine_io(engine)
    return precisions, inputs, outputs
