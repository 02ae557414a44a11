"""CUDA plumbing the GPU backends share: PyTorch with CUDA when it is there, the device
address of a CUDA array, and the one buffer provider (:func:`device_buffers`) behind the
TensorRT and ONNX Runtime GPU backends.

A buffer provider owns one non-default CUDA stream on one device and makes, fills,
joins, converts and hands back the device arrays on it, each in that device's context
(:meth:`activate`), so a provider for ``cuda:1`` never touches device 0.
:class:`TorchBuffers` (torch CUDA tensors) is used wherever torch has CUDA;
:class:`NumbaBuffers` (numba-cuda device arrays) is the fallback. Both kinds expose
``__cuda_array_interface__``, so either goes straight into :mod:`vrn.kernels` and to
TensorRT or ONNX Runtime by address. Only the torch provider captures CUDA graphs, in
thread-local capture mode (as trtexec does), so another thread's CUDA calls cannot
invalidate a capture.
"""

from __future__ import annotations

import numpy as np

from ...errors import BackendUnavailableError


def torch_cuda():
    """The ``torch`` module when it is installed and sees a CUDA device, else ``None``."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def device_pointer(array) -> int:
    """Device address of a CUDA array (``__cuda_array_interface__``: Numba device arrays,
    CUDA torch tensors, CuPy arrays)."""
    return int(array.__cuda_array_interface__["data"][0])


def device_buffers(device_id: int = 0):
    """The buffer provider for CUDA device ``device_id``: :class:`TorchBuffers` when torch
    has CUDA, else :class:`NumbaBuffers` (:class:`~vrn.errors.BackendUnavailableError`
    saying why when neither can run)."""
    torch = torch_cuda()
    if torch is not None:
        return TorchBuffers(torch, device_id)
    return NumbaBuffers(device_id)


def describe_buffers(buffers) -> str:
    """``"torch CUDA tensors on cuda:0"``: what a provider's arrays are, for messages."""
    kinds = {"torch": "torch CUDA tensors", "numba-cuda": "numba-cuda device arrays"}
    return f"{kinds.get(buffers.kind, buffers.kind)} on cuda:{buffers.device_id}"


class TorchBuffers:
    """Device arrays as torch CUDA tensors on a stream of their own.

    Parameters
    ----------
    torch : module
        ``torch``, with CUDA (see :func:`torch_cuda`).
    device_id : int
        The CUDA device.
    """

    kind = "torch"
    graphs = True  # can capture CUDA graphs

    def __init__(self, torch, device_id: int = 0):
        self.torch = torch
        self.device_id = int(device_id)
        if not 0 <= self.device_id < torch.cuda.device_count():
            raise BackendUnavailableError(f"no CUDA device {device_id} (torch sees "
                                          f"{torch.cuda.device_count()})")
        self.device = torch.device("cuda", self.device_id)
        # A non-default stream: TensorRT synchronises extra on the legacy default one.
        self.stream = torch.cuda.Stream(device=self.device)

    def activate(self):
        """A context manager making our device current (``torch.cuda.device``)."""
        return self.torch.cuda.device(self.device)

    @property
    def stream_handle(self) -> int:
        """The ``cudaStream_t`` as an int (``execute_async_v3``, ONNX Runtime)."""
        return int(self.stream.cuda_stream)

    def is_device_array(self, array) -> bool:
        return isinstance(array, self.torch.Tensor) and array.device.type == "cuda"

    def pointer(self, array) -> int:
        return int(array.data_ptr())

    def empty(self, shape, dtype=np.float32):
        """An uninitialised ``shape`` array of NumPy ``dtype`` (float32 or float16)."""
        with self.torch.cuda.stream(self.stream):  # the allocation belongs to our stream
            return self.torch.empty(tuple(shape), dtype=_torch_dtype(self.torch, dtype),
                                    device=self.device)

    def upload(self, array, out=None):
        """``array`` (NumPy, torch CPU or CUDA) as a C-contiguous float32 CUDA tensor,
        ordered on our stream after the work already queued for it. A host array is
        copied into ``out`` (a float32 tensor of its shape) when given; a CUDA tensor
        is used in place when it already is contiguous float32."""
        torch = self.torch
        x = array if isinstance(array, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(array, dtype=np.float32))
        if x.device.type == "cuda":  # made on the caller's stream: order ours after it
            self.stream.wait_stream(torch.cuda.current_stream(x.device))
            x.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            if out is not None and x.device.type == "cpu":
                return out.copy_(x, non_blocking=True)
            return x.to(device=self.device, dtype=torch.float32,
                        non_blocking=True).contiguous()

    def copy_into(self, dst, src) -> None:
        """Copy device array ``src`` into ``dst`` (same shape) on our stream."""
        with self.torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def fill(self, array, value: float) -> None:
        with self.torch.cuda.stream(self.stream):
            array.fill_(value)

    def clone(self, array):
        with self.torch.cuda.stream(self.stream):
            return array.clone()

    def as_float32(self, array):
        if array.dtype == self.torch.float32:
            return array
        with self.torch.cuda.stream(self.stream):
            return array.float()

    def concat(self, chunks: list):
        with self.torch.cuda.stream(self.stream):
            return self.torch.cat(chunks)

    def to_host(self, array) -> np.ndarray:
        """A NumPy copy, after the work queued on our stream (a blocking copy)."""
        with self.torch.cuda.stream(self.stream):
            return array.cpu().numpy()

    def hand_over(self, array):
        """Order the consumer's stream (torch's current one, where :mod:`vrn.kernels`
        launches for torch tensors) after ours, without a host wait; the array stays
        where it is."""
        consumer = self.torch.cuda.current_stream(array.device)
        consumer.wait_stream(self.stream)
        array.record_stream(consumer)  # its memory is in use there until freed
        return array

    def capture(self, launch):
        """A ``torch.cuda.CUDAGraph`` of what ``launch()`` queues on our stream, captured
        in thread-local mode (``cudaStreamCaptureModeThreadLocal``, as trtexec
        captures): unsafe CUDA calls from other threads do not invalidate it. A failed
        capture raises (torch's ``RuntimeError``)."""
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, stream=self.stream,
                                   capture_error_mode="thread_local"):
            launch()
        return graph

    def replay(self, graph) -> None:
        """Replay a graph from :meth:`capture` on our stream."""
        with self.torch.cuda.stream(self.stream):
            graph.replay()

    def synchronize(self) -> None:
        self.stream.synchronize()


class NumbaBuffers:
    """Device arrays as numba-cuda device arrays on a stream of their own (without torch
    CUDA). No CUDA graphs, and no float16-to-float32 conversion on the device."""

    kind = "numba-cuda"
    graphs = False

    def __init__(self, device_id: int = 0):
        try:
            from numba import cuda
        except ImportError:
            raise BackendUnavailableError("GPU buffers need torch with CUDA or numba-cuda "
                                          "(`pip install 'vrn-edge[gpu]'`)") from None
        self.cuda = cuda
        self.device_id = int(device_id)
        try:
            if not cuda.is_available():
                raise RuntimeError("numba-cuda finds no CUDA driver or device")
            with self.activate():
                self.stream = cuda.stream()
        except Exception as exc:  # no driver or device: numba's own error types
            raise BackendUnavailableError(f"no usable CUDA device {device_id} for "
                                          f"numba-cuda ({exc})") from None

    def activate(self):
        """A context manager making our device's primary context current."""
        from ...kernels._cuda import on_device

        return on_device(self.device_id)

    @property
    def stream_handle(self) -> int:
        handle = self.stream.handle
        return int(getattr(handle, "value", handle) or 0)

    def is_device_array(self, array) -> bool:
        return self.cuda.is_cuda_array(array)

    def pointer(self, array) -> int:
        return device_pointer(array)

    def empty(self, shape, dtype=np.float32):
        with self.activate():
            return self.cuda.device_array(tuple(shape), dtype=dtype, stream=self.stream)

    def upload(self, array, out=None):
        """``array`` as a C-contiguous float32 device array: a CUDA array in place (it
        must already be contiguous float32), a host array copied (into ``out`` when
        given) on our stream."""
        with self.activate():
            if self.cuda.is_cuda_array(array):
                x = self.cuda.as_cuda_array(array)
                if x.dtype != np.float32 or not x.is_c_contiguous():
                    raise ValueError("a CUDA batch must be C-contiguous float32")
                return x
            host = np.ascontiguousarray(array, dtype=np.float32)
            if out is not None:
                out.copy_to_device(host, stream=self.stream)
                return out
            return self.cuda.to_device(host, stream=self.stream)

    def copy_into(self, dst, src) -> None:
        with self.activate():
            dst.copy_to_device(src, stream=self.stream)

    def fill(self, array, value: float) -> None:
        with self.activate():
            array.copy_to_device(np.full(array.shape, value, array.dtype),
                                 stream=self.stream)

    def clone(self, array):
        out = self.empty(array.shape, array.dtype)
        with self.activate():
            out.copy_to_device(array, stream=self.stream)
        return out

    def as_float32(self, array):
        if array.dtype == np.float32:
            return array
        raise BackendUnavailableError("a float16 engine output needs torch with CUDA for "
                                      "the conversion to float32")

    def concat(self, chunks: list):
        total = sum(int(c.shape[0]) for c in chunks)
        out = self.empty((total,) + tuple(chunks[0].shape[1:]), chunks[0].dtype)
        start = 0
        with self.activate():
            for c in chunks:
                out[start:start + c.shape[0]].copy_to_device(c, stream=self.stream)
                start += c.shape[0]
        return out

    def to_host(self, array) -> np.ndarray:
        with self.activate():
            host = array.copy_to_host(stream=self.stream)  # asynchronous on a stream
            self.stream.synchronize()
        return host

    def hand_over(self, array):
        """Order the legacy default stream (where :mod:`vrn.kernels` launches for numba
        arrays) after ours with an event, without a host wait."""
        with self.activate():
            done = self.cuda.event(timing=False)
            done.record(self.stream)
            done.wait(0)
        return array

    def capture(self, launch):
        raise BackendUnavailableError("CUDA graphs need a CUDA build of torch")

    replay = capture

    def synchronize(self) -> None:
        with self.activate():
            self.stream.synchronize()


def _torch_dtype(torch, dtype):
    name = np.dtype(dtype).name
    if name not in ("float32", "float16"):
        raise ValueError(f"no device buffers of {name}")
    return getattr(torch, name)
