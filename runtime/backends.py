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

from runtime import custom_ops, mesa
from runtime.artifact import DECODE_CACHE, DECODE_INPUTS, DECODE_PRESENT
from runtime.errors import BackendError, LoadError
from runtime.decode_cache import DecodeCache
from runtime.device_cache import DeviceDecodeCache, DeviceKVCache, cache_writer
from runtime.kv_cache import CacheShape, KVCache

BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt")
PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
INSTALL = {"ort-cuda": "pip install 'mesa-engine[cuda]' (onnxruntime-gpu, CUDA 12) on a machine with an NVIDIA GPU",
           "tensorrt": "pip install 'mesa-engine[cuda,tensorrt]' (onnxruntime-gpu and TensorRT 10 libraries)"}
CACHE_DTYPES = {"fp32": np.float32, "fp16": np.float16}
TRT_CACHE_DIR = "trt_cache"  # inside the engine directory: TensorRT engines built on first load
TRT_CALIBRATION_TABLE = "calibration.flatbuffers"  # in TRT_CACHE_DIR, written by calibration/tensorrt.py


def _scalars(step: mesa.Step, logits_to_keep: int) -> dict[str, np.ndarray]:
    feeds = {name: np.array(value, dtype=np.int64) for name, value in step.scalars().items()}
    feeds["logits_to_keep"] = np.array(logits_to_keep, dtype=np.int64)
    return feeds


def _decode_feeds(tokens: np.ndarray, positions: np.ndarray, placeholders: dict) -> dict:
    """The host inputs of an in-place decode call: B rows, row r consuming tokens[r] at positions[r]."""
    B = len(tokens)
    return {"input_ids": np.asarray(tokens, np.int64).reshape(B, 1), **placeholders,
            "sink_len": np.array(0), "window_start": np.array(0), "write_pos": np.array(0),
            "chunk_width": np.array(1), "logits_to_keep": np.array(1), "decode_step": np.array(True),
            "seqlens_k": np.asarray(positions, np.int32),
            "total_sequence_length": np.array(int(np.max(positions)) + 1, np.int32)}


def _unread_caches(session: ort.InferenceSession, batch: int) -> dict:
    """k_cache / v_cache for a decode call: the decode branch reads neither, but the graph takes its batch
    size from them. Host zeros of the graph's float type, never written: calloc leaves their pages
    unallocated, so they cost no memory."""
    arg = next(a for a in session.get_inputs() if a.name == "k_cache")
    layers, _, *rest = arg.shape
    zeros = np.zeros((layers, batch, *rest), dtype=np.float16 if arg.type == "tensor(float16)" else np.float32)
    return {"k_cache": zeros, "v_cache": zeros}


class OrtStep:
    """step(input_ids, step, logits_to_keep, cache) -> (logits, new_keys, new_values) on an ORT session.

    The cache arrays are handed to ORT as they are (CPU tensors wrap the numpy buffers, no copy);
    the graph reads only the visible slots and returns the new rows, which the scheduler writes.

    Engines exported with the `inplace` attention kernel (graph_ops/lower_attention.py; the ort-cpu
    target) also take `decode(...)`: one call decodes a batch of sequences over a DecodeCache, each
    row at its own position. Their prefill calls bind the per-layer decode caches too (the graph
    needs every input) as both past and present, which the prefill branch passes through untouched.
    """

    def __init__(self, model: str | Path | ort.InferenceSession, providers: list | None = None,
                 options: ort.SessionOptions | None = None):
        if isinstance(model, ort.InferenceSession):
            self.session = model
        else:
            try:
                self.session = ort.InferenceSession(str(model), custom_ops.register(options or ort.SessionOptions()),
                                                    providers=providers or ["CPUExecutionProvider"])
            except custom_ops.CustomOpsError as e:
                raise LoadError(str(e)) from None
            except Exception as e:  # ORT's own exception types share no base class but Exception
                raise LoadError(f"ONNX Runtime cannot load {model}: {custom_ops.explain(e)}") from None
        names = {i.name for i in self.session.get_inputs()}
        self.inplace = DECODE_INPUTS[0] in names
        self.layers = sum(n.startswith("past_key_") for n in names)
        self.decode_cache = None  # the DecodeCache of an inplace engine, set by its owner
        self._idle_cache = None  # prefills without a decode cache (export's verify): zeros, never touched
        self.taps: tuple[str, ...] = ()  # extra graph outputs to fetch every call (calibration/data.py)
        self.tapped: dict[str, np.ndarray] = {}  # the taps of the last call
        self._unread: dict = {}  # batch -> decode calls' placeholder k_cache / v_cache
        self._bound: dict = {}  # (lo, hi) -> (the cache, the per-layer OrtValues over those rows)

    def new_cache(self, shape: CacheShape, dtype=np.float32) -> KVCache:
        return KVCache(shape, dtype)

    def new_decode_cache(self, shape: CacheShape, slots: int, rope: np.ndarray, params: mesa.MesaParams,
                         dtype=np.float32) -> DecodeCache:
        return DecodeCache(shape.layers, slots, shape.kv_heads, shape.max_len, shape.head_dim, rope, params, dtype)

    def __call__(self, input_ids: np.ndarray, step: mesa.Step, logits_to_keep: int, cache: KVCache):
        feeds = {"input_ids": input_ids, "k_cache": cache.k, "v_cache": cache.v, **_scalars(step, logits_to_keep)}
        if not self.inplace:
            logits, new_k, new_v, *taps = self.session.run(["logits", "new_keys", "new_values", *self.taps], feeds)
            self.tapped = dict(zip(self.taps, taps))
            return logits, new_k, new_v
        feeds.update(decode_step=np.array(False), seqlens_k=np.zeros(input_ids.shape[0], np.int32),
                     total_sequence_length=np.array(1, np.int32))
        return self._run(feeds, 0, input_ids.shape[0])

    def decode(self, tokens: np.ndarray, positions: np.ndarray, first_row: int = 0) -> np.ndarray:
        """Decode rows first_row .. first_row + B of the decode cache, row r consuming tokens[r] at
        positions[r] (its cached key count); returns logits [B, vocab]. The kernel appends each row's new
        key and value in place; rows keep their own positions, anchor and log-n factor. Only the rows
        asked for are computed: a step costs what its batch costs, not what the engine's slot count does."""
        B = len(tokens)
        if B not in self._unread:
            self._unread[B] = _unread_caches(self.session, B)
        logits, _, _ = self._run(_decode_feeds(tokens, positions, self._unread[B]), first_row, first_row + B)
        return logits[:, -1]

    def _idle(self):
        if self._idle_cache is None:
            name = DECODE_CACHE.format("key", 0)
            zeros = self._zeros_like(name, (self.layers, 1, *self._input(name).shape[1:]))
            self._idle_cache = type("IdleCache", (), {"k": zeros, "v": zeros})
        return self._idle_cache

    def _input(self, name: str):
        return next(a for a in self.session.get_inputs() if a.name == name)

    def _zeros_like(self, name: str, shape: tuple) -> np.ndarray:
        """Zeros of graph input `name`'s float type, never written: calloc leaves their pages unallocated,
        so they cost no memory."""
        dtype = np.float16 if self._input(name).type == "tensor(float16)" else np.float32
        return np.zeros(shape, dtype=dtype)

    def _cache_values(self, cache, lo: int, hi: int) -> list:
        """OrtValues over rows lo:hi of every layer's decode cache (views: no copy), made once per range:
        a decode step binds the same ones every time."""
        held, values = self._bound.get((lo, hi), (None, None))
        if held is not cache:  # first use of this range, or another cache set since
            values = [(DECODE_CACHE.format(kind, layer), DECODE_PRESENT.format(kind, layer),
                       ort.OrtValue.ortvalue_from_numpy(array[layer, lo:hi]))
                      for layer in range(self.layers) for kind, array in (("key", cache.k), ("value", cache.v))]
            self._bound[(lo, hi)] = (cache, values)
        return values

    def _run(self, feeds: dict, lo: int, hi: int):
        """Run with rows lo:hi of every per-layer decode cache bound as both past and present."""
        cache = self.decode_cache or self._idle()
        b = self.session.io_binding()
        for name, value in feeds.items():
            b.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in ("logits", "new_keys", "new_values", *self.taps):
            b.bind_output(name, "cpu")
        for name, present, rows in self._cache_values(cache, lo, hi):
            b.bind_ortvalue_input(name, rows)
            b.bind_ortvalue_output(present, rows)
        self.session.run_with_iobinding(b)
        outputs = b.get_outputs()  # in the order bound
        logits, new_k, new_v = (o.numpy() for o in outputs[:3])
        self.tapped = {name: o.numpy() for name, o in zip(self.taps, outputs[3:3 + len(self.taps)])}
        return logits, new_k, new_v


class OrtDeviceStep:
    """The step function for device backends: IO binding over device caches (runtime/device_cache.py).

    input_ids and the step scalars are bound from host memory (ORT moves what the device needs), the
    caches as device buffers; new_keys/new_values stay on the device for `DeviceKVCache.write`, logits
    come back to the host. Graphs with the `inplace` kernel (ort-cuda target, half precision) also take
    `decode(...)` like OrtStep's: one call for a batch of rows over a DeviceDecodeCache, each layer's rows
    bound by address as both past and present. With device="cpu" the same code runs on
    CPUExecutionProvider, which is how it is tested on machines without a GPU.
    """

    def __init__(self, session: ort.InferenceSession, device: str = "cuda", device_id: int = 0):
        self.session, self.device, self.device_id = session, device, device_id
        self.providers = ([("CUDAExecutionProvider", {"device_id": device_id})] if device == "cuda"
                          else ["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        self.inplace = DECODE_INPUTS[0] in names
        self.layers = sum(n.startswith("past_key_") for n in names)
        self.decode_cache = None  # the DeviceDecodeCache of an inplace engine, set by its owner
        self.prefill_buffers = 1  # device memory is allocated in full: one prompt prefills at a time
        self._writers: dict = {}
        self._unread: dict = {}  # batch -> decode calls' placeholder k_cache / v_cache (host zeros)

    def new_cache(self, shape: CacheShape, dtype=np.float32) -> DeviceKVCache:
        key = (shape, np.dtype(dtype))
        if key not in self._writers:
            self._writers[key] = cache_writer(shape, dtype, self.providers)
        return DeviceKVCache(shape, dtype, self._writers[key], self.device, self.device_id)

    def new_decode_cache(self, shape: CacheShape, slots: int, rope: np.ndarray, params: mesa.MesaParams,
                         dtype=np.float32) -> DeviceDecodeCache:
        return DeviceDecodeCache(shape, slots, rope, params, dtype, self.device, self.device_id, self.providers)

    def __call__(self, input_ids: np.ndarray, step: mesa.Step, logits_to_keep: int, cache: DeviceKVCache):
        b = self.session.io_binding()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        b.bind_ortvalue_input("k_cache", cache.k)
        b.bind_ortvalue_input("v_cache", cache.v)
        for name, value in _scalars(step, logits_to_keep).items():
            b.bind_cpu_input(name, value)
        b.bind_output("logits", "cpu")  # outputs come back in the order bound: these three first
        b.bind_output("new_keys", self.device, self.device_id)
        b.bind_output("new_values", self.device, self.device_id)
        if self.inplace:  # the prefill branch passes the decode caches through; rows 0:B stand in
            b.bind_cpu_input("decode_step", np.array(False))
            b.bind_cpu_input("seqlens_k", np.zeros(input_ids.shape[0], np.int32))
            b.bind_cpu_input("total_sequence_length", np.array(1, np.int32))
            self._bind_decode_rows(b, 0, input_ids.shape[0])
        self.session.run_with_iobinding(b)
        logits, new_k, new_v = b.get_outputs()[:3]
        return logits.numpy(), new_k, new_v

    def decode(self, tokens: np.ndarray, positions: np.ndarray, first_row: int = 0) -> np.ndarray:
        """OrtStep.decode over the device decode cache: rows first_row .. first_row + B, in place."""
        B = len(tokens)
        if B not in self._unread:  # host zeros: should ORT copy them to the device anyway (untested), a call pays it
            self._unread[B] = _unread_caches(self.session, B)
        b = self.session.io_binding()
        for name, value in _decode_feeds(tokens, positions, self._unread[B]).items():
            b.bind_cpu_input(name, value)
        b.bind_output("logits", "cpu")
        b.bind_output("new_keys", self.device, self.device_id)
        b.bind_output("new_values", self.device, self.device_id)
        self._bind_decode_rows(b, first_row, first_row + B)
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()[:, -1]

    def _bind_decode_rows(self, b, lo: int, hi: int) -> None:
        cache = self.decode_cache
        if cache is None:
            raise BackendError("this engine decodes in place: its steps need the decode cache of its decoder")
        for layer in range(self.layers):
            for kind in ("key", "value"):
                address, shape = cache.rows(kind, layer, lo, hi)
                b.bind_input(DECODE_CACHE.format(kind, layer), self.device, self.device_id, cache.dtype, shape, address)
                b.bind_output(DECODE_PRESENT.format(kind, layer), self.device, self.device_id, cache.dtype, shape,
                              address)


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
        **_int8_options(directory),
    })] + cuda


def _int8_options(directory: Path) -> dict:
    """INT8 for TensorRT when calibration/tensorrt.py has written a calibration table for this engine."""
    if not (directory / TRT_CACHE_DIR / TRT_CALIBRATION_TABLE).is_file():
        return {}
    return {"trt_int8_enable": True, "trt_int8_calibration_table_name": TRT_CALIBRATION_TABLE,
            "trt_int8_use_native_calibration_table": False}


# The backends an engine of each export target (manifest.target) runs on, in the order `auto` tries them:
# the passes lower the graph for its target (ort-cpu's in-place decode kernel, fp16 and TensorRT plugins
# on the GPU targets), so only portable engines run anywhere.
TARGET_BACKENDS = {"ort-cpu": ("ort-cpu",), "ort-cuda": ("ort-cuda", "ort-cpu"), "tensorrt": ("tensorrt", "ort-cuda"),
                   "portable": ("tensorrt", "ort-cuda", "ort-cpu")}


def pick_backend(requested: str, target: str = "portable") -> str:
    """The backend to start for an engine exported for `target`: `requested`, or for "auto" the first of
    TARGET_BACKENDS[target] this onnxruntime offers."""
    available = ort.get_available_providers()
    allowed = TARGET_BACKENDS.get(target)
    if allowed is None:
        raise BackendError(f"the engine was exported for an unknown target {target!r}; "
                           f"this runtime knows {', '.join(TARGET_BACKENDS)}")
    if requested == "auto":
        found = next((b for b in allowed if PROVIDERS[b] in available), None)
        if found is None:
            raise BackendError(f"no backend for a {target} engine is installed: it runs on {' or '.join(allowed)}, "
                               f"this onnxruntime offers {', '.join(available)}; {INSTALL[allowed[0]]}")
        return found
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r}; choose auto or one of {', '.join(BACKENDS)}")
    if requested not in allowed:
        raise BackendError(f"backend {requested} cannot run this engine: it was exported for target {target}, "
                           f"which runs on {' or '.join(allowed)} (re-export with --target {requested} or portable)")
    if PROVIDERS[requested] not in available:
        raise BackendError(f"backend {requested} is not installed: this onnxruntime has no {PROVIDERS[requested]} "
                           f"(it offers {', '.join(available)}); {INSTALL[requested]}")
    return requested


OPTIMIZATION_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                       "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session_options(settings: dict | None = None) -> ort.SessionOptions:
    """ONNX Runtime session options from plain settings:

    | key | value | why |
    |---|---|---|
    | intra_op_num_threads | int >= 0 (0 = ORT's choice) | threads per operator |
    | inter_op_num_threads | int >= 0 | threads across operators |
    | disable_prepacking | bool | MLAS keeps pre-packed copies of the MatMul weights: off saves their memory (~0.5x the fp32 weights) for some speed |
    | graph_optimization_level | disable, basic, extended, all | ORT's own graph rewrites at load |
    | allow_spinning | bool | ORT's threads spin between runs (default on): off when several sessions share the cores |
    """
    opts = ort.SessionOptions()
    known = ("intra_op_num_threads", "inter_op_num_threads", "disable_prepacking", "graph_optimization_level",
             "allow_spinning")
    for key, value in (settings or {}).items():
        if key not in known:
            raise BackendError(f"unknown session option {key!r}; choose from {', '.join(known)}")
        if key.endswith("threads"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BackendError(f"{key} must be an integer >= 0, got {value!r}")
            setattr(opts, key, value)
        elif key in ("disable_prepacking", "allow_spinning"):
            if not isinstance(value, bool):
                raise BackendError(f"{key} must be true or false, got {value!r}")
            entry = "session.disable_prepacking" if key == "disable_prepacking" else "session.intra_op.allow_spinning"
            opts.add_session_config_entry(entry, "1" if value else "0")
        elif value not in OPTIMIZATION_LEVELS:
            raise BackendError(f"graph_optimization_level must be one of {', '.join(OPTIMIZATION_LEVELS)}, "
                               f"got {value!r}")
        else:
            opts.graph_optimization_level = OPTIMIZATION_LEVELS[value]
    return opts


def open_backend(requested: str, directory: Path, model_path: Path, cache: CacheShape, max_len: int,
                 dtype: str, options: ort.SessionOptions | None = None,
                 target: str = "portable") -> tuple[str, OrtStep | OrtDeviceStep]:
    """Start a session for `requested` ("auto" included) on an engine exported for `target`; returns
    (the backend running, its step fn).

    ORT falls back to the next provider when one cannot start (e.g. TensorRT libraries missing), so
    the backend is read back from the session: "auto" accepts a fallback the target was made for, an
    explicit name none.
    """
    if dtype not in CACHE_DTYPES:
        raise BackendError(f"{dtype} engines cannot be served by this runtime (numpy has no bfloat16 and ONNX "
                           f"Runtime CPU no bfloat16 kernels); export with --precision fp32 or fp16")
    wanted = pick_backend(requested, target)
    providers = provider_chain(wanted, directory, cache, max_len, dtype)
    try:
        session = ort.InferenceSession(str(model_path), custom_ops.register(options or ort.SessionOptions()),
                                       providers=providers)
    except custom_ops.CustomOpsError as e:
        raise LoadError(str(e)) from None
    except Exception as e:  # ORT's own exception types share no base class but Exception
        raise LoadError(f"ONNX Runtime cannot load {model_path}: {custom_ops.explain(e)}") from None
    running = next(b for b, p in PROVIDERS.items() if p == session.get_providers()[0])
    if requested != "auto" and running != requested:
        raise BackendError(f"backend {requested} could not start (ONNX Runtime fell back to "
                           f"{session.get_providers()[0]}; its log above says why)")
    if running not in TARGET_BACKENDS[target]:
        raise BackendError(f"backend {wanted} could not start and ONNX Runtime fell back to {running}, which "
                           f"cannot run an engine exported for target {target} (its log above says why)")
    return running, OrtStep(session) if running == "ort-cpu" else OrtDeviceStep(session, "cuda")
