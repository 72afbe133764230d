"""Shared plumbing of the benchmark and evaluation scripts: tokenizers, engine runners, RSS.

Nothing here computes a Mesa formula: plans come from runtime.mesa and engines run through
runtime.engine.MesaEngine, so the harness works on any exported engine and any method.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


# ------------------------------------------------------------------------------------- one-node sessions

def one_node_session(op: str, domain: str, inputs: list[tuple], outputs: list[tuple], **attributes):
    """An ONNX Runtime CPU session over one node `op` (inputs / outputs as (name, elem_type, shape)), with the
    Mesa kernels registered and thread spinning off: the kernel benchmarks run two such sessions in turn."""
    import onnxruntime as ort
    from onnx import helper

    from runtime import custom_ops

    node = helper.make_node(op, [n for n, _, _ in inputs], [n for n, _, _ in outputs], domain=domain, **attributes)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
    options = custom_ops.register(ort.SessionOptions())
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------- tokenizers

def make_word_tokenizer(directory: str | Path, vocab_size: int, words: list[str] = ()) -> Path:
    """Write a WordLevel tokenizer (tokenizer.json + tokenizer_config.json) into `directory`.

    Ids 0-2 are <unk> <s> </s>, then the digits 0-9 (numbers split into single digits, as Llama's
    tokenizer does), then `words` (lower-cased), then filler entries `w<i>` up to `vocab_size`.
    Text is lower-cased and split on whitespace and punctuation. No download: made with `tokenizers`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *"0123456789", *(w.lower() for w in words)):
        vocab.setdefault(tok, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    if len(vocab) > vocab_size:
        raise ValueError(f"{len(vocab)} base tokens do not fit a vocabulary of {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 1_000_000}, indent=1))
    return directory


class TextTokenizer:
    """encode(text) -> ids (with BOS when the tokenizer adds one) and decode(ids) -> text.

    Reads tokenizer.json with the `tokenizers` package (a serving dependency); falls back to
    transformers' AutoTokenizer for folders that only have tokenizer.model (SentencePiece)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
            self.encode = lambda text, add_special_tokens=True: self._tok.encode(
                text, add_special_tokens=add_special_tokens).ids
            self.decode = lambda ids: self._tok.decode(list(map(int, ids)))
        elif (directory / "tokenizer.model").is_file():
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
            self.encode = lambda text, add_special_tokens=True: self._tok.encode(
                text, add_special_tokens=add_special_tokens)
            self.decode = lambda ids: self._tok.decode(list(map(int, ids)), skip_special_tokens=True)
        else:
            raise FileNotFoundError(f"{directory} has no tokenizer.json or tokenizer.model; export from a "
                                    "checkpoint folder that has its tokenizer files")


# -------------------------------------------------------------------------------- engine runner

@dataclass
class Run:
    """What one request gave: the tokens chosen (greedy) and where the time went."""

    tokens: list[int]
    prefill_seconds: float
    decode_seconds: list[float]  # one entry per decode step (the steps after the first token)


class Engine:
    """An exported engine on ONNX Runtime CPU (runtime.engine.MesaEngine) with the timings the benchmark
    and the evaluation scripts record; each prompt runs by its own Mesa plan."""

    def __init__(self, directory: str | Path):
        from runtime.engine import MesaEngine

        self.directory = Path(directory)
        self._engine = MesaEngine.load(self.directory, backend="ort-cpu")
        self.manifest = self._engine.manifest

    @property
    def method(self) -> str:
        return self.manifest.method

    def score(self, ids) -> np.ndarray:
        """Logits [L, vocab] of every prompt position (row i predicts token i + 1)."""
        return self._engine.score(np.asarray(ids, dtype=np.int64))

    def run(self, ids, max_new_tokens: int = 1, stop_ids: tuple[int, ...] = ()) -> Run:
        """Prefill `ids` by the plan, then greedy-decode until `max_new_tokens` tokens or a stop id; the
        time to the first token is the prefill's, each later token's is one decode step's."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        times: list[float] = []
        tokens: list[int] = []
        t = time.perf_counter()
        stream = self._engine.stream(ids, max_new_tokens=max_new_tokens, stop_tokens=tuple(stop_ids))
        prefill = None
        for token in stream:
            now = time.perf_counter()
            if prefill is None:
                prefill = now - t
            else:
                times.append(now - t)
            t = now
            if token in stop_ids:
                break
            tokens.append(int(token))
        stream.close()
        return Run(tokens, prefill or 0.0, times)


# ------------------------------------------------------------------------------------ measuring

def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
