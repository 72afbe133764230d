"""`python -m runtime.generate` and `python -m runtime.score`: the published fixtures end to end,
text in and out, progress, errors (exit 2, one line, no traceback), and serving without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import OFFICIAL_CASES, load_official

from runtime import generate, score
from runtime.engine import MesaEngine

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
GPU = bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()))


def cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("name", OFFICIAL_CASES)
def test_official_case_through_the_cli(official_engine, tmp_path, name):
    case = load_official(name)
    ids_file, out = tmp_path / "ids.json", tmp_path / "out.npz"
    ids_file.write_text(json.dumps(case.input_ids.tolist()))
    proc = cli("runtime.generate", official_engine(name), "--input-ids-file", ids_file, "--greedy",
               "--max-new-tokens", 17, "--save-logits", out)
    assert proc.returncode == 0, proc.stderr
    saved = np.load(out)
    assert saved["prefill_logits"].shape == case.prefill_logits.shape
    assert np.abs(saved["prefill_logits"] - case.prefill_logits).max() <= TOL
    assert saved["decode_logits"].shape == (16, case.decode_logits.shape[1])
    assert np.abs(saved["decode_logits"] - case.decode_logits).max() <= TOL
    tokens = saved["tokens"].tolist()
    assert tokens[0] == case.fed_tokens[0] and tokens[1:] == case.argmax_tokens
    assert proc.stdout.split() == [str(t) for t in tokens]
    if not GPU:
        assert "backend: ort-cpu (chosen by --backend auto)" in proc.stderr


def test_batch_json_equals_rows_alone(official_engine, tmp_path, capsys):
    case, engine_dir = load_official("a_L300_gqa"), official_engine("a_L300_gqa")
    rows = [case.input_ids[:7].tolist(), case.input_ids[:220].tolist(), case.input_ids[50:120].tolist()]
    (tmp_path / "batch.json").write_text(json.dumps(rows))
    sampling = ["--temperature", "0.7", "--top-k", "40", "--seed", "4"]
    assert generate.main([str(engine_dir), "--input-ids-file", str(tmp_path / "batch.json"), "--max-new-tokens", "6",
                          "--ignore-eos", "--json", "--backend", "ort-cpu", *sampling]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    engine = MesaEngine.load(engine_dir, backend="ort-cpu")
    for row, res in zip(rows, results):
        alone = engine.generate(row, 6, temperature=0.7, top_k=40, seed=4, stop_tokens=())
        assert res["tokens"] == alone.tokens and res["prompt_tokens"] == len(row)


def test_prefill_progress_for_long_prompts(official_engine, tmp_path, capsys, monkeypatch):
    case = load_official("a_L300_gqa")
    (tmp_path / "ids.json").write_text(json.dumps(case.input_ids.tolist()))
    monkeypatch.setattr(generate, "PROGRESS_MIN_TOKENS", 100)  # the fixtures are shorter than a real long prompt
    assert generate.main([str(official_engine("a_L300_gqa")), "--input-ids-file", str(tmp_path / "ids.json"),
                          "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "prefill:" in err and "tok/s" in err  # the live bar
    assert "prefill 300 tokens in" in err and "ms/token" in err  # the summary


# ------------------------------------------------------------------------------ text in, text out

WORDS = [f"w{i}" for i in range(500)]


@pytest.fixture(scope="module")
def text_engine(official_engine, tmp_path_factory):
    """The a_L300 engine with a word-level tokenizer.json over its 512-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("text") / "engine"
    shutil.copytree(official_engine("a_L300_gqa"), directory)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE tokenizer (GPT-2 style): multi-byte characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"])
    tok.train_from_iterator(["héllo wörld, ünïcode 日本語のテキスト, an emoji 😀 and more words"] * 4, trainer)
    return tok


STREAMED = "héllo 日本語 😀 wörld, テキスト and ünïcode"


def streamed(tok, ids) -> list[str]:
    text = generate.TextStream(tok)
    return [text.step(i) for i in ids]


def test_streamed_text_equals_the_full_decode(byte_bpe):
    ids = [byte_bpe.token_to_id("<s>"), *byte_bpe.encode(STREAMED).ids, byte_bpe.token_to_id("</s>")]
    pieces = streamed(byte_bpe, ids)
    assert "".join(pieces) == byte_bpe.decode(ids, skip_special_tokens=True) == STREAMED
    assert "" in pieces  # some tokens end inside a character: nothing shown until it is complete
    assert generate.TextStream(byte_bpe).decoder is not None  # this tokenizers streams (DecodeStream)


def test_streamed_text_without_decode_stream(byte_bpe, monkeypatch):
    import tokenizers.decoders

    ids = byte_bpe.encode(STREAMED).ids
    streaming = streamed(byte_bpe, ids)
    monkeypatch.delattr(tokenizers.decoders, "DecodeStream")  # tokenizers before 0.21
    assert generate.TextStream(byte_bpe).decoder is None
    assert streamed(byte_bpe, ids) == streaming and "".join(streaming) == STREAMED


def test_streamed_text_survives_a_failing_decode_stream(byte_bpe):
    ids = byte_bpe.encode(STREAMED).ids
    text = generate.TextStream(byte_bpe)
    pieces = [text.step(i) for i in ids[:5]]

    class Broken:
        def step(self, tokenizer, token):
            raise Exception("Invalid prefix encountered")

    text.decoder = Broken()
    pieces += [text.step(i) for i in ids[5:]]
    assert "".join(pieces) == STREAMED and text.decoder is None


def test_text_in_text_out(text_engine, capsys):
    engine = MesaEngine.load(text_engine, backend="ort-cpu")
    prompt = " ".join(WORDS[i] for i in range(0, 400, 3))
    ids = engine.encode(prompt)
    assert ids == [int(w[1:]) + 3 for w in prompt.split()]
    g = engine.generate(prompt, 10, stop_tokens=())
    assert g.tokens == engine.generate(ids, 10, stop_tokens=()).tokens
    assert g.text == engine.decode(g.tokens) and g.text.split()[0].startswith("w")
    assert generate.main([str(text_engine), "--prompt", prompt, "--max-new-tokens", "10", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip() == g.text


def test_score_cli_prints_perplexity(text_engine, tmp_path):
    engine = MesaEngine.load(text_engine, backend="ort-cpu")
    text = " ".join(WORDS[i] for i in range(7, 500, 2))
    (tmp_path / "t.txt").write_text(text)
    proc = cli("runtime.score", text_engine, "--text-file", tmp_path / "t.txt", "--json")
    assert proc.returncode == 0, proc.stderr
    ids = engine.encode(text)
    out = json.loads(proc.stdout)
    assert out["tokens"] == len(ids) == 247
    assert out["perplexity"] == pytest.approx(score.perplexity(engine.score(ids), ids), rel=1e-5)
    assert score.main([str(text_engine), "--text-file", str(tmp_path / "t.txt")]) == 0


# ------------------------------------------------------------------------------ errors

def error_cases(engine_dir: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    ids = tmp / "ids.json"
    ids.write_text(json.dumps(list(range(300))))
    floats, bad_json, batch = tmp / "floats.json", tmp / "bad.json", tmp / "batch.json"
    floats.write_text("[1.5, 2]")
    bad_json.write_text("[1, 2")
    batch.write_text("[[1, 2], [3]]")
    strings, latin1 = tmp / "strings.json", tmp / "latin1.txt"
    strings.write_text('["a", "b"]')
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    incomplete = tmp / "incomplete"
    shutil.copytree(engine_dir, incomplete)
    (incomplete / "model.onnx").unlink()
    e = str(engine_dir)
    return {
        "too long": ([e, "--input-ids-file", str(ids), "--max-new-tokens", "40"], "exceeds max_len 332"),
        "text, no tokenizer": ([e, "--prompt", "hello"], "has no tokenizer.json"),
        "empty ids": ([e, "--input-ids-file", str(tmp / "empty.json")], "empty prompt"),
        "id outside vocab": ([e, "--input-ids-file", str(tmp / "big.json")], "token id 600 is outside"),
        "float ids": ([e, "--input-ids-file", str(floats)], "must be integers"),
        "not JSON": ([e, "--input-ids-file", str(bad_json)], "is not JSON"),
        "ids file missing": ([e, "--input-ids-file", str(tmp / "nope.json")], "No such file"),
        "greedy and temperature": ([e, "--input-ids-file", str(ids), "--greedy", "--temperature", "0.5"],
                                   "--greedy cannot be combined with --temperature"),
        "bad top-p": ([e, "--input-ids-file", str(ids), "--top-p", "1.5"], "top_p must be in"),
        "save-logits of a batch": ([e, "--input-ids-file", str(batch), "--save-logits", str(tmp / "o.npz")],
                                   "--save-logits takes one prompt"),
        "engine missing": ([str(tmp / "nowhere"), "--input-ids-file", str(ids)], "does not exist"),
        "engine incomplete": ([str(incomplete), "--input-ids-file", str(ids)], "model.onnx is missing"),
        "no new tokens": ([e, "--input-ids-file", str(ids), "--max-new-tokens", "0"], "positive integer"),
        # once a wrong message ("stream() takes one prompt", "does not exist") or a traceback
        "strings as ids": ([e, "--input-ids-file", str(strings)], f'{strings}: token ids must be integers, got "a"'),
        "engine is a file": ([str(ids), "--input-ids-file", str(ids)], f"engine directory {ids} is not a directory"),
        "prompt not UTF-8": ([e, "--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text"),
        "prompt file not UTF-8": ([e, "--prompt-file", str(latin1)],
                                  f"{latin1} is not UTF-8 text (byte 0xe9 at offset 3)"),
        "nan temperature": ([e, "--input-ids-file", str(ids), "--temperature", "nan"], "temperature must be >= 0"),
        "negative seed": ([e, "--input-ids-file", str(ids), "--seed", "-1"], "seed must be >= 0"),
        "stop token outside": ([e, "--input-ids-file", str(ids), "--stop-token", "600"],
                               "stop_tokens: 600 is not a token id"),
    }


@pytest.fixture(scope="module")
def errors(official_engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_errors")
    (tmp / "empty.json").write_text("[]")
    (tmp / "big.json").write_text("[1, 600]")
    return error_cases(official_engine("a_L300_gqa"), tmp)


@pytest.mark.parametrize("name", ["too long", "text, no tokenizer", "empty ids", "id outside vocab", "float ids",
                                  "not JSON", "ids file missing", "greedy and temperature", "bad top-p",
                                  "save-logits of a batch", "engine missing", "engine incomplete", "no new tokens",
                                  "strings as ids", "engine is a file", "prompt not UTF-8", "prompt file not UTF-8",
                                  "nan temperature", "negative seed", "stop token outside"])
def test_generate_errors_exit_2_with_one_line(errors, capsys, name):
    argv, message = errors[name]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err


def test_errors_in_a_subprocess_have_no_traceback(errors, official_engine, tmp_path):
    for name in ("too long", "engine incomplete"):
        argv, message = errors[name]
        proc = cli("runtime.generate", *argv)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    if not GPU:
        proc = cli("runtime.generate", official_engine("a_L300_gqa"), "--prompt", "x", "--backend", "ort-cuda")
        assert proc.returncode == 2 and "backend ort-cuda cannot run this engine" in proc.stderr
        assert "Traceback" not in proc.stderr
    (tmp_path / "one.json").write_text("[5]")
    proc = cli("runtime.score", official_engine("a_L300_gqa"), "--input-ids-file", tmp_path / "one.json")
    assert proc.returncode == 2 and "at least 2 tokens" in proc.stderr and "Traceback" not in proc.stderr


def test_score_errors_name_the_file(text_engine, tmp_path, capsys):
    latin1, long_text, strings = tmp_path / "latin1.txt", tmp_path / "long.txt", tmp_path / "strings.json"
    latin1.write_bytes("w1 caf\u00e9".encode("latin-1"))
    long_text.write_text(" ".join(WORDS[i % 500] for i in range(400)))
    strings.write_text('["w1", "w2"]')
    for argv, message in [  # once: a traceback, "+ max_new_tokens (0)", "score() takes one prompt"
        (["--text-file", str(latin1)], f"{latin1} is not UTF-8 text (byte 0xe9 at offset 6)"),
        (["--text-file", str(long_text)], f"{long_text}: prompt (400 tokens) exceeds max_len 332"),
        (["--input-ids-file", str(strings)], f'{strings}: token ids must be integers, got "w1"'),
    ]:
        assert score.main([str(text_engine), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"error: {message}", err


def test_undecodable_prompt_bytes_in_a_subprocess(official_engine):
    proc = subprocess.run([sys.executable, "-m", "runtime.generate", str(official_engine("a_L5_gqa")), "--prompt",
                           b"caf\xe9"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --prompt is not valid UTF-8 text"), proc.stderr


@pytest.mark.parametrize("module, heavy", [("runtime.generate", "numpy"), ("runtime.generate", "onnxruntime"),
                                           ("runtime.generate", "jsonschema"), ("runtime.score", "numpy")])
def test_ctrl_c_while_importing_is_one_line(official_engine, tmp_path, module, heavy):
    """Ctrl-C in the first second, while numpy / onnxruntime load, is simulated by an import hook that
    raises KeyboardInterrupt the way the signal does (once a traceback from the module's top)."""
    (tmp_path / "ids.json").write_text("[1, 2, 3]")
    argv = [module, str(official_engine("a_L5_gqa")), "--input-ids-file", str(tmp_path / "ids.json")]
    code = (
        "import runpy, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {heavy!r}: raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        f"sys.argv = {argv!r}\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (130, "interrupted\n")


def test_serving_imports_no_torch(official_engine):
    code = (
        "import sys, numpy as np\n"
        "import runtime.engine, runtime.generate, runtime.score\n"
        f"e = runtime.engine.MesaEngine.load({str(official_engine('a_L5_gqa'))!r}, backend='auto')\n"
        "e.generate(np.arange(5), 3); e.score(np.arange(5))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
