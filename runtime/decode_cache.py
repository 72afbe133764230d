"""The decode cache: per-layer keys kept rotated at their Stair-PE positions, read in place.

A prefill runs by its Mesa plan over a pre-RoPE cache (runtime/kv_cache.py: chunks see keys at
positions that depend on the call). Once a sequence decodes, every call sees all its keys, and their
positions change only when the stair anchor A = S - ((S-1) mod W) moves (every W steps) or when S first
passes T (runtime.mesa.key_positions). So at the end of the prefill the keys are rotated once at the
positions of the first decode step and copied into this cache; decode steps then run GroupQueryAttention
over it in place (the graph's `inplace` kernel: the new key is rotated and appended by the kernel); and
when the anchor moves, `prepare` re-rotates the row's cached keys to their new positions.

Re-rotation un-rotates with the positions the keys hold and rotates with the new ones, both from the
engine's own float32 RoPE tables (rope.npy), so a key is always within float rounding of RoPE(new
position) of its pre-RoPE value. Rotating by the position delta in one go is cheaper but wrong at the
1e-4 level: the tables hold float32 angles pos * inv_freq, and angle(a) + angle(b) != angle(a + b) to
~1e-4 rad at positions in the thousands (measured on the a_L1000 fixture: 8.6e-5 vs 1.4e-5 max |dlogit|).
Keeping pre-RoPE keys as well would be exact too, at 1.5x the cache memory: this way costs none.

Layout: k, v [layers, slots, kv_heads, max_len, head_dim]; k[l, lo:hi] is contiguous, so any range of
slots is one batch the kernel reads and writes without a copy.

DecodeCache keeps the rule (which positions, when) and stores numpy arrays on the host; the device
backends' DeviceDecodeCache (runtime/device_cache.py) keeps the same rule over device buffers and
overrides only the three storage steps: `_store`, `_rerotate`, and the arrays.
"""

from __future__ import annotations

import numpy as np

from runtime import mesa


class DecodeCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 rope: np.ndarray, params: mesa.MesaParams, dtype=np.float32):
        self.k = np.zeros((layers, slots, kv_heads, max_len, head_dim), dtype=dtype)
        self.v = np.zeros_like(self.k)
        self.cos, self.sin = rope[0], rope[1]  # [max_len, head_dim / 2] float32
        self.params = params
        self.length = np.zeros(slots, dtype=np.int64)  # keys cached per slot
        self.chunk_width = np.ones(slots, dtype=np.int64)
        self.anchor = np.zeros(slots, dtype=np.int64)  # anchor the cached keys are rotated for

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def _anchor(self, S: int, W: int) -> int:
        """0 while positions are the identity (S <= T), else the stair anchor of a call with S keys."""
        return 0 if S <= self.params.train_length else S - (S - 1) % W

    def _positions(self, S: int, W: int, n: int) -> np.ndarray:
        return mesa.key_positions(S, W, self.params.train_length, self.params.push_width)[:n]

    def _rotate(self, x: np.ndarray, pos: np.ndarray, sign: float = 1.0) -> np.ndarray:
        """RoPE (rotate-half) of x [..., n, d] at positions pos [n]; sign -1 undoes it."""
        cos, sin = self.cos[pos], sign * self.sin[pos]
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype, copy=False)

    def load(self, slot: int, buffer, length: int, chunk_width: int) -> None:
        """Take a prefilled sequence from its pre-RoPE prefill buffer (a KVCache) -> rotated rows."""
        S = length + 1  # the first decode step sees the prompt and its own token
        self._store(slot, buffer, length, self._positions(S, chunk_width, length))
        self.length[slot], self.chunk_width[slot] = length, chunk_width
        self.anchor[slot] = self._anchor(S, chunk_width)

    def _store(self, slot: int, buffer, length: int, pos: np.ndarray) -> None:
        """The buffer's first `length` keys rotated at `pos` and its values into the slot's rows; each layer's
        pages of the buffer go back once copied."""
        for layer in range(self.k.shape[0]):
            self.k[layer, slot, :, :length] = self._rotate(buffer.k[layer, 0, :, :length], pos)
            self.v[layer, slot, :, :length] = buffer.v[layer, 0, :, :length]
            buffer.release_layer(layer)

    def prepare(self, slot: int) -> bool:
        """Before the slot's next decode step: re-rotate its keys if their positions move. True if so."""
        n, W = int(self.length[slot]), int(self.chunk_width[slot])
        S = n + 1
        anchor = self._anchor(S, W)
        if anchor == self.anchor[slot]:
            return False
        old = self._positions(n, W, n)  # those of the previous step (S = n), whose own key sat at n - 1
        self._rerotate(slot, old, self._positions(S, W, n))
        self.anchor[slot] = anchor
        return True

    def _rerotate(self, slot: int, old: np.ndarray, new: np.ndarray) -> None:
        """The slot's first len(old) keys: from RoPE(old) to RoPE(new)."""
        keys = self.k[:, slot, :, :len(old)]
        keys[...] = self._rotate(self._rotate(keys, old, -1.0), new)

    def advance(self, slot: int) -> None:
        """The slot's decode step appended one key."""
        self.length[slot] += 1

    def free(self, slot: int) -> None:
        self.length[slot], self.anchor[slot], self.chunk_width[slot] = 0, 0, 1
