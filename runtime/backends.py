"""Step functions over ONNX Runtime: one InferenceSession runs every step of a Mesa schedule.

| backend  | execution provider                  | KV cache            | new rows written by           |
|----------|-------------------------------------|---------------------|-------------------------------|
| ort-cpu  | CPUExecutionProvider                | numpy arrays        | numpy slice assignment        |
| ort-cuda | CUDAExecutionProvider               | device OrtValues    | TensorScatter, bound in place |
| tensorrt | TensorrtExecutionProvider (+ CUDA)  | device OrtValues    | TensorScatter, bound in place |

No step copies the whole cache. On CPU, `session.run` wraps contiguous numpy inputs without a copy
(measured: decode at context 2048 costs the same with max_len 4096 and 16384, and the same as IO
binding); the graph reads only the visible slots. On a GPU the cache never leaves the device: IO
binding hands ORT the device buffers and a one-node TensorScatter graph writes the new rows into them
(same OrtValue bound as its input and output, so ORT updates it in place).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime import mesa
from runtime.errors import BackendError, LoadError
from runtime.kv_cache import CacheShape, KVCache

BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt")
PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
INSTALL = {"ort-cuda": "pip install 'mesa-engine[cuda]' (onnxruntime-gpu, CUDA 12) on a machine with an NVIDIA GPU",
           "tensorrt": "pip install 'mesa-engine[cuda,tensorrt]' (onnxruntime-gpu and TensorRT 10 libraries)"}
CACHE_DTYPES = {"fp32": np.float32, "fp16": np.float16}
TRT_CACHE_DIR = "trt_cache"  # inside the engine directory: TensorRT engines built on first load


def _scalars(step: mesa.Step, logits_to_keep: int) -> dict[str, np.ndarray]:
    feeds = {name: np.array(value, dtype=np.int64) for name, value in step.scalars().items()}
    feeds["logits_to_keep"] = np.array(logits_to_keep, dtype=np.int64)
    return feeds


class OrtStep:
    """step(input_ids, step, logits_to_keep, cache) -> (logits, new_keys, new_values) on an ORT session.

    The cache arrays are handed to ORT as they are (CPU tensors wrap the numpy buffers, no copy);
    the graph reads only the visible slots and returns the new rows, which the scheduler writes.
    """

    def __init__(self, model: str | Path | ort.InferenceSession, providers: list | None = None,
                 options: ort.SessionOptions | None = None):
        if isinstance(model, ort.InferenceSession):
            self.session = model
        else:
            self.session = ort.InferenceSession(str(model), options or ort.SessionOptions(),
                                                providers=providers or ["CPUExecutionProvider"])

    def new_cache(self, shape: CacheShape, dtype=np.float32) -> KVCache:
        return KVCache(shape, dtype)

    def __call__(self, input_ids: np.ndarray, step: mesa.Step, logits_to_keep: int, cache: KVCache):
        feeds = {"input_ids": input_ids, "k_cache": cache.k, "v_cache": cache.v, **_scalars(step, logits_to_keep)}
        logits, new_k, new_v = self.session.run(None, feeds)
        return logits, new_k, new_v


class DeviceKVCache:
    """One sequence's cache as OrtValues on a device ([layers, 1, kv_heads, max_len, head_dim]).

    `write` runs the shared TensorScatter graph with the cache bound as both input and output, so
    only the q new rows move (ORT warns "in-place optimization not activated" if it ever copies).
    """

    def __init__(self, shape: CacheShape, dtype, writer: ort.InferenceSession, device: str, device_id: int):
        self.shape, self.writer, self.device = shape, writer, device
        self.k = ort.OrtValue.ortvalue_from_shape_and_type(shape.full(), dtype, device, device_id)
        self.v = ort.OrtValue.ortvalue_from_shape_and_type(shape.full(), dtype, device, device_id)

    def write(self, pos: int, new_k: ort.OrtValue, new_v: ort.OrtValue) -> None:
        q = new_k.shape()[3]
        if pos + q > self.shape.max_len:
            raise ValueError(f"cache holds {self.shape.max_len} positions; cannot write [{pos}, {pos + q})")
        b = self.writer.io_binding()
        b.bind_ortvalue_input("k_cache", self.k)
        b.bind_ortvalue_input("v_cache", self.v)
        b.bind_ortvalue_input("new_keys", new_k)
        b.bind_ortvalue_input("new_values", new_v)
        b.bind_cpu_input("write_pos", np.full(self.shape.layers, pos, dtype=np.int64))
        b.bind_ortvalue_output("k_out", self.k)
        b.bind_ortvalue_output("v_out", self.v)
        self.writer.run_with_iobinding(b)


def cache_writer(shape: CacheShape, dtype, providers: list) -> ort.InferenceSession:
    """k_out = TensorScatter(k_cache, new_keys, write_pos) along max_len (opset 24), same for v.

    The cache's leading `layers` axis plays TensorScatter's batch axis: every layer writes at write_pos.
    """
    from onnx import TensorProto, helper  # only the device backends need it (see the cuda extra)

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    full = list(shape.full())
    rows = [shape.layers, 1, shape.kv_heads, "q", shape.head_dim]
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("TensorScatter", ["k_cache", "new_keys", "write_pos"], ["k_out"], axis=-2),
         helper.make_node("TensorScatter", ["v_cache", "new_values", "write_pos"], ["v_out"], axis=-2)],
        "mesa_cache_writer",
        [info("k_cache", elem, full), info("v_cache", elem, full), info("new_keys", elem, rows),
         info("new_values", elem, rows), info("write_pos", TensorProto.INT64, [shape.layers])],
        [info("k_out", elem, full), info("v_out", elem, full)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    return ort.InferenceSession(model.SerializeToString(), providers=providers)


class OrtDeviceStep:
    """The step function for device backends: IO binding over a DeviceKVCache.

    input_ids and the step scalars are bound from host memory (ORT moves what the device needs),
    the caches as device OrtValues; new_keys/new_values stay on the device for `DeviceKVCache.write`,
    logits come back to the host. With device="cpu" the same code runs on CPUExecutionProvider,
    which is how it is tested on machines without a GPU.
    """

    def __init__(self, session: ort.InferenceSession, device: str = "cuda", device_id: int = 0):
        self.session, self.device, self.device_id = session, device, device_id
        self.writer_providers = ([("CUDAExecutionProvider", {"device_id": device_id})] if device == "cuda"
                                 else ["CPUExecutionProvider"])
        self._writers: dict = {}

    def new_cache(self, shape: CacheShape, dtype=np.float32) -> DeviceKVCache:
        key = (shape, np.dtype(dtype))
        if key not in self._writers:
            self._writers[key] = cache_writer(shape, dtype, self.writer_providers)
        return DeviceKVCache(shape, dtype, self._writers[key], self.device, self.device_id)

    def __call__(self, input_ids: np.ndarray, step: mesa.Step, logits_to_keep: int, cache: DeviceKVCache):
        b = self.session.io_binding()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        b.bind_ortvalue_input("k_cache", cache.k)
        b.bind_ortvalue_input("v_cache", cache.v)
        for name, value in _scalars(step, logits_to_keep).items():
            b.bind_cpu_input(name, value)
        b.bind_output("logits", "cpu")
        b.bind_output("new_keys", self.device, self.device_id)
        b.bind_output("new_values", self.device, self.device_id)
        self.session.run_with_iobinding(b)
        logits, new_k, new_v = b.get_outputs()
        return logits.numpy(), new_k, new_v


def provider_chain(backend: str, directory: Path, cache: CacheShape, max_len: int, dtype: str) -> list:
    """ORT providers for a backend, best first; ORT places what a provider cannot run on the next."""
    cpu = ["CPUExecutionProvider"]
    cuda = [("CUDAExecutionProvider", {"device_id": 0})] + cpu
    if backend == "ort-cpu":
        return cpu
    if backend == "ort-cuda":
        return cuda
    dims = "x".join(str(d) for d in cache.full())
    fixed = f"k_cache:{dims},v_cache:{dims}"
    return [("TensorrtExecutionProvider", {
        "device_id": 0,
        # building a TensorRT engine takes minutes for a 7B model: build once, reuse on later loads
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(directory / TRT_CACHE_DIR),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(directory / TRT_CACHE_DIR),
        "trt_fp16_enable": dtype == "fp16",
        # one optimisation profile covers every step: 1 token (decode) up to a whole prompt
        "trt_profile_min_shapes": f"input_ids:1x1,{fixed}",
        "trt_profile_opt_shapes": f"input_ids:1x1,{fixed}",
        "trt_profile_max_shapes": f"input_ids:1x{max_len},{fixed}",
    })] + cuda


def pick_backend(requested: str) -> str:
    """The backend to start: `requested`, or for "auto" the best one this onnxruntime offers."""
    available = ort.get_available_providers()
    if requested == "auto":
        return next(b for b in ("tensorrt", "ort-cuda", "ort-cpu") if PROVIDERS[b] in available)
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r}; choose auto or one of {', '.join(BACKENDS)}")
    if PROVIDERS[requested] not in available:
        raise BackendError(f"backend {requested} is not installed: this onnxruntime has no {PROVIDERS[requested]} "
                           f"(it offers {', '.join(available)}); {INSTALL[requested]}")
    return requested


def open_backend(requested: str, directory: Path, model_path: Path, cache: CacheShape, max_len: int,
                 dtype: str) -> tuple[str, OrtStep | OrtDeviceStep]:
    """Start a session for `requested` ("auto" included); returns (the backend running, its step fn).

    ORT falls back to the next provider when one cannot start (e.g. TensorRT libraries missing), so
    the backend is read back from the session: "auto" accepts the fallback, an explicit name does not.
    """
    if dtype not in CACHE_DTYPES:
        raise BackendError(f"{dtype} engines cannot be served by this runtime (numpy has no bfloat16 and ONNX "
                           f"Runtime CPU no bfloat16 kernels); export with --dtype fp32 or fp16")
    wanted = pick_backend(requested)
    providers = provider_chain(wanted, directory, cache, max_len, dtype)
    try:
        session = ort.InferenceSession(str(model_path), providers=providers)
    except Exception as e:  # ORT's own exception types share no base class but Exception
        raise LoadError(f"ONNX Runtime cannot load {model_path}: {e}") from None
    running = next(b for b, p in PROVIDERS.items() if p == session.get_providers()[0])
    if requested != "auto" and running != requested:
        raise BackendError(f"backend {requested} could not start (ONNX Runtime fell back to "
                           f"{session.get_providers()[0]}; its log above says why)")
    return running, OrtStep(session) if running == "ort-cpu" else OrtDeviceStep(session, "cuda")
