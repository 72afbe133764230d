"""Shared test helpers: the published fixtures, tiny random checkpoints, exported engines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import mesa
from scripts import fixtures
from scripts.fixtures import OfficialCase, load_official  # noqa: F401  (tests import them from here)

TRAINED = fixtures.TRAINED
OFFICIAL_CASES = fixtures.official_cases()

@pytest.fixture(params=OFFICIAL_CASES)
def official_case(request) -> OfficialCase:
    return load_official(request.param)


# Mesa parameters for tiny checkpoints trained at T = 64 (max_position_embeddings=64): prompts past T run
# middle chunks, and decodes cross the S = T point and an anchor jump every W steps.
MESA_T64 = {"train_length": 64, "first_chunk": 4, "first_chunk_cache": 4, "last_context": 16, "reserve_tokens": 4,
            "push_width": 4, "chunk_width": 64}
MESA_T64_FLAGS = [x for k, v in MESA_T64.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def prompt(n: int, seed: int) -> list[int]:
    """n token ids of a tiny checkpoint's vocabulary (96 of them are used)."""
    return np.random.default_rng(seed).integers(0, 96, n).tolist()


def reference_greedy(ckpt, ids, steps: int, max_len: int, params: mesa.MesaParams | None = None):
    """(tokens fed, logits [steps, vocab]) of greedy decoding on the PyTorch reference (MESA_T64 by default)."""
    from runtime import scheduler

    params = params or mesa.MesaParams(**MESA_T64)
    step, cache = reference(ckpt, params, max_len)
    logits, seq = scheduler.prefill(step, np.asarray(ids), mesa.prefill_steps(len(ids), params), cache,
                                    all_logits=False)
    fed, out = [int(np.argmax(logits[-1]))], []
    for _ in range(steps):
        out.append(scheduler.decode(step, fed[-1], seq, cache))
        fed.append(int(np.argmax(out[-1])))
    return fed[:-1], np.stack(out)


def anchor_jumps(L: int, steps: int, W: int, T: int = MESA_T64["train_length"]) -> int:
    """Decode steps (S = L + 1 .. L + steps keys) at which Stair PE moves every cached key."""
    return sum(S > T and (S - 1) % W == 0 for S in range(L + 2, L + steps + 1)) + (L + 1 <= T < L + steps)


def tiny_checkpoint(directory: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a small random-weight HF model (llama | mistral | qwen2) with save_pretrained."""
    import torch
    import transformers

    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2)
    base.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    if arch in ("mistral", "qwen2"):
        base.setdefault("sliding_window", None)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**base))
    with torch.no_grad():  # non-trivial norms so RMSNorm mistakes show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return Path(directory)


def reference(model_dir, params: mesa.MesaParams, max_len: int, method: str = "mesa"):
    """(step, cache): the PyTorch reference decoder (export.reference.TorchStep) over a fresh cache."""
    from export import loading, onnx_export
    from export.reference import TorchStep
    from runtime.kv_cache import KVCache

    path, alias = loading.resolve_model(str(model_dir))
    config = loading.load_config(path)
    lm = onnx_export.build_model(path, config, params, method, max_len, "fp32", alias)
    cache = KVCache(lm.cache_shape)
    return TorchStep(lm.model), cache


def run_fixture(step, cache, case: OfficialCase):
    """(prefill logits, decode logits, sequence state) of an official case's prompt and fed tokens."""
    from runtime import scheduler

    steps = mesa.prefill_steps(len(case.input_ids), case.params)
    prefill, seq = scheduler.prefill(step, case.input_ids, steps, cache)
    decode = np.stack([scheduler.decode(step, t, seq, cache) for t in case.fed_tokens])
    return prefill, decode, seq


def hf_logits(model_dir, ids: np.ndarray) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)[None]).logits[0].numpy()


def greedy_sequence(step, cache, ids, steps, new_tokens: int):
    """Prefill logits, then decode rows; returns (all prompt+decode logits, full token sequence)."""
    from runtime import scheduler

    prefill, seq = scheduler.prefill(step, ids, steps, cache)
    rows, tokens = [prefill], list(ids)
    token = int(prefill[-1].argmax())
    for _ in range(new_tokens):
        tokens.append(token)
        row = scheduler.decode(step, token, seq, cache)
        rows.append(row[None])
        token = int(row.argmax())
    return np.concatenate(rows), np.array(tokens, dtype=np.int64)


def export_engine(model_dir: Path, out: Path, max_len: int, extra: list[str] = ()) -> Path:
    """Export with export.api.export_engine; `extra` takes export.py's flags (--method origin, --no-verify, ...),
    read by export.py's own parser. A failed export raises its error."""
    from export import api, cli

    args = cli.parser().parse_args(["--model", str(model_dir), "--max-len", str(max_len), "--out", str(out), *extra])
    api.export_engine(args.model, args.out, **cli.api_kwargs(args), progress=False)
    return out


@pytest.fixture(scope="session")
def official_engine(tmp_path_factory):
    """engine(name) -> the directory of that official case exported at its max_len (once per session)."""
    import contextlib
    import io

    engines: dict[str, Path] = {}

    def engine(name: str) -> Path:
        if name not in engines:
            case = load_official(name)
            out = tmp_path_factory.mktemp("official") / name
            with contextlib.redirect_stdout(io.StringIO()):  # the export summary
                export_engine(case.model_dir, out, case.max_len, [*case.export_args(), "--no-verify"])
            engines[name] = out
        return engines[name]

    return engine


BUILD_CANNOT = 3  # scripts/build_cpp.sh: the build tools cannot be had here


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    """build/cpp after scripts/build_cpp.sh (the C++ runner and libmesa_ops.so); skips, saying why, only where
    the script says the build tools cannot be had."""
    root = fixtures.ROOT
    run = subprocess.run(["bash", str(root / "scripts" / "build_cpp.sh")], capture_output=True, text=True,
                         timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    if run.returncode == BUILD_CANNOT:
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, f"build_cpp.sh failed:\n{run.stderr[-4000:]}"
    return root / "build" / "cpp"


def refused_export(model_dir: Path, out: Path, flags: list[str], max_len: int = 480) -> subprocess.CompletedProcess:
    """export.py run as a user runs it, for the refusal tests: (returncode, stderr) is what they check."""
    return subprocess.run([sys.executable, "export.py", "--model", str(model_dir), "--max-len", str(max_len),
                           "--out", str(out), *flags], capture_output=True, text=True, timeout=120, cwd=fixtures.ROOT)


# The Mesa kernels' vector forms, each forced by the variables the kernel reads when a session creates it
# ("native" is the widest this CPU has: AVX-512 here or AVX2).
KERNEL_LOOPS = {"native": {}, "avx2": {"MESA_OPS_NO_AVX512": "1"}, "portable": {"MESA_OPS_PORTABLE": "1"}}


def one_node_session(op: str, domain: str, inputs: list[tuple], outputs: list[tuple], **attributes):
    """An ONNX Runtime CPU session over one node `op` (inputs / outputs as (name, elem_type, shape), all of them
    graph inputs / outputs), with the Mesa kernels registered: the kernel tests run ORT's op and ours alike."""
    import onnxruntime as ort
    from onnx import helper

    from runtime import custom_ops

    node = helper.make_node(op, [n for n, _, _ in inputs], [n for n, _, _ in outputs], domain=domain, **attributes)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
    return ort.InferenceSession(model.SerializeToString(), custom_ops.register(ort.SessionOptions()),
                                providers=["CPUExecutionProvider"])


def assert_refused_in_one_line(model_dir: Path, out: Path, flags: list[str], says: str) -> None:
    """export.py with `flags` exits 2 with one stderr line containing `says` and writes nothing."""
    run = refused_export(model_dir, out, flags)
    assert run.returncode == 2 and says in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not out.exists()


def assert_published_generation(g, case: OfficialCase, tol: float = 1e-4) -> None:
    """generate(case.input_ids, len(case.fed_tokens) + 1, return_logits=True) against the published
    prefill and decode logits (within tol) and the published greedy tokens."""
    assert np.abs(g.prefill_logits - case.prefill_logits).max() <= tol
    assert np.abs(g.decode_logits - case.decode_logits).max() <= tol
    assert g.tokens[1:] == case.argmax_tokens


@pytest.fixture(scope="session")
def mesa_ops_library(cpp_build) -> Path:
    """build/cpp/libmesa_ops.so, the library every session then registers (runtime/custom_ops.py)."""
    from runtime import custom_ops

    path = cpp_build / "libmesa_ops.so"
    assert path.is_file() and custom_ops.library() == path
    return path
