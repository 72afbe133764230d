"""The Mesa CPU kernels (runtime/ops/*.cpp), a custom-op library ONNX Runtime loads into a session.

Engines exported with `--decode-kernel grouped` run their decode steps on ai.mesa.cpu::GroupedDecodeAttention
(runtime/ops/decode_attention.cpp): GroupQueryAttention's decode contract, with each KV head's cached
keys and values read once for all the query heads that share it. `--prefill-kernel tiled` runs prefill
chunks on ai.mesa.cpu::TiledPrefillAttention (runtime/ops/prefill_attention.cpp): tiles of queries against
blocks of keys with an online softmax, instead of every head's probabilities in memory. Build the library with
`bash scripts/build_cpp.sh` (it lands in build/cpp/libmesa_ops.so) or point MESA_OPS_LIBRARY at one.

Every session this runtime opens registers the library when one is found; a graph without the domain
is unaffected. A session that needs it and has none fails to load with `MISSING` as the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

DOMAIN = "ai.mesa.cpu"
ENV = "MESA_OPS_LIBRARY"
BUILT = Path(__file__).resolve().parents[1] / "build" / "cpp" / "libmesa_ops.so"
MISSING = (f"this engine runs attention on the Mesa CPU kernels ({DOMAIN}); build them with "
           f"`bash scripts/build_cpp.sh` or set {ENV} to a libmesa_ops.so")
_MARK = "mesa.custom_ops"  # a session config entry: options that already carry the library


class CustomOpsError(RuntimeError):
    pass


def library() -> Path | None:
    """The library to load: $MESA_OPS_LIBRARY if set (it must exist), else the build's, else None."""
    chosen = os.environ.get(ENV)
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise CustomOpsError(f"{ENV}={chosen} is not a file")
        return path
    return BUILT if BUILT.is_file() else None


def register(options: ort.SessionOptions) -> ort.SessionOptions:
    """Add the library (when there is one) to `options`, once; returns them."""
    path = library()
    if path is not None and not _registered(options):
        try:
            options.register_custom_ops_library(str(path))
        except Exception as e:  # ORT raises its own types, sharing no base but Exception
            raise CustomOpsError(f"ONNX Runtime cannot load {path}: {e}") from None
        options.add_session_config_entry(_MARK, "1")
    return options


def _registered(options: ort.SessionOptions) -> bool:
    try:
        return options.get_session_config_entry(_MARK) == "1"
    except RuntimeError:  # ORT raises for a key never set
        return False


def explain(error: Exception) -> str:
    """A load error's message, with how to get the kernels when the session lacked them."""
    text = str(error)
    return f"{MISSING} ({text.strip().splitlines()[0][:200]})" if DOMAIN in text else text
