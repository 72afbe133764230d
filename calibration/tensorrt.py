"""TensorRT INT8 calibration from the same data: a calibration table for ONNX Runtime's TensorRT EP.

    python -m calibration.tensorrt ENGINE --ids-file prompts.json     # ENGINE exported with --target tensorrt

UNTESTED ON TENSORRT: this machine has no GPU. What runs here is the data collection: every prompt goes
through the engine's real Mesa plan (calibration/data.py, on ONNX Runtime CPU) with every float tensor of
the graph fetched, and each tensor's range over all phases (first / middle / last chunks and decode
steps: a range that covers the stair-position regime as well as the plain one) is written with
onnxruntime.quantization's `write_calibration_table` (calibration.flatbuffers, .json) into the engine's
TensorRT cache folder. runtime/backends.py then starts the TensorRT EP with `trt_int8_enable` and
`trt_int8_calibration_table_name` (ONNX Runtime's documented options for non-QDQ INT8 models), so
TensorRT builds INT8 kernels where it finds them profitable and keeps the rest in fp16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from runtime.backends import TRT_CACHE_DIR, TRT_CALIBRATION_TABLE


def write_table(data: dict, folder: Path) -> Path:
    """The ranges of `data` (calibration.data.collect(..., every=True)) as a TensorRT calibration table."""
    from onnxruntime.quantization import TensorData, write_calibration_table

    ranges = {}
    for name, by_phase in data["stats"].items():
        lo = min(s["lowest"] for s in by_phase.values())
        hi = max(s["highest"] for s in by_phase.values())
        ranges[name] = TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
    folder.mkdir(parents=True, exist_ok=True)
    write_calibration_table(ranges, dir=str(folder))
    return folder / TRT_CALIBRATION_TABLE


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calibration.tensorrt", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", metavar="ENGINE", help="an engine exported with --target tensorrt")
    p.add_argument("--ids-file", required=True, metavar="F.json", help="a JSON list of token-id prompts")
    p.add_argument("--decode-tokens", type=int, default=8, help="each prompt's last tokens, run as decode steps")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from calibration import data
    from runtime.artifact import ArtifactError, load_manifest
    from runtime.errors import EngineError

    engine = Path(args.engine)
    try:
        manifest = load_manifest(engine)
        if manifest.target != "tensorrt":
            raise ValueError(f"{engine} was exported for target {manifest.target}: TensorRT calibration needs an "
                             "engine exported with --target tensorrt")
        prompts = json.loads(Path(args.ids_file).read_text(encoding="utf-8"))
        collected = data.collect(engine, prompts, args.decode_tokens, every=True)
    except (ValueError, OSError, EngineError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = write_table(collected, engine / TRT_CACHE_DIR)
    print(f"wrote {table} ({len(collected['stats'])} tensors); the tensorrt backend now builds with INT8 enabled",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
