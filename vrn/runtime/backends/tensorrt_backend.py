"""TensorRT backend: a serialized engine (see :mod:`vrn.export`) run with
``execute_async_v3`` on its own CUDA stream, in the CUDA context the marching-cubes
kernels share.

Two layers: :class:`TensorRTEngine` loads any engine file ``vrn-export`` writes (checked
by :func:`vrn.export.engine_file.load_engine`), checks its inputs and output once, and
runs batches on the device through one buffer provider
(:func:`~.cuda_arrays.device_buffers`); :class:`TensorRTBackend` is the VRN's
:class:`~.base.Backend` on top of it, and the landmark stage runs its engine through
the same class (:class:`vrn.runtime.landmarks.TensorRTLandmarkRunner`). ``vrn-export``
checks its engines through these same classes.

Everything lives in the primary context of the engine's device (``device_id``: the
engine is deserialized, its execution contexts made and its work queued with that
device current), which TensorRT, torch and numba-cuda all use, so device pointers pass
between them freely. Buffers are torch CUDA tensors when torch has CUDA, else numba-cuda
device arrays; both expose ``__cuda_array_interface__`` and go straight into
:func:`vrn.kernels.marching_cubes`, so the volume never leaves the GPU.

With ``cuda_graphs=True`` (torch only) each batch size gets, as trtexec does, an
execution context of its own whose ``execute_async_v3`` is captured once, in
thread-local capture mode, into a CUDA graph and replayed. A capture that fails (an
engine whose layers cannot be captured, an enqueue error) is reported in a warning and
that batch size runs without a graph.

The engine runs on its own (non-default) stream; a volume handed back on the device is
ordered before the caller's stream by an event, so the marching-cubes kernels that follow
on that stream read it without a host synchronisation or a copy.

The tensorrt module is imported here, lazily; :mod:`vrn.runtime.backends` imports this
module only when the TensorRT backend is asked for. Written against the TensorRT 10/11
Python API (tensor-name I/O, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``); not run on this project's CPU-only CI.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np

from ...errors import BackendUnavailableError, EngineError
from .base import checked_landmarks, info_from_metadata
from . import cuda_arrays


class TensorRTEngine:
    """An engine file with one execution context: float32 inputs with the batch first,
    one output (float32, or float16 converted to float32 on the device).

    Parameters
    ----------
    engine_path : path
        A serialized engine with its sidecar (:func:`vrn.export.engine_file.load_engine`
        checks both against this machine).
    num_inputs : tuple of int
        The input counts accepted (the VRN: 1, or 2 with landmarks).
    device_id : int
        CUDA device the engine runs on.

    Attributes
    ----------
    input_names, output_name : list of str, str
    input_shapes, output_shape : dict of tuple, tuple
        The engine's shapes, ``-1`` for the dynamic batch.
    min_batch, max_batch : int
        The batch range of the first input (its optimization profile, or its fixed
        batch).
    buffers : TorchBuffers or NumbaBuffers
        The device arrays and the stream the engine runs on.
    """

    def __init__(self, engine_path: str | os.PathLike, *, num_inputs: tuple[int, ...] = (1,),
                 device_id: int = 0):
        from ...export import engine_file
        from ...export.tensorrt_lib import import_tensorrt

        trt = import_tensorrt()  # BackendUnavailableError saying why when it cannot
        self.trt = trt
        self.path = Path(engine_path)
        self.device_id = int(device_id)
        self.engine, self.metadata = engine_file.load_engine(self.path,
                                                             device_id=self.device_id)
        self.context = self.new_context()
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names
                            if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.input_names) not in num_inputs or len(outputs) != 1:
            counts = " or ".join(str(n) for n in num_inputs)
            raise EngineError(f"{self.path}: expected {counts} input(s) and one output "
                              f"tensor, got {self.input_names} and {outputs}")
        self.output_name = outputs[0]
        for name in self.input_names:
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise EngineError(f"{self.path}: input {name!r} is "
                                  f"{engine.get_tensor_dtype(name)}, expected float32 (build "
                                  "from a graph with fp32 inputs)")
        self.input_shapes = {n: tuple(int(d) for d in engine.get_tensor_shape(n))
                             for n in self.input_names}
        self.output_shape = tuple(int(d) for d in engine.get_tensor_shape(self.output_name))
        self.out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.output_name)))
        first = self.input_names[0]
        if self.input_shapes[first][0] >= 0:
            self.min_batch = self.max_batch = self.input_shapes[first][0]
        else:
            low, _, high = engine.get_tensor_profile_shape(first, 0)
            self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self.buffers = cuda_arrays.device_buffers(self.device_id)

    def activate(self):
        """A context manager making the engine's device current (TensorRT queues work on,
        and makes contexts for, the current device)."""
        from ...export import engine_file

        return engine_file.cuda_device(self.device_id)

    def new_context(self):
        """A new execution context of the engine, on its device."""
        with self.activate():
            context = self.engine.create_execution_context()
        if context is None:
            raise EngineError(f"{self.path}: cannot create an execution context (out of "
                              "GPU memory?)")
        return context

    def run(self, inputs: Sequence, chunk: Callable | None = None):
        """The output for ``inputs`` (host or device arrays, batch first, one per
        input name) as a float32 device array on :attr:`buffers`' stream.

        Batches larger than the engine's profile run in chunks of :attr:`max_batch`;
        ``chunk(device_inputs) -> output`` runs one (default :meth:`run_chunk`).
        """
        n = int(inputs[0].shape[0])
        device = [self.buffers.upload(array) for array in inputs]
        chunk = chunk or self.run_chunk
        outputs = []
        for i in range(0, n, self.max_batch):
            part = [array[i:i + self.max_batch] for array in device]
            if int(part[0].shape[0]) < self.min_batch:
                raise ValueError(f"{self.path}: engine needs batches of at least "
                                 f"{self.min_batch}")
            with self.activate():
                outputs.append(chunk(part))
        return outputs[0] if len(outputs) == 1 else self.buffers.concat(outputs)

    def run_chunk(self, inputs: Sequence):
        """One run on device ``inputs`` within the profile: a new float32 output."""
        shape = self.set_shapes(inputs)
        output = self.buffers.empty(shape, self.out_dtype)
        self.execute(inputs, output)
        return self.buffers.as_float32(output)

    def set_shapes(self, inputs: Sequence, context=None) -> tuple[int, ...]:
        """Set the input shapes of ``inputs`` on ``context`` (default: the engine's first
        execution context); the output shape."""
        context = context or self.context
        for name, array in zip(self.input_names, inputs):
            shape = tuple(int(d) for d in array.shape)
            if not context.set_input_shape(name, shape):
                raise EngineError(f"{self.path}: input {name!r} of shape {shape} is outside "
                                  f"the engine's profile (batch {self.min_batch} to "
                                  f"{self.max_batch})")
        return tuple(int(d) for d in context.get_tensor_shape(self.output_name))

    def execute(self, inputs: Sequence, output, context=None) -> None:
        """Queue one run of ``context`` (default: the first) on the stream: device
        ``inputs`` (shapes set by :meth:`set_shapes`) into the device array ``output``."""
        context = context or self.context
        self.bind(inputs, output, context)
        with self.activate():
            ok = context.execute_async_v3(self.buffers.stream_handle)
        if not ok:
            raise EngineError(f"{self.path}: execute_async_v3 failed (see TensorRT's log)")

    def bind(self, inputs: Sequence, output, context) -> None:
        """Give ``context`` the addresses of ``inputs`` and ``output``."""
        pointer = self.buffers.pointer
        for name, array in zip(self.input_names, inputs):
            context.set_tensor_address(name, pointer(array))
        context.set_tensor_address(self.output_name, pointer(output))


class TensorRTBackend:
    """A VRN engine with input ``(N, 3, S, S)`` float32 (and ``(N, 68, 3)`` float32
    landmarks for a landmark-guided model) and one output ``(N, D, S, S)`` (float32, or
    float16 converted to float32 on the device).

    Parameters
    ----------
    engine_path : path
        A serialized engine written by :mod:`vrn.export` (its sidecar metadata is checked
        by :func:`vrn.export.engine_file.load_engine`). The model description (z scale,
        provenance) is the sidecar's copy of the ONNX file's metadata.
    device_id : int
        CUDA device the engine runs on.
    cuda_graphs : bool
        Capture each batch size into a CUDA graph (needs torch with CUDA), with an
        execution context of its own; a batch size whose capture fails runs without.
    """

    name = "tensorrt"
    device = "cuda"

    def __init__(self, engine_path: str | os.PathLike, *, device_id: int = 0,
                 cuda_graphs: bool = False):
        self.runner = TensorRTEngine(engine_path, num_inputs=(1, 2), device_id=device_id)
        runner = self.runner
        self.path, self.device_id = runner.path, device_id
        self.engine, self.metadata, self.context = runner.engine, runner.metadata, runner.context
        if cuda_graphs and not runner.buffers.graphs:
            raise BackendUnavailableError("tensorrt backend: CUDA graphs need a CUDA build "
                                          "of torch")
        self.cuda_graphs = cuda_graphs
        self.model_info = info_from_metadata(self.metadata.model_info)
        self.input_name = runner.input_names[0]
        self.output_name = runner.output_name
        self.guided = len(runner.input_names) == 2
        self.landmarks_name = runner.input_names[1] if self.guided else None
        _check_vrn_shapes(runner, self.landmarks_name)
        in_shape = runner.input_shapes[self.input_name]
        self.input_size = int(in_shape[2])
        self.out_depth = int(runner.output_shape[1])
        self.min_batch, self.max_batch = runner.min_batch, runner.max_batch
        self.precision = self.metadata.precision
        self.stream = runner.buffers.stream
        self._graphs: dict[int, _Graph | None] = {}  # per batch size; None: capture failed

    @property
    def stream_handle(self) -> int:
        """The ``cudaStream_t`` as an int, for ``execute_async_v3`` and other libraries."""
        return self.runner.buffers.stream_handle

    def infer(self, batch, landmarks=None, *, on_device: bool | None = None):
        """Occupancy volumes of a batch of crops.

        Parameters
        ----------
        batch : (N, 3, S, S) float32 ndarray, torch CUDA tensor or numba device array
            RGB in [0, 1]. Batches larger than the engine's profile run in chunks.
        landmarks : (N, 68, 3) float32 array, optional
            Crop pixels ``(x, y, z)``; required by a landmark-guided engine, else ignored.
        on_device : bool, optional
            Return a CUDA array (torch tensor, or numba device array without torch), or
            a NumPy array. Default: the kind of ``batch``. A CUDA result is ordered
            before later work on the caller's stream (torch's current stream, or the
            default stream) by an event, without a host wait.

        Returns
        -------
        (N, D, S, S) float32, ``(D, H, W)`` per image.
        """
        if on_device is None:
            on_device = not isinstance(batch, np.ndarray)
        shape = tuple(batch.shape)
        if len(shape) != 4 or shape[1:] != (3, self.input_size, self.input_size):
            raise ValueError(f"batch must be (N, 3, {self.input_size}, {self.input_size}), "
                             f"got {shape}")
        inputs = [batch]
        if self.guided:
            inputs.append(checked_landmarks(landmarks, shape[0]))
        y = self.runner.run(inputs, self._replay if self.cuda_graphs else None)
        buffers = self.runner.buffers
        return buffers.hand_over(y) if on_device else buffers.to_host(y)

    def _replay(self, inputs):
        """CUDA-graph path: static buffers and an execution context per batch size, a
        copy of the output out; a batch size whose capture failed runs eagerly."""
        buffers = self.runner.buffers
        n = int(inputs[0].shape[0])
        if n not in self._graphs:
            self._graphs[n] = self._capture(n)
        captured = self._graphs[n]
        if captured is None:
            return self.runner.run_chunk(inputs)
        for static, array in zip(captured.inputs, inputs):
            buffers.copy_into(static, array)
        buffers.replay(captured.graph)
        y = buffers.as_float32(captured.output)
        return buffers.clone(y) if y is captured.output else y  # the next replay overwrites it

    def _capture(self, n: int) -> _Graph | None:
        """Capture batch size ``n`` on a new execution context (one per graph, as
        trtexec does: a graph replays the context's own internal memory); ``None``, with
        a warning, when the capture fails."""
        runner, buffers = self.runner, self.runner.buffers
        context = runner.new_context()
        s = self.input_size
        static_inputs = [buffers.empty((n, 3, s, s))]
        buffers.fill(static_inputs[0], 0.0)
        if self.guided:
            static_inputs.append(buffers.empty((n, 68, 3)))
            buffers.fill(static_inputs[1], s / 2)
        static_out = buffers.empty(runner.set_shapes(static_inputs, context), runner.out_dtype)
        # One plain run first: TensorRT applies deferred shape/address updates there,
        # which must not happen inside the capture.
        runner.execute(static_inputs, static_out, context)
        buffers.synchronize()
        queued: list[bool] = []

        def launch():  # an error raised inside the capture would be masked by its end
            queued.append(bool(context.execute_async_v3(buffers.stream_handle)))

        try:
            with runner.activate():
                graph = buffers.capture(launch)
        except Exception as exc:  # torch's capture errors (RuntimeError and kin)
            problem = f"{type(exc).__name__}: {exc}"
        else:
            problem = None if queued == [True] else "execute_async_v3 failed in the capture"
        if problem is not None:
            warnings.warn(f"{self.path}: CUDA-graph capture of batch {n} failed ({problem}); "
                          "that batch size runs without a CUDA graph", RuntimeWarning,
                          stacklevel=3)
            return None
        return _Graph(graph, context, static_inputs, static_out)

    def synchronize(self) -> None:
        """Wait for the work queued on :attr:`stream` (for timing)."""
        self.runner.buffers.synchronize()

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        return (f"tensorrt {self.runner.trt.__version__} ({self.path.name}, {self.precision}, "
                f"batch {self.min_batch}-{self.max_batch}, {self.runner.buffers.kind} "
                f"buffers{graphs})")


class _Graph:
    """One batch size's CUDA graph, the execution context it was captured from (kept
    alive with it) and its static input and output buffers."""

    def __init__(self, graph, context, inputs: list, output):
        self.graph, self.context, self.inputs, self.output = graph, context, inputs, output


def _check_vrn_shapes(runner: TensorRTEngine, landmarks_name: str | None) -> None:
    """:class:`EngineError` unless ``runner``'s engine is ``(N, 3, S, S)`` ->
    ``(N, D, S, S)`` (with ``(N, 68, 3)`` landmarks for a landmark-guided one)."""
    in_shape = runner.input_shapes[runner.input_names[0]]
    out_shape = runner.output_shape
    if len(in_shape) != 4 or in_shape[1] != 3 or len(out_shape) != 4:
        raise EngineError(f"{runner.path}: tensor shapes {in_shape} -> {out_shape} are not "
                          "(N, 3, S, S) -> (N, D, S, S)")
    if landmarks_name is not None:
        lm_shape = runner.input_shapes[landmarks_name]
        if len(lm_shape) != 3 or lm_shape[1:] != (68, 3):
            raise EngineError(f"{runner.path}: input {landmarks_name!r} is not (N, 68, 3) "
                              f"float32 (shape {lm_shape})")
