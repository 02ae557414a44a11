"""TensorRT backend: a serialized engine (see :mod:`vrn.export`) run with
``execute_async_v3`` on its own CUDA stream, in the CUDA context the marching-cubes
kernels share.

Everything lives in the CUDA primary context, which TensorRT, torch and numba-cuda all
use, so device pointers pass between them freely. Buffers are torch CUDA tensors when
torch has CUDA, else numba-cuda device arrays; both expose ``__cuda_array_interface__``
and go straight into :func:`vrn.kernels.marching_cubes`, so the volume never leaves the
GPU. With ``cuda_graphs=True`` (torch only) each batch size's ``execute_async_v3`` is
captured once into a CUDA graph and replayed.

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
from pathlib import Path

import numpy as np

from ...errors import BackendUnavailableError, EngineError
from .base import checked_landmarks
from .cuda_arrays import device_pointer, torch_cuda


class TensorRTBackend:
    """A TensorRT engine with one input ``(N, 3, S, S)`` float32 and one output
    ``(N, D, S, S)`` (float32, or float16 converted to float32 on the device).

    Parameters
    ----------
    engine_path : path
        A serialized engine written by :mod:`vrn.export` (its sidecar metadata is checked
        by :func:`vrn.export.engine_file.load_engine`). The model description (z scale,
        provenance) is read from the ONNX file named in the sidecar, when it is there.
    device_id : int
        CUDA device the engine runs on.
    cuda_graphs : bool
        Capture each batch size into a CUDA graph (needs torch with CUDA).
    """

    name = "tensorrt"
    device = "cuda"

    def __init__(self, engine_path: str | os.PathLike, *, device_id: int = 0,
                 cuda_graphs: bool = False):
        from ...export.engine_file import load_engine
        from ...export.tensorrt_lib import import_tensorrt

        trt = import_tensorrt()  # BackendUnavailableError saying why when it cannot
        self.path = Path(engine_path)
        self.device_id = device_id
        self._trt = trt
        self._torch = torch_cuda()
        if cuda_graphs and self._torch is None:
            raise BackendUnavailableError("tensorrt backend: CUDA graphs need a CUDA build "
                                          "of torch")
        self.cuda_graphs = cuda_graphs
        self.engine, self.metadata = load_engine(self.path)
        self.model_info = _model_info(self.path.parent / self.metadata.onnx_file)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{self.path}: cannot create an execution context (out of "
                              "GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) not in (1, 2) or len(outputs) != 1:
            raise EngineError(f"{self.path}: expected one input (two for a landmark-guided "
                              f"model) and one output tensor, got {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.guided = len(inputs) == 2
        self.landmarks_name = inputs[1] if self.guided else None
        if self.guided:
            lm_shape = tuple(self.engine.get_tensor_shape(self.landmarks_name))
            if len(lm_shape) != 3 or lm_shape[1:] != (68, 3) or \
                    self.engine.get_tensor_dtype(self.landmarks_name) != trt.DataType.FLOAT:
                raise EngineError(f"{self.path}: input {self.landmarks_name!r} is not "
                                  f"(N, 68, 3) float32 (shape {lm_shape})")
        in_shape = tuple(self.engine.get_tensor_shape(self.input_name))
        out_shape = tuple(self.engine.get_tensor_shape(self.output_name))
        if len(in_shape) != 4 or in_shape[1] != 3 or len(out_shape) != 4:
            raise EngineError(f"{self.path}: tensor shapes {in_shape} -> {out_shape} are not "
                              "(N, 3, S, S) -> (N, D, S, S)")
        if self.engine.get_tensor_dtype(self.input_name) != trt.DataType.FLOAT:
            raise EngineError(f"{self.path}: input {self.input_name!r} is "
                              f"{self.engine.get_tensor_dtype(self.input_name)}, expected "
                              "float32 (build from a graph with fp32 inputs)")
        self.input_size = int(in_shape[2])
        self.out_depth = int(out_shape[1])
        if in_shape[0] >= 0:
            self.min_batch = self.max_batch = int(in_shape[0])
        else:
            low, _, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self._out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.precision = self.metadata.precision
        self.stream = self._make_stream()
        self._graphs: dict[int, tuple] = {}

    # ------------------------------------------------------------------ device memory

    def _make_stream(self):
        """A non-default stream (TensorRT synchronises extra on the legacy default one)."""
        if self._torch is not None:
            return self._torch.cuda.Stream(device=self.device_id)
        from numba import cuda

        cuda.select_device(self.device_id)
        return cuda.stream()

    @property
    def stream_handle(self) -> int:
        """The ``cudaStream_t`` as an int, for ``execute_async_v3`` and other libraries."""
        if self._torch is not None:
            return int(self.stream.cuda_stream)
        handle = self.stream.handle
        return int(getattr(handle, "value", handle) or 0)

    def _empty(self, shape, dtype):
        if self._torch is not None:
            torch = self._torch
            with torch.cuda.stream(self.stream):  # the allocation belongs to our stream
                return torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dtype).name](torch),
                                   device=torch.device("cuda", self.device_id))
        from numba import cuda

        return cuda.device_array(shape, dtype=dtype, stream=self.stream)

    def _upload(self, batch):
        """``batch`` as a contiguous float32 CUDA array on this backend's stream."""
        if self._torch is not None:
            torch = self._torch
            x = batch if isinstance(batch, torch.Tensor) else torch.as_tensor(batch)
            if x.device.type == "cuda":  # made on the caller's stream: order ours after it
                self.stream.wait_stream(torch.cuda.current_stream(x.device))
                x.record_stream(self.stream)
            with torch.cuda.stream(self.stream):
                return x.to(device=torch.device("cuda", self.device_id),
                            dtype=torch.float32, non_blocking=True).contiguous()
        from numba import cuda

        if cuda.is_cuda_array(batch):
            x = cuda.as_cuda_array(batch)
            if x.dtype != np.float32 or not x.is_c_contiguous():
                raise ValueError("tensorrt backend: a CUDA batch must be C-contiguous float32")
            return x
        return cuda.to_device(np.ascontiguousarray(batch, dtype=np.float32), stream=self.stream)

    # ---------------------------------------------------------------------- inference

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
        as_numpy = isinstance(batch, np.ndarray)
        if on_device is None:
            on_device = not as_numpy
        shape = tuple(batch.shape)
        if len(shape) != 4 or shape[1:] != (3, self.input_size, self.input_size):
            raise ValueError(f"batch must be (N, 3, {self.input_size}, {self.input_size}), "
                             f"got {shape}")
        n = shape[0]
        x = self._upload(batch)
        guide = self._upload(checked_landmarks(landmarks, n)) if self.guided else None
        chunks = [self._run(x[i:i + self.max_batch],
                            None if guide is None else guide[i:i + self.max_batch])
                  for i in range(0, n, self.max_batch)]
        y = chunks[0] if len(chunks) == 1 else self._concat(chunks)
        if on_device:
            return self._hand_over(y)
        if self._torch is None:
            host = y.copy_to_host(stream=self.stream)  # asynchronous on a stream
            self.stream.synchronize()
            return host
        with self._torch.cuda.stream(self.stream):
            return y.cpu().numpy()  # a blocking copy, ordered after the engine

    def _hand_over(self, y):
        """Order the consumer's stream after ours without a host wait: torch's current
        stream (where :mod:`vrn.kernels` launches for torch tensors), or the legacy default
        stream (numba device arrays). The volume stays where it is."""
        if self._torch is not None:
            torch = self._torch
            consumer = torch.cuda.current_stream(y.device)
            consumer.wait_stream(self.stream)
            y.record_stream(consumer)  # its memory is in use there until freed
            return y
        from numba import cuda

        done = cuda.event(timing=False)
        done.record(self.stream)
        done.wait(0)
        return y

    def _run(self, x, guide=None):
        n = int(x.shape[0])
        if n < self.min_batch:
            raise ValueError(f"{self.path}: engine needs batches of at least {self.min_batch}")
        if self.cuda_graphs:
            return self._replay(x, guide)
        y = self._empty((n, self.out_depth, self.input_size, self.input_size), self._out_dtype)
        self._execute(x, y, guide)
        return self._as_float32(y)

    def _execute(self, x, y, guide=None) -> None:
        n = int(x.shape[0])
        if not self.context.set_input_shape(self.input_name, (n, 3, self.input_size,
                                                               self.input_size)):
            raise EngineError(f"{self.path}: batch {n} is outside the engine's profile "
                              f"[{self.min_batch}, {self.max_batch}]")
        if self.guided:
            if not self.context.set_input_shape(self.landmarks_name, (n, 68, 3)):
                raise EngineError(f"{self.path}: landmarks batch {n} is outside the "
                                  "engine's profile")
            self.context.set_tensor_address(self.landmarks_name, device_pointer(guide))
        self.context.set_tensor_address(self.input_name, device_pointer(x))
        self.context.set_tensor_address(self.output_name, device_pointer(y))
        if not self.context.execute_async_v3(self.stream_handle):
            raise EngineError(f"{self.path}: execute_async_v3 failed (see TensorRT's log)")

    def _replay(self, x, guide=None):
        """CUDA-graph path: static buffers per batch size, a copy of the output out."""
        torch = self._torch
        n = int(x.shape[0])
        if n not in self._graphs:
            self._graphs[n] = self._capture(n)
        graph, static_in, static_guide, static_out = self._graphs[n]
        with torch.cuda.stream(self.stream):
            static_in.copy_(x, non_blocking=True)
            if static_guide is not None:
                static_guide.copy_(guide, non_blocking=True)
            graph.replay()
            return self._as_float32(static_out).clone()

    def _capture(self, n: int):
        torch = self._torch
        s = self.input_size
        static_in = self._empty((n, 3, s, s), np.float32)
        static_guide = self._empty((n, 68, 3), np.float32) if self.guided else None
        static_out = self._empty((n, self.out_depth, s, s), self._out_dtype)
        with torch.cuda.stream(self.stream):
            static_in.zero_()
            if static_guide is not None:
                static_guide.fill_(s / 2)
        # One plain run first: TensorRT applies deferred shape/address updates there,
        # which must not happen inside the capture.
        self._execute(static_in, static_out, static_guide)
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            if not self.context.execute_async_v3(self.stream_handle):
                raise EngineError(f"{self.path}: execute_async_v3 failed during CUDA-graph "
                                  "capture")
        return graph, static_in, static_guide, static_out

    def _as_float32(self, y):
        if self._out_dtype == np.float32:
            return y
        if self._torch is not None:
            with self._torch.cuda.stream(self.stream):
                return y.float()
        raise BackendUnavailableError("tensorrt backend: an fp16 engine output needs torch "
                                      "with CUDA for the conversion to float32")

    def _concat(self, chunks):
        if self._torch is not None:
            with self._torch.cuda.stream(self.stream):
                return self._torch.cat(chunks)
        from numba import cuda

        total = sum(int(c.shape[0]) for c in chunks)
        out = cuda.device_array((total,) + tuple(chunks[0].shape[1:]), np.float32,
                                stream=self.stream)
        start = 0
        for c in chunks:
            out[start:start + c.shape[0]].copy_to_device(c, stream=self.stream)
            start += c.shape[0]
        return out

    def synchronize(self) -> None:
        """Wait for the work queued on :attr:`stream` (for timing)."""
        self.stream.synchronize()

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        buffers = "torch" if self._torch is not None else "numba-cuda"
        return (f"tensorrt {self._trt.__version__} ({self.path.name}, {self.precision}, "
                f"batch {self.min_batch}-{self.max_batch}, {buffers} buffers{graphs})")


_TORCH_DTYPES = {"float32": lambda torch: torch.float32,
                 "float16": lambda torch: torch.float16}


def _model_info(onnx_path: Path):
    """The :class:`~vrn.model.ModelInfo` stored in the metadata of the ONNX file the
    engine was built from (when that file is still beside the engine)."""
    from ...model import ModelInfo

    if not onnx_path.is_file():
        return None
    from ...export.onnx_export import onnx_metadata

    meta = onnx_metadata(onnx_path)
    if "architecture" not in meta or "config" not in meta:
        return None
    try:
        return ModelInfo.from_metadata(meta)
    except (KeyError, ValueError, TypeError):
        return None
