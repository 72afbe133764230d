"""The static KV cache: allocated once, written in place, keys stored before RoPE."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    max_len: int
    head_dim: int

    def full(self, batch: int = 1) -> tuple[int, ...]:
        return (self.layers, batch, self.kv_heads, self.max_len, self.head_dim)


class KVCache:
    """One sequence's cache: k, v of shape [layers, 1, kv_heads, max_len, head_dim]."""

    def __init__(self, shape: CacheShape, dtype=np.float32):
        self.shape = shape
        self.k = np.zeros(shape.full(), dtype=dtype)
        self.v = np.zeros(shape.full(), dtype=dtype)

    def write(self, pos: int, new_k: np.ndarray, new_v: np.ndarray) -> None:
        """Store the rows of one step ([layers, 1, kv_heads, q, head_dim]) at [pos, pos + q)."""
        q = new_k.shape[3]
        if pos + q > self.shape.max_len:
            raise ValueError(f"cache holds {self.shape.max_len} positions; cannot write [{pos}, {pos + q})")
        self.k[:, :, :, pos:pos + q] = new_k
        self.v[:, :, :, pos:pos + q] = new_v
