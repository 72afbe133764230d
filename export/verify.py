"""Built-in export verification: the full ONNX checker, then one short prompt on ONNX Runtime CPU
compared with the eager reference decoder (first chunk, last chunk, one decode step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from export.reference import TorchStep
from runtime import artifact, mesa, scheduler
from runtime.backends import OrtStep
from runtime.kv_cache import CacheShape, KVCache

# Allowed max |Δlogit| relative to the largest |logit|: float32 accumulation order differs between
# torch and ORT; half types round every activation.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 8e-2}


class VerificationError(Exception):
    pass


def smoke_run(step_fn, ids: np.ndarray, lm) -> np.ndarray:
    a = lm.model.args
    cache = KVCache(CacheShape(a.num_hidden_layers, a.num_key_value_heads, lm.max_len, a.head_dim),
                    dtype=np.float16 if lm.dtype == "fp16" else np.float32)
    steps = mesa.prefill_steps(len(ids), lm.params, lm.method)
    logits, seq = scheduler.prefill(step_fn, ids, steps, cache)
    row = scheduler.decode(step_fn, int(np.argmax(logits[-1])), seq, cache)
    return np.concatenate([logits, row[None]], axis=0)


def verify_engine(directory: Path, lm) -> str:
    model_path = Path(directory) / artifact.MODEL_FILE
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise VerificationError(f"onnx.checker: {e}") from None
    n = max(1, min(lm.max_len - 1, lm.params.first_chunk + 4))
    ids = np.random.default_rng(0).integers(0, lm.model.args.vocab_size, n, dtype=np.int64)
    if lm.dtype == "bf16":
        return "onnx.checker ok; ORT smoke step skipped (ONNX Runtime CPU has no bfloat16 kernels)"
    ours = smoke_run(OrtStep(model_path), ids, lm)
    ref = smoke_run(TorchStep(lm.model), ids, lm)
    diff = float(np.abs(ours - ref).max())
    bound = TOLERANCE[lm.dtype] * max(1.0, float(np.abs(ref).max()))
    if not diff <= bound:
        raise VerificationError(f"ORT and the reference decoder differ by {diff:.3g} (allowed {bound:.3g})")
    return f"onnx.checker ok; ORT vs reference on {n} prompt tokens + 1 decode step: max |dlogit| {diff:.2g}"
