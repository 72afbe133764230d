"""The machine's limits, measured in the same run as the numbers they bound: memory copy rate (what a
decode step's reads are compared with), MatMul rates of ONNX Runtime and torch (what prefill is
compared with), and a description of the machine and its libraries."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path


def copy_gbs(mib: int = 1024, runs: int = 5) -> float:
    """Memory copy rate, GB/s = bytes copied / second (numpy copyto of a 1 GiB buffer, best of runs): the
    rate a decode step's weight and K/V reads are compared with."""
    import numpy as np

    src = np.ones(mib * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return src.nbytes / best / 1e9


def ort_matmul_gflops(m: int = 2048, k: int = 1024, n: int = 2816, runs: int = 10) -> float:
    """An ONNX Runtime CPU MatMul [m, k] @ [k, n] (weights as an initializer), median of `runs`."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "B")
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "mm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((m, k), dtype=np.float32)
    for _ in range(3):
        sess.run(None, {"A": a})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"A": a})
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times) / 1e9


def torch_matmul_gflops(m: int = 2048, k: int = 1024, n: int = 2816, runs: int = 10) -> float:
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times) / 1e9


def machine() -> dict:
    import numpy
    import onnxruntime
    import torch
    import transformers

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}
    try:
        import onnxruntime_genai

        info["onnxruntime_genai"] = onnxruntime_genai.__version__
    except ImportError:
        pass
    return info
