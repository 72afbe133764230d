"""Step functions over ONNX Runtime: one InferenceSession runs every step of a Mesa schedule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime import mesa
from runtime.kv_cache import KVCache


class OrtStep:
    """step(input_ids, step, logits_to_keep, cache) -> (logits, new_keys, new_values) on an ORT session.

    The cache arrays are handed to ORT as they are (CPU tensors wrap the numpy buffers, no copy);
    the graph reads only the visible slots and returns the new rows, which the scheduler writes.
    """

    def __init__(self, model_path: str | Path, providers: list | None = None,
                 options: ort.SessionOptions | None = None):
        options = options or ort.SessionOptions()
        self.session = ort.InferenceSession(str(model_path), options,
                                            providers=providers or ["CPUExecutionProvider"])

    def __call__(self, input_ids: np.ndarray, step: mesa.Step, logits_to_keep: int, cache: KVCache):
        feeds = {"input_ids": input_ids, "k_cache": cache.k, "v_cache": cache.v,
                 "logits_to_keep": np.array(logits_to_keep, dtype=np.int64)}
        feeds.update({name: np.array(value, dtype=np.int64) for name, value in step.scalars().items()})
        logits, new_k, new_v = self.session.run(None, feeds)
        return logits, new_k, new_v
