"""Shared plumbing of the benchmark and evaluation scripts: tokenizers, engine runners, RSS.

Nothing here computes a Mesa formula; plans come from runtime.mesa and are walked by runtime.scheduler.
Engines are driven with `runtime.scheduler` + `runtime.backends.OrtStep` (the step-function API that
every backend implements), so the harness works on any exported engine and any method.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import artifact, mesa, scheduler
from runtime.kv_cache import CacheShape, KVCache

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


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
    logits: np.ndarray | None = None  # [L, vocab] when all prefill logits were asked for


class Engine:
    """An exported engine on ONNX Runtime CPU, for the benchmark and the evaluation scripts.

    Uses runtime.engine.MesaEngine when this checkout has it, else runtime.scheduler + OrtStep (the
    step-function API every backend implements). Either way each prompt runs by its own Mesa plan.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = artifact.load_manifest(self.directory)
        try:
            from runtime.engine import MesaEngine
        except ImportError:
            MesaEngine = None
        if MesaEngine is not None:
            self._engine = MesaEngine.load(self.directory, backend="ort-cpu")
            self.api = "runtime.engine.MesaEngine"
        else:
            from runtime.backends import OrtStep

            self._engine = None
            self._step = OrtStep(self.directory / artifact.MODEL_FILE)
            self._cache = self._new_cache()
            self.api = "runtime.scheduler + runtime.backends.OrtStep"

    @property
    def params(self) -> mesa.MesaParams:
        return self.manifest.mesa_params

    @property
    def method(self) -> str:
        return self.manifest.method

    def plan(self, prompt_len: int, max_new_tokens: int = 0) -> list[mesa.Step]:
        return mesa.check_request(prompt_len, max_new_tokens, self.manifest.max_len, self.params, self.method)

    def run(self, ids, max_new_tokens: int = 1, stop_ids: tuple[int, ...] = (), all_logits: bool = False) -> Run:
        """Prefill `ids` by the plan, then greedy-decode until `max_new_tokens` tokens or a stop id."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._engine is not None:
            return self._run_engine(ids, max_new_tokens, stop_ids, all_logits)
        return self._run_scheduler(ids, max_new_tokens, stop_ids, all_logits)

    def score(self, ids) -> np.ndarray:
        """Logits [L, vocab] of every prompt position (row i predicts token i + 1)."""
        if self._engine is not None:
            return self._engine.score(np.asarray(ids, dtype=np.int64))
        return self.run(ids, 1, all_logits=True).logits

    # ------------------------------------------------------------------------------ internals

    def _run_engine(self, ids, max_new_tokens, stop_ids, all_logits) -> Run:
        if all_logits:  # score() and the first greedy token are one prefill
            t = time.perf_counter()
            logits = self._engine.score(ids)
            return Run([int(np.argmax(logits[-1]))], time.perf_counter() - t, [], logits)
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

    def _new_cache(self) -> KVCache:
        m = self.manifest
        dtype = np.float16 if m.dtype == "fp16" else np.float32
        return KVCache(CacheShape(m.num_hidden_layers, m.num_key_value_heads, m.max_len, m.head_dim), dtype=dtype)

    def _run_scheduler(self, ids, max_new_tokens, stop_ids, all_logits) -> Run:
        steps = self.plan(len(ids), max_new_tokens)
        t = time.perf_counter()
        logits, seq = scheduler.prefill(self._step, ids, steps, self._cache, all_logits=all_logits)
        prefill = time.perf_counter() - t
        row, tokens, times = logits[-1], [], []
        while True:
            token = int(np.argmax(row))
            if token in stop_ids:
                break
            tokens.append(token)
            if len(tokens) >= max_new_tokens:
                break
            t = time.perf_counter()
            row = scheduler.decode(self._step, token, seq, self._cache)
            times.append(time.perf_counter() - t)
        return Run(tokens, prefill, times, logits if all_logits else None)


# ------------------------------------------------------------------------------------ measuring

def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out
