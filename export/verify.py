"""Built-in export verification: the full ONNX checker, then one short prompt on ONNX Runtime CPU
compared with the eager reference decoder (first chunk, last chunk, one decode step).

The reference runs before the engine is saved and its logits are kept, so the torch weights can be freed
before ONNX Runtime loads its copy: an export never holds two copies of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from export.reference import TorchStep
from runtime import artifact, mesa, methods, scheduler
from runtime.backends import OrtStep
from runtime.batch_decoder import make_decoder
from runtime.sequence import replay
from runtime.kv_cache import CacheShape, KVCache

# Allowed max |Δlogit| relative to the largest |logit|: float32 accumulation order differs between
# torch and ORT; half types round every activation.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 8e-2}


class VerificationError(Exception):
    pass


@dataclass
class Smoke:
    ids: np.ndarray
    steps: list[mesa.Step]
    cache_shape: CacheShape
    cache_dtype: type
    dtype: str
    params: mesa.MesaParams
    method: methods.Method | None = None  # runtime/methods.py's, None for mesa and origin
    logits: np.ndarray | None = None  # the reference's: prompt positions + one decode step


def smoke_run(step_fn, smoke: Smoke) -> np.ndarray:
    cache = KVCache(smoke.cache_shape, dtype=smoke.cache_dtype)
    logits, seq = scheduler.prefill(step_fn, smoke.ids, smoke.steps, cache, method=smoke.method)
    row = scheduler.decode(step_fn, int(np.argmax(logits[-1])), seq, cache)
    return np.concatenate([logits, row[None]], axis=0)


def engine_run(directory: Path, smoke: Smoke) -> np.ndarray:
    """The same prompt and decode token through the engine as the runtime serves it (the batcher, and
    the in-place decode branch where the graph has one)."""
    step = OrtStep(directory / artifact.MODEL_FILE)
    decode_graph = directory / artifact.DECODE_MODEL_FILE  # int8-int4: decode steps run their own graph
    decode_fn = OrtStep(decode_graph) if decode_graph.is_file() else None
    decoder = make_decoder(step, smoke.cache_shape, 1, directory, smoke.params, smoke.cache_dtype, decode_fn,
                           smoke.method)
    prefill, decode = replay(step, decoder, smoke.ids, smoke.steps, [int(np.argmax(smoke.logits[-2]))])
    return np.concatenate([prefill, decode], axis=0)


def reference_run(lm) -> Smoke:
    """The reference decoder on a short random prompt that has a first and a last chunk (Mesa), or
    that runs past the trained length (the other methods: far pairs, more than one block)."""
    a = lm.model.args
    n = lm.params.first_chunk + 4 if lm.method_obj is None else lm.params.train_length + 8
    n = max(1, min(lm.max_len - 1, n))
    smoke = Smoke(ids=np.random.default_rng(0).integers(0, a.vocab_size, n, dtype=np.int64),
                  steps=methods.prefill_steps(n, lm.params, lm.method, lm.method_obj), method=lm.method_obj,
                  cache_shape=lm.cache_shape,
                  cache_dtype=np.float16 if lm.dtype == "fp16" else np.float32, dtype=lm.dtype,
                  params=mesa.graph_params(lm.params, lm.method, lm.max_len))
    if lm.dtype != "bf16":  # ORT CPU has no bfloat16 kernels: nothing to compare against
        smoke.logits = smoke_run(TorchStep(lm.model), smoke)
    return smoke


def check_engine(directory: Path, smoke: Smoke) -> str:
    model_path = Path(directory) / artifact.MODEL_FILE
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise VerificationError(f"onnx.checker: {e}") from None
    if smoke.logits is None:
        return "onnx.checker ok; ORT smoke step skipped (ONNX Runtime CPU has no bfloat16 kernels)"
    ours = engine_run(Path(directory), smoke)
    diff = float(np.abs(ours - smoke.logits).max())
    bound = TOLERANCE[smoke.dtype] * max(1.0, float(np.abs(smoke.logits).max()))
    if not diff <= bound:
        raise VerificationError(f"ORT and the reference decoder differ by {diff:.3g} (allowed {bound:.3g})")
    return (f"onnx.checker ok; ORT vs reference on {len(smoke.ids)} prompt tokens + 1 decode step: "
            f"max |dlogit| {diff:.2g}")


def check_quantized(directory: Path, smoke: Smoke) -> str:
    """Verification of quantized engines: onnx.checker, then the engine run against the float reference.
    int8 / int4 weights cannot meet the float bound (on random-weight models they move logits by tens of
    percent), so this fails only on non-finite logits and reports the distance; scripts/bench_precision.py
    measures the accuracy properly."""
    for name in (artifact.MODEL_FILE, artifact.DECODE_MODEL_FILE):
        if (Path(directory) / name).is_file():
            try:
                onnx.checker.check_model(str(Path(directory) / name), full_check=True)
            except onnx.checker.ValidationError as e:
                raise VerificationError(f"onnx.checker ({name}): {e}") from None
    ours, ref = engine_run(Path(directory), smoke), smoke.logits
    if not np.isfinite(ours).all():
        raise VerificationError("the quantized engine produces non-finite logits")
    diff = float(np.abs(ours - ref).max())
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    return (f"onnx.checker ok; quantized engine vs float reference on {len(smoke.ids)} prompt tokens + 1 decode step: "
            f"max |dlogit| {diff:.2g}, argmax agreement {agree:.0%}")
