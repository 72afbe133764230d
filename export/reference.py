"""The PyTorch reference backend: runs MesaDecoder eagerly as a runtime.scheduler step function."""

from __future__ import annotations

import numpy as np
import torch

from export.model import MesaDecoder
from runtime import mesa
from runtime.kv_cache import KVCache


class TorchStep:
    """step(input_ids, step, logits_to_keep, cache) for the scheduler, on the eager torch model."""

    def __init__(self, model: MesaDecoder):
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, input_ids: np.ndarray, step: mesa.Step, logits_to_keep: int, cache: KVCache):
        s = step.scalars()
        logits, k, v = self.model(
            torch.from_numpy(input_ids), torch.from_numpy(cache.k), torch.from_numpy(cache.v),
            *(torch.tensor(s[name]) for name in ("sink_len", "window_start", "write_pos", "chunk_width")),
            torch.tensor(logits_to_keep),
        )
        return logits.numpy(), k.float().numpy(), v.float().numpy()
