"""KV caches in device memory (ort-cuda, tensorrt): ORT OrtValues, written and rotated by small ONNX graphs.

| cache | holds | written by |
|---|---|---|
| DeviceKVCache | one sequence's pre-RoPE K/V [layers, 1, kv_heads, max_len, head_dim] (prefill; RowDecoder's slots) | `TensorScatter` (opset 24) bound in place: only the new rows move |
| DeviceDecodeCache | the in-place decode cache, per layer [slots, kv_heads, max_len, head_dim], keys rotated at their stair positions | the step graph's GroupQueryAttention (share-buffer: past and present bound to the same rows); `RotaryEmbedding` graphs at the end of a prefill and at anchor jumps |

DeviceDecodeCache keeps runtime/decode_cache.py's rule (which positions, when) and replaces its numpy
arithmetic by ONNX graphs on the same execution provider: `load` rotates a finished prefill's keys into
the slot's rows and copies its values, `prepare` re-rotates a slot's keys in place when its anchor
moves (un-rotate with the old positions, rotate with the new, RotaryEmbedding-23 with -sin then sin, the
engine's rope.npy tables). A slot's block of one layer, [kv_heads, max_len, head_dim], is contiguous, so
a graph binds it by address (IOBinding bind_input / bind_output with buffer_ptr). Rows past the
sequence's length are rotated by position 0 (which leaves them as they are); `load` copies whatever the
prefill buffer holds there. Neither is ever read: a decode step reads its row's first seqlens_k keys and
the one it writes.

With device="cpu" every path runs on CPUExecutionProvider over CPU OrtValues, which is how it is tested
on machines without a GPU (tests/test_device_cache.py); on CUDA nothing here has run (README).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtime import mesa
from runtime.decode_cache import DecodeCache
from runtime.kv_cache import CacheShape


def _helper():
    from onnx import TensorProto, helper  # only the device backends need it (see the cuda extra)

    return TensorProto, helper


class DeviceKVCache:
    """One sequence's cache as OrtValues on a device ([layers, 1, kv_heads, max_len, head_dim]).

    `write` runs the shared TensorScatter graph with the cache bound as both input and output, so
    only the q new rows move (ORT warns "in-place optimization not activated" if it ever copies).
    """

    def __init__(self, shape: CacheShape, dtype, writer: ort.InferenceSession, device: str, device_id: int):
        self.shape, self.writer, self.device, self.device_id = shape, writer, device, device_id
        self.dtype = np.dtype(dtype)
        self.k = ort.OrtValue.ortvalue_from_shape_and_type(shape.full(), dtype, device, device_id)
        self.v = ort.OrtValue.ortvalue_from_shape_and_type(shape.full(), dtype, device, device_id)

    @property
    def nbytes(self) -> int:
        return 2 * int(np.prod(self.shape.full())) * self.dtype.itemsize

    def release(self) -> None:
        """Device memory stays with the cache (it is reused by the next prompt)."""

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
    TensorProto, helper = _helper()
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


def rotation_graphs(kv_heads: int, max_len: int, head_dim: int, dtype, providers: list) -> dict:
    """Two sessions over one slot's block of one layer, x [1, kv_heads, max_len, head_dim]:
    `load`: keys = RoPE(k, pos), values = Identity(v); `rerotate`: keys = RoPE(RoPE(x, old, -sin), new)."""
    TensorProto, helper = _helper()
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    block = [1, kv_heads, max_len, head_dim]
    table = [max_len, head_dim // 2]
    info = helper.make_tensor_value_info
    rope = lambda x, sin, pos, out: helper.make_node("RotaryEmbedding", [x, "cos", sin, pos], [out],  # noqa: E731
                                                     interleaved=0)
    tables = [info("cos", elem, table), info("sin", elem, table), info("neg_sin", elem, table)]
    positions = lambda name: info(name, TensorProto.INT64, [1, max_len])  # noqa: E731
    graphs = {
        "load": helper.make_graph(
            [rope("k", "sin", "pos", "keys"), helper.make_node("Identity", ["v"], ["values"])], "mesa_load",
            [info("k", elem, block), info("v", elem, block), *tables, positions("pos")],
            [info("keys", elem, block), info("values", elem, block)]),
        "rerotate": helper.make_graph(
            [rope("x", "neg_sin", "old", "plain"), rope("plain", "sin", "new", "keys")], "mesa_rerotate",
            [info("x", elem, block), *tables, positions("old"), positions("new")], [info("keys", elem, block)]),
    }
    out = {}
    for name, graph in graphs.items():
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # the unused neg_sin / sin inputs are expected
        out[name] = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    return out


class DeviceDecodeCache(DecodeCache):
    """runtime/decode_cache.DecodeCache over device buffers: k[l], v[l] are OrtValues [slots, kv_heads,
    max_len, head_dim] per layer; `rows(kind, layer, lo, hi)` gives the address of a range of slots."""

    def __init__(self, shape: CacheShape, slots: int, rope: np.ndarray, params: mesa.MesaParams, dtype,
                 device: str, device_id: int, providers: list):
        self.params = params
        self.device, self.device_id, self.dtype = device, device_id, np.dtype(dtype)
        self.layers, self.kv_heads, self.max_len, self.head_dim = (shape.layers, shape.kv_heads, shape.max_len,
                                                                   shape.head_dim)
        self.block = (self.kv_heads, self.max_len, self.head_dim)  # one slot of one layer
        self.block_bytes = int(np.prod(self.block)) * self.dtype.itemsize
        zeros = np.zeros((slots, *self.block), dtype=self.dtype)  # copied into every layer's buffer
        self.k, self.v = ([self._buffer(zeros) for _ in range(shape.layers)] for _ in range(2))
        del zeros
        cos, sin = (rope[i].astype(self.dtype) for i in (0, 1))
        self.tables = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t), device, device_id)
                       for name, t in (("cos", cos), ("sin", sin), ("neg_sin", -sin))}
        self.graphs = rotation_graphs(self.kv_heads, self.max_len, self.head_dim, self.dtype, providers)
        self.length = np.zeros(slots, dtype=np.int64)
        self.chunk_width = np.ones(slots, dtype=np.int64)
        self.anchor = np.zeros(slots, dtype=np.int64)

    def _buffer(self, zeros: np.ndarray) -> ort.OrtValue:
        """A device buffer of zeros' shape, filled from it (ortvalue_from_numpy would wrap one host array for
        every buffer on the CPU device)."""
        value = ort.OrtValue.ortvalue_from_shape_and_type(zeros.shape, zeros.dtype, self.device, self.device_id)
        value.update_inplace(zeros)
        return value

    @property
    def nbytes(self) -> int:
        return 2 * self.layers * int(self.length.size) * self.block_bytes

    def rows(self, kind: str, layer: int, lo: int, hi: int) -> tuple[int, list[int]]:
        """(address, shape) of slots lo:hi of one layer's keys ("key") or values ("value")."""
        base = (self.k if kind == "key" else self.v)[layer].data_ptr()
        return base + lo * self.block_bytes, [hi - lo, *self.block]

    def _bind(self, b, name: str, address: int, shape, output: bool = False) -> None:
        bind = b.bind_output if output else b.bind_input
        bind(name, self.device, self.device_id, self.dtype, list(shape), address)

    def _padded(self, pos: np.ndarray) -> np.ndarray:
        """Positions of every row of a block: rows past the sequence at 0 (RoPE(0) leaves them as they are)."""
        out = np.zeros((1, self.max_len), dtype=np.int64)
        out[0, :len(pos)] = pos
        return out

    def _tables(self, b) -> None:
        for name, value in self.tables.items():
            b.bind_ortvalue_input(name, value)

    def _store(self, slot: int, buffer, length: int, pos: np.ndarray) -> None:
        """The DeviceKVCache `buffer`'s keys rotated at pos and its values into the slot's rows, layer by layer."""
        session = self.graphs["load"]
        positions = self._padded(pos)
        block = [1, *self.block]
        for layer in range(self.layers):
            b = session.io_binding()
            self._bind(b, "k", buffer.k.data_ptr() + layer * self.block_bytes, block)
            self._bind(b, "v", buffer.v.data_ptr() + layer * self.block_bytes, block)
            self._tables(b)
            b.bind_cpu_input("pos", positions)
            self._bind(b, "keys", self.rows("key", layer, slot, slot + 1)[0], block, output=True)
            self._bind(b, "values", self.rows("value", layer, slot, slot + 1)[0], block, output=True)
            session.run_with_iobinding(b)

    def _rerotate(self, slot: int, old: np.ndarray, new: np.ndarray) -> None:
        """In place: the graph's first node reads the whole block before its last node writes it back."""
        session = self.graphs["rerotate"]
        old_pos, new_pos = self._padded(old), self._padded(new)
        block = [1, *self.block]
        for layer in range(self.layers):
            address = self.rows("key", layer, slot, slot + 1)[0]
            b = session.io_binding()
            self._bind(b, "x", address, block)
            self._tables(b)
            b.bind_cpu_input("old", old_pos)
            b.bind_cpu_input("new", new_pos)
            self._bind(b, "keys", address, block, output=True)
            session.run_with_iobinding(b)

    def host_keys(self, slot: int) -> np.ndarray:
        """[layers, kv_heads, max_len, head_dim] keys of a slot, copied to the host (tests, debugging)."""
        return np.stack([self.k[layer].numpy()[slot] for layer in range(self.layers)])
