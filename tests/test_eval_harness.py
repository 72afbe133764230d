"""The evaluation harness's plumbing: text passkey prompts, answer parsing, perplexity windows and the
CLIs end to end on a tiny random engine with a WordLevel tokenizer (its scores mean nothing)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import export_engine, tiny_checkpoint

from runtime.engine import MesaEngine
from runtime.score import token_nll
from scripts import passkey_text, perplexity
from scripts.harness import TextTokenizer, make_word_tokenizer

VOCAB = 128


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = make_word_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB, passkey_text.PROMPT_WORDS)
    return TextTokenizer(d)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    """A tiny Llama (T = 64) with the tokenizer in its folder, exported with --method mesa at max_len 320."""
    model = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), vocab_size=VOCAB, max_position_embeddings=64,
                            bos_token_id=1, eos_token_id=2)
    make_word_tokenizer(model, VOCAB, passkey_text.PROMPT_WORDS)
    with contextlib.redirect_stdout(io.StringIO()):
        return export_engine(model, tmp_path_factory.mktemp("eng") / "tiny", 320, ["--no-verify"])


# ------------------------------------------------------------------------------------ passkey prompt

def test_tokenizer_knows_every_prompt_word(tokenizer):
    ids = tokenizer.encode(passkey_text.prompt_text(12345, 2, 2))
    assert ids[0] == 1  # BOS
    assert 0 not in ids  # no <unk>
    assert tokenizer.decode(tokenizer.encode("The pass key is 12345.", add_special_tokens=False)) == \
        "the pass key is 1 2 3 4 5 ."


@pytest.mark.parametrize("length", [64, 100, 257, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_length_and_depth(tokenizer, length, depth):
    p = passkey_text.build_prompt(tokenizer.encode, length, depth, 40721)
    block = len(tokenizer.encode(passkey_text.FILLER, add_special_tokens=False))
    assert length - block < len(p.ids) <= length  # as many whole filler blocks as fit
    assert p.ids == tokenizer.encode(passkey_text.prompt_text(40721, p.filler_before, p.filler_after))
    blocks = p.filler_before + p.filler_after
    assert blocks == 0 or abs(p.depth - depth) <= 0.5 / blocks + 1e-9
    text = tokenizer.decode(p.ids)
    assert text.count("4 0 7 2 1") == 2 and text.endswith("what is the pass key ? the pass key is")


def test_key_line_at_the_ends(tokenizer):
    first = tokenizer.decode(passkey_text.build_prompt(tokenizer.encode, 300, 0.0, 11111).ids)
    last = tokenizer.decode(passkey_text.build_prompt(tokenizer.encode, 300, 1.0, 11111).ids)
    assert "information there . the pass key is 1 1 1 1 1" in first
    assert "1 1 1 1 1 is the pass key . what is the pass key" in last


def test_prompt_too_short_is_refused(tokenizer):
    with pytest.raises(ValueError, match="needs at least"):
        passkey_text.build_prompt(tokenizer.encode, 20, 0.5, 12345)
    with pytest.raises(ValueError, match="depth"):
        passkey_text.split_filler(10, 1.5)


@pytest.mark.parametrize("text, answer", [
    ("12345", 12345), (" 1 2 3 4 5 .", 12345), ("The pass key is 68217. Remember", 68217),
    ("is 007", 7), ("no digits here", None), ("", None), ("4 2, then 7", 42), ("31\n42", 31),
])
def test_parse_answer(text, answer):
    assert passkey_text.parse_answer(text) == answer


def test_passkeys_are_reproducible_five_digit_numbers():
    keys = passkey_text.passkeys(3, 50)
    assert keys == passkey_text.passkeys(3, 50) and all(10_000 <= k < 100_000 for k in keys)


# ------------------------------------------------------------------------------------ perplexity

@pytest.mark.parametrize("n, window, stride", [(10, 4, 4), (10, 4, 1), (9, 4, 4), (100, 16, 5), (5, 8, 8),
                                               (2, 2, 1), (17, 16, 16)])
def test_window_spans_score_each_token_at_most_once(n, window, stride):
    spans = perplexity.window_spans(n, window, stride)
    scored = [t for s in spans for t in range(s.score_from, s.end)]
    assert len(scored) == len(set(scored))
    assert all(s.end - s.begin <= window and s.begin < s.score_from for s in spans)
    if stride < window:  # overlapping windows: every token but the first, each with L - stride context
        assert sorted(scored) == list(range(1, n))
        assert all(s.score_from - s.begin >= window - stride for s in spans[1:])
    else:  # disjoint windows: only each window's first token goes unscored
        assert sorted(scored) == [t for t in range(1, n) if t % window]


def test_window_spans_rejects_bad_arguments():
    with pytest.raises(ValueError):
        perplexity.window_spans(10, 1)
    with pytest.raises(ValueError):
        perplexity.window_spans(10, 4, 5)


def test_token_nll():
    ids = [3, 1, 2]
    uniform = np.zeros((3, 4), dtype=np.float32)
    assert np.allclose(token_nll(uniform, ids), math.log(4))
    sure = np.full((3, 4), -1e4, dtype=np.float32)
    sure[0, 1] = sure[1, 2] = 0.0
    assert np.allclose(token_nll(sure, ids), 0.0)


# ------------------------------------------------------------------------------------ CLIs end to end

def windowed_perplexity(engine, ids, window: int, stride: int) -> float:
    """The harness's definition restated: windows start every `stride` tokens; token t (t >= 1) is scored
    once, by the first window that holds it and starts before it, from that window's own logits."""
    logits, nll = {}, []
    for t in range(1, len(ids)):
        begin = next(b for b in range(0, t, stride) if t < b + window)
        if begin not in logits:
            logits[begin] = engine.score(ids[begin:begin + window]).astype(np.float64)
        row = logits[begin][t - begin - 1]
        nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[t]])
    return math.exp(np.mean(nll))


def test_perplexity_cli_accounts_for_every_token(engine_dir, tmp_path):
    text = " ".join([passkey_text.FILLER] * 20)  # 20 x 24 tokens
    (tmp_path / "t.txt").write_text(text)
    n = len(TextTokenizer(engine_dir).encode(text))
    with contextlib.redirect_stdout(io.StringIO()):
        code = perplexity.main([str(engine_dir), "--text-file", str(tmp_path / "t.txt"), "--lengths", "100", "300",
                                "--stride", "50", "--out", str(tmp_path / "out")])
    assert code == 0
    res = json.loads((tmp_path / "out" / "perplexity.json").read_text())
    assert res["tokens"] == n
    ids = TextTokenizer(engine_dir).encode(text)
    engine = MesaEngine.load(engine_dir)
    for r in res["results"]:
        assert r["tokens_scored"] == n - 1 and r["method"] == "mesa"
        expect = windowed_perplexity(engine, ids, r["length"], 50)
        assert math.isclose(r["perplexity"], expect, rel_tol=1e-6), (r["length"], r["perplexity"], expect)
    assert (tmp_path / "out" / "perplexity.png").stat().st_size > 0


def test_perplexity_window_by_window_equals_engine_scores(engine_dir):
    """The windowed NLL is the engine's own prefill logits, read at the right rows."""
    from scripts.harness import Engine

    eng = Engine(engine_dir)
    ids = np.random.default_rng(0).integers(3, VOCAB, 150)
    r = perplexity.evaluate(eng, ids, "tiny", 100, 60)
    first = token_nll(eng.score(ids[:100]), ids[:100])
    second = token_nll(eng.score(ids[60:150]), ids[60:150])
    expect = np.concatenate([first, second[100 - 60 - 1:]]).mean()
    assert r.tokens_scored == 149 and r.windows == 2
    assert math.isclose(r.nll, expect, rel_tol=1e-9)


class ScriptedEngine:
    """Stands in for an engine: answers the pass key of the prompt it is given (read back from the prompt
    text) on every other call, and a wrong number on the others."""

    method = "mesa"

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.calls = tokenizer, 0
        self.manifest = SimpleNamespace(max_len=max_len, eos_token_ids=[2])

    def run(self, ids, max_new_tokens, stop_ids=()):
        key = re.search(r"pass key is ((?:\d ){4}\d)", self.tokenizer.decode(list(ids))).group(1)
        answer = key if self.calls % 2 == 0 else "1 1 1 1 1"
        self.calls += 1
        return SimpleNamespace(tokens=self.tokenizer.encode(answer + " .", add_special_tokens=False))


@pytest.mark.parametrize("trials", [1, 4, 5])
def test_passkey_evaluate_counts_right_answers(tokenizer, trials):
    cell = passkey_text.evaluate(ScriptedEngine(tokenizer, 400), tokenizer, "scripted", 200, 0.5, trials, 0, 8)
    assert (cell.trials, cell.correct) == (trials, (trials + 1) // 2)
    assert len(cell.answers) == trials and not cell.skipped


def test_passkey_cli_runs_a_grid(engine_dir, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        code = passkey_text.main([str(engine_dir), "--lengths", "120", "250", "318", "--depths", "0", "1",
                                  "--trials", "2", "--max-new-tokens", "6", "--out", str(tmp_path)])
    assert code == 0
    block = len(TextTokenizer(engine_dir).encode(passkey_text.FILLER, add_special_tokens=False))
    cells = json.loads((tmp_path / "passkey_text.json").read_text())
    assert len(cells) == 6
    by_len = {}
    for c in cells:
        by_len.setdefault(c["length"], []).append(c)
    assert all(c["skipped"] for c in by_len[318])  # 318 + 6 new tokens > max_len 320
    for c in by_len[120] + by_len[250]:
        assert c["trials"] == 2 and not c["skipped"] and len(c["answers"]) == 2
        assert all(c["length"] - block < n <= c["length"] for n in c["prompt_tokens"])
    md = (tmp_path / "passkey_text.md").read_text()
    assert "| 0 |" in md and "mean" in md and "Random-weight" in md
    assert (tmp_path / "passkey_text.png").stat().st_size > 0


@pytest.mark.parametrize("method, flags", [("self-extend", ["--group", "8"]), ("streaming-llm", [])])
def test_harnesses_take_every_methods_engine(engine_dir, method, flags, tmp_path):
    """Perplexity and passkey run an engine of another method unchanged (its own prefill plan and decode
    steps); perplexity's windows are the engine's own scores."""
    model = Path(MesaEngine.load(engine_dir).manifest.source["path"])
    with contextlib.redirect_stdout(io.StringIO()):
        other = export_engine(model, tmp_path / method, 320, ["--method", method, *flags, "--no-verify"])
        (tmp_path / "t.txt").write_text(" ".join(passkey_text.PROMPT_WORDS * 20))
        assert perplexity.main([str(other), "--text-file", str(tmp_path / "t.txt"), "--lengths", "200",
                                "--out", str(tmp_path / "ppl")]) == 0
        assert passkey_text.main([str(other), "--lengths", "250", "--depths", "0.5", "--trials", "2",
                                  "--max-new-tokens", "6", "--out", str(tmp_path / "pk")]) == 0
    res = json.loads((tmp_path / "ppl" / "perplexity.json").read_text())["results"]
    assert [r["method"] for r in res] == [method] and math.isfinite(res[0]["perplexity"])
    cells = json.loads((tmp_path / "pk" / "passkey_text.json").read_text())
    assert len(cells) == 1 and len(cells[0]["answers"]) == 2


def test_engine_without_tokenizer_is_refused(tmp_path):
    (tmp_path / "e").mkdir()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert passkey_text.main([str(tmp_path / "e"), "--out", str(tmp_path / "o")]) == 2
    assert "tokenizer" in err.getvalue()
