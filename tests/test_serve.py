"""The OpenAI-compatible server (runtime/serve.py and the modules under it), driven by clients nobody here wrote.

The official `openai` package talks to a live uvicorn server on 127.0.0.1 (an ephemeral port, a background
thread); answers are checked against the engine itself (engine.generate on the same ids) and against
transformers' apply_chat_template; hypothesis fuzzes both endpoints through FastAPI's TestClient; headless
Chromium drives the playground; a local Ray instance runs two replicas. A tiny Llama (T = 64) with Mesa
flags and a WordLevel tokenizer; prompts past 64 tokens run the Mesa plan."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402

try:  # the HTTP client under openai (and Starlette's TestClient): httpx2 here, httpx elsewhere
    import httpx2 as httpx
except ImportError:
    import httpx
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from runtime.engine import MesaEngine  # noqa: E402
from runtime.serve import create_app  # noqa: E402
from runtime.serve_service import Service  # noqa: E402
from runtime.serve_text import TextStream  # noqa: E402
from scripts.harness import make_word_tokenizer  # noqa: E402
from tests.conftest import export_engine, tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T, MAX_LEN, VOCAB, SLOTS = 64, 480, 96, 4
MESA = {"train_length": T, "first_chunk": 4, "first_chunk_cache": 4, "last_context": 16, "reserve_tokens": 4,
        "push_width": 4, "chunk_width": T}
FLAGS = [x for k, v in MESA.items() for x in (f"--{k.replace('_', '-')}", str(v))]
WORDS = ["hello", "world", "user", "assistant", "system", ":", "once", "upon", "a", "time"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
            "{{ raise_exception('the system message must come first') }}{% endif %}"
            "{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve")
    ckpt = tiny_checkpoint(d / "ckpt", max_position_embeddings=T)
    make_word_tokenizer(ckpt, VOCAB, WORDS)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))  # BOS/EOS as special tokens, as real tokenizers have
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(ckpt / "tokenizer.json"))
    with contextlib.redirect_stdout(io.StringIO()):
        out = export_engine(ckpt, d / "tiny", MAX_LEN, [*FLAGS, "--no-verify"])
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def engine(engine_dir):
    e = MesaEngine.load(engine_dir, backend="ort-cpu", slots=SLOTS)
    yield e
    e.close()


class Live:
    """uvicorn serving `app` on 127.0.0.1 (ephemeral port) in a background thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def client(self, **kw) -> "openai.OpenAI":  # no retries: a 429 or 500 must reach the test
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=30, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def service(engine):
    return Service(engine, max_queue=64)


@pytest.fixture(scope="module")
def live(service):
    server = Live(create_app(service))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live):
    return live.client()


@pytest.fixture
def healthy(engine, service):
    """After the test: nothing admitted, every slot free (bounded wait: a cancel lands within a step)."""
    yield
    assert wait_for(lambda: service.in_flight == 0 and engine.stats()["free_slots"] == SLOTS), \
        (service.in_flight, engine.stats())


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()


def alone(engine, prompt_ids, n, **kw) -> list[int]:
    """The engine's own answer: what the server must reproduce."""
    return engine.generate(prompt_ids, n, **kw).tokens


def continuation(engine, prompt_ids, tokens) -> str:
    """The completion text as OpenAI defines it: what the tokens add to the prompt's text."""
    tail = prompt_ids[-4:]
    return engine.decode(tail + tokens)[len(engine.decode(tail)):]


def metric(live, name: str) -> float:
    text = httpx.get(live.url + "/metrics").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@contextlib.contextmanager
def slots_held(engine, n=SLOTS):
    """Every KV slot held by a paused stepwise sequence: requests sent now wait in the engine's queue."""
    held = [engine.sequence([1, 2, 3]) for _ in range(n)]
    for seq in held:
        seq.step()
    try:
        yield
    finally:
        for seq in held:
            seq.cancel()


# ---------------------------------------------------------------------------------------------- answers

def test_completion_equals_the_engine_for_text_and_token_ids(engine, service, client, healthy):
    prompt = "once upon a time hello world"
    prompt_ids = engine.encode(prompt)
    want = alone(engine, prompt_ids, 10)
    for p in (prompt, prompt_ids):
        r = client.completions.create(model=service.name, prompt=p, max_tokens=10, temperature=0,
                                      extra_body={"return_token_ids": True})
        c = r.choices[0]
        assert c.token_ids == want
        assert c.text == continuation(engine, prompt_ids, [t for t in want if t not in (2,)])
        assert c.finish_reason == ("stop" if want[-1] == 2 else "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), len(want))
    models = client.models.list().data
    assert [m.id for m in models] == [service.name]
    assert models[0].max_model_len == MAX_LEN and models[0].mesa["params"] == MESA


def test_chat_renders_the_template_as_transformers_does(engine_dir, engine, service, client, healthy):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "hello"}, {"role": "user", "content": "once upon a time"}]
    out = AutoTokenizer.from_pretrained(engine_dir).apply_chat_template(messages, add_generation_prompt=True,
                                                                        tokenize=True)
    reference = list(out["input_ids"] if hasattr(out, "keys") else out)
    assert reference[0] == 1 and reference.count(2) == 2  # BOS, and one EOS per message, from the template
    want = alone(engine, reference, 8, seed=3, temperature=0.9, top_p=0.9)
    r = client.chat.completions.create(model=service.name, messages=messages, max_tokens=8, temperature=0.9,
                                       top_p=0.9, seed=3, extra_body={"return_token_ids": True})
    assert r.usage.prompt_tokens == len(reference)
    assert r.choices[0].token_ids == want
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == engine.decode([t for t in want if t != 2])
    with pytest.raises(openai.BadRequestError, match="system message must come first"):
        client.chat.completions.create(model=service.name, messages=messages[::-1], max_tokens=2)


def test_streams_carry_the_same_answer(engine, service, client, healthy):
    prompt = ids(150, 1)  # past T: the Mesa plan
    whole = client.completions.create(model=service.name, prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=service.name, prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": "hello world"}]
    chat = client.chat.completions.create(model=service.name, messages=messages, max_tokens=9, temperature=0)
    parts = list(client.chat.completions.create(model=service.name, messages=messages, max_tokens=9,
                                                temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_stop_strings_are_trimmed_and_stop_ids_end_the_answer(engine, service, client, healthy):
    prompt = ids(40, 2)
    full = client.completions.create(model=service.name, prompt=prompt, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]
    words = full.text.split()
    stop = " ".join(words[3:5])  # a stop string of two words, in the middle of the answer
    cut = full.text[:full.text.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model=service.name, prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
                                      stream=stream, extra_body={"ignore_eos": True})
        choices = [c.choices[0] for c in r] if stream else r.choices
        assert "".join(c.text for c in choices) == cut
        assert choices[-1].finish_reason == "stop"
    token = full.token_ids[5]
    r = client.completions.create(model=service.name, prompt=prompt, max_tokens=16, temperature=0, stop=[token],
                                  extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]
    first = full.token_ids.index(token)
    assert r.token_ids == full.token_ids[:first + 1] and r.finish_reason == "stop"
    assert r.text == continuation(engine, prompt, full.token_ids[:first])  # the stop token is not shown


def test_text_stream_holds_back_split_characters_and_stop_prefixes():
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9 ok", 4: b" st", 5: b"op!"}
    decode = lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    text = TextStream(decode, ["stop"])
    out = [text.add(i) for i in (1, 2, 3, 4, 5)]
    assert out == ["caf", "", "é ok", " ", ""]  # "st" waits: it may begin "stop"
    assert text.stopped and text.text == "café ok " and text.flush() == ""


# ---------------------------------------------------------------------------------------------- errors

def test_errors_reach_the_client_as_its_exception_types(engine, service, live, client, healthy):
    name = service.name
    with pytest.raises(openai.BadRequestError, match=rf"{MAX_LEN} tokens.*has 400 tokens.*max_tokens is 100") as e:
        client.completions.create(model=name, prompt=ids(400, 0), max_tokens=100)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    for bad in ({"n": 2}, {"temperature": 7}, {"top_p": 0}, {"seed": -1}, {"logprobs": 2}, {"stop": [""]}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=name, prompt="hello", max_tokens=2, **bad)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=name, prompt=[1, VOCAB], max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hello", max_tokens=2)
    r = httpx.post(live.url + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    no_template = Service(engine)
    no_template.template = None
    server = Live(create_app(no_template))
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            server.client().chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
    finally:
        server.close()
    assert client.completions.create(model=name, prompt="hello", max_tokens=2).choices[0].finish_reason


def test_a_full_queue_is_a_429_with_retry_after(engine, healthy):
    small = Service(engine, max_queue=2)
    server = Live(create_app(small))
    try:
        c = server.client()
        with slots_held(engine):
            waiting = [c.completions.create(model=small.name, prompt=ids(20, i), max_tokens=4, stream=True)
                       for i in range(2)]  # admitted, queued behind the held slots
            with pytest.raises(openai.RateLimitError, match="max-queue 2") as e:
                c.completions.create(model=small.name, prompt="hello", max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
        for stream in waiting:  # the queued requests complete once the slots free up
            assert [x.choices[0].finish_reason for x in stream][-1] in ("stop", "length")
        assert c.completions.create(model=small.name, prompt="hello", max_tokens=2).choices[0].text is not None
    finally:
        server.close()


def test_an_engine_failure_is_a_500_and_the_server_goes_on(engine, service, client, monkeypatch, healthy):
    real = engine._step.decode

    def failing(*args):
        raise RuntimeError("injected ORT failure")

    monkeypatch.setattr(engine._step, "decode", failing)
    go_on = {"ignore_eos": True}  # an EOS first token would never reach the failing decode
    with pytest.raises(openai.InternalServerError, match="injected ORT failure"):
        client.completions.create(model=service.name, prompt=ids(20, 1), max_tokens=5, extra_body=go_on)
    with pytest.raises(openai.APIError, match="injected ORT failure"):
        list(client.completions.create(model=service.name, prompt=ids(20, 1), max_tokens=5, stream=True,
                                       extra_body=go_on))
    monkeypatch.setattr(engine._step, "decode", real)
    r = client.completions.create(model=service.name, prompt=ids(20, 1), max_tokens=5, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == alone(engine, ids(20, 1), 5)


# ---------------------------------------------------------------------------------------------- load and cancel

def test_32_concurrent_streams_each_equal_their_request_alone(engine, service, live, client, healthy):
    lengths = [5, 20, 40, 63, 64, 65, 100, 150, 200, 300, 400, 460] * 3  # past T = 64: the Mesa plan
    requests = [dict(prompt=ids(n, i), max_tokens=12, temperature=0 if i % 2 else 0.8, seed=i, top_p=0.95)
                for i, n in enumerate(lengths[:32])]
    running = []
    watching = threading.Event()

    def watch():  # the engine must be batching the server's requests, not get them one by one
        while not watching.is_set():
            running.append(engine.stats()["running"])
            time.sleep(0.002)

    def one(req):
        stream = client.completions.create(model=service.name, stream=True, extra_body={"return_token_ids": True,
                                                                                        "ignore_eos": True}, **req)
        chunks = [c.choices[0] for c in stream]
        return "".join(c.text for c in chunks), sum((c.token_ids for c in chunks), []), chunks[-1].finish_reason

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(one, requests, timeout=60))
    finally:
        watching.set()
        watcher.join(timeout=5)
    assert max(running) > 1
    for req, (text, tokens, finish) in zip(requests, answers):
        kw = {k: req[k] for k in ("temperature", "seed", "top_p")}
        assert tokens == alone(engine, req["prompt"], 12, stop_tokens=(), **kw)
        solo = client.completions.create(model=service.name, extra_body={"ignore_eos": True}, **req).choices[0]
        assert (text, finish) == (solo.text, solo.finish_reason) == (text, "length")
    assert client.with_options(timeout=5).models.list().data
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok"


def test_a_client_that_disconnects_frees_its_slot_at_once(engine, service, live, client, monkeypatch, healthy):
    real = engine._step.decode

    def slow(*args):  # 20 ms a step, so the stream is surely still running when the client leaves
        time.sleep(0.02)
        return real(*args)

    monkeypatch.setattr(engine._step, "decode", slow)
    cancelled = metric(live, "mesa_requests_cancelled_total")
    stream = client.completions.create(model=service.name, prompt=ids(100, 5), max_tokens=300, stream=True,
                                       extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    assert engine.stats()["running"] == 1
    stream.close()
    t = time.monotonic()
    assert wait_for(lambda: engine.stats()["free_slots"] == SLOTS, timeout=2), engine.stats()
    assert time.monotonic() - t < 1  # a step or two, not the 300 tokens
    assert wait_for(lambda: metric(live, "mesa_requests_cancelled_total") == cancelled + 1)
    assert metric(live, "mesa_running_sequences") == 0
    body = {"model": service.name, "prompt": ids(100, 5), "max_tokens": 300, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):  # not streamed: the client gives up waiting for the answer
        httpx.post(live.url + "/v1/completions", json=body, timeout=0.5)
    assert wait_for(lambda: engine.stats()["free_slots"] == SLOTS, timeout=1), engine.stats()
    assert wait_for(lambda: metric(live, "mesa_requests_cancelled_total") == cancelled + 2)
    with slots_held(engine):  # a client gone before its first token: cancelled while still queued
        stream = client.completions.create(model=service.name, prompt=ids(10, 6), max_tokens=5, stream=True)
        assert wait_for(lambda: engine.stats()["waiting"] == 1)
        stream.close()
        assert wait_for(lambda: engine.stats()["waiting"] == 0 and service.in_flight == 0)
    assert wait_for(lambda: metric(live, "mesa_requests_cancelled_total") == cancelled + 3)


def test_prefill_progress_and_metrics(engine, service, live, healthy):
    before = metric(live, "mesa_time_to_first_token_seconds_count")
    body = {"model": service.name, "prompt": ids(300, 9), "max_tokens": 3, "stream": True, "progress": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as r:
        events = r.read().decode().split("\n\n")
    progress = [json.loads(e.split("data: ", 1)[1]) for e in events if e.startswith("event: progress")]
    assert len(progress) >= 3 and progress[-1] == {"done": 300, "total": 300}
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert events[-2] == "data: [DONE]"
    text = httpx.get(live.url + "/metrics").text
    for name in ("mesa_queue_depth", "mesa_running_sequences", "mesa_prompt_tokens_total",
                 "mesa_generation_tokens_total", "mesa_time_per_output_token_seconds_bucket", "mesa_requests_total"):
        assert name in text
    assert metric(live, "mesa_time_to_first_token_seconds_count") == before + 1


# ---------------------------------------------------------------------------------------------- fuzzing

ANY = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                   lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                   max_leaves=6)
WORD_TEXT = st.lists(st.sampled_from(WORDS + ["w7", "ünï"]), min_size=1, max_size=8).map(" ".join)
PROMPT_IDS = st.builds(ids, st.integers(1, 300), st.integers(0, 9)) | st.lists(st.integers(0, VOCAB - 1), max_size=5)
SHARED = {  # valid values; body() then breaks a few fields
    "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(0, 200), "seed": st.integers(0, 2**63 - 1), "n": st.just(1), "stream": st.booleans(),
    "stop": WORD_TEXT | st.lists(WORD_TEXT | st.integers(0, VOCAB - 1), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3), "ignore_eos": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "presence_penalty": st.just(0),
    "logit_bias": st.just({}), "return_token_ids": st.booleans(), "progress": st.booleans(),
    "user": st.text(max_size=5),
}
COMPLETION = {**SHARED, "prompt": WORD_TEXT | PROMPT_IDS | st.lists(WORD_TEXT | PROMPT_IDS, min_size=1, max_size=1)}
PART = st.fixed_dictionaries({"type": st.just("text"), "text": WORD_TEXT})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"])},
                                optional={"content": WORD_TEXT | st.lists(PART, max_size=2), "name": WORD_TEXT})
CHAT = {**SHARED, "messages": st.lists(MESSAGE, min_size=1, max_size=3), "max_completion_tokens": st.integers(1, 8)}
BREAK = ANY | st.integers(-3, 2**64) | st.floats() | st.text(max_size=8) | st.sampled_from(["system", "robot", ""])
EXTRA = ["echo", "logprobs", "suffix", "best_of", "tools", "tool_choice", "response_format", "functions",
         "top_logprobs", "frequency_penalty", "unknown_field"]


def body(fields: dict, model: str, required: str):
    """A valid request (optional fields in or out), then 0-3 fields (any, unknown ones too) set to junk."""
    valid = st.fixed_dictionaries({"model": st.just(model), required: fields[required]},
                                  optional={k: v for k, v in fields.items() if k != required})
    keys = st.sampled_from(["model", *fields, *EXTRA])
    breaks = st.lists(st.tuples(keys, BREAK), max_size=3)
    return st.builds(lambda d, b: {**d, **dict(b)}, valid, breaks)


@pytest.fixture(scope="module")
def test_client(service):
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # temperature 1e-300: greedy in effect
@pytest.mark.parametrize("path, fields, required", [("/v1/completions", COMPLETION, "prompt"),
                                                    ("/v1/chat/completions", CHAT, "messages")])
def test_fuzzed_requests_are_answered_never_500(service, engine, test_client, path, fields, required, healthy):
    junk = st.binary(max_size=30) | ANY  # not JSON, or JSON that is no request at all: one case in five

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(req=st.integers(0, 4).flatmap(lambda i: junk if i == 0 else body(fields, service.name, required)))
    def check(req):
        raw = req if isinstance(req, bytes) else json.dumps(req).encode()  # NaN / Infinity included
        r = test_client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code in (200, 400, 404), (r.status_code, r.text, req)
        if r.status_code != 200:
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"] and error["type"]
        elif isinstance(req, dict) and req.get("stream") is True:
            assert r.text.endswith("data: [DONE]\n\n")
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert service.in_flight == 0 and engine.stats()["free_slots"] == SLOTS

    outcome = []

    def run():
        try:
            check()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - re-raised below, on the test's thread
            outcome.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=90)  # a hung request fails the test instead of hanging it
    assert outcome, "a fuzzed request hung"
    if outcome[0] is not None:
        raise outcome[0]


# ---------------------------------------------------------------------------------------------- process level

def test_the_runtime_imports_without_the_serve_extra():
    blocked = ("fastapi", "uvicorn", "prometheus_client", "jinja2", "starlette", "openai")
    code = ("import sys\nfor m in %r: sys.modules[m] = None\n"
            "import runtime.engine, runtime.generate, runtime.score\n"
            "try:\n    import runtime.serve\nexcept ImportError:\n    print('serve needs its extra')\n") % (blocked,)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "serve needs its extra", out.stderr


def test_the_command_line_says_what_is_wrong_and_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "runtime.serve", str(tmp_path / "missing"), "--port", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "missing" in out.stderr


SERVER = """
import sys, time
from runtime.engine import MesaEngine
load = MesaEngine.load
def slow_load(*a, **k):  # 10 ms a decode step: streams outlive a short grace period
    e = load(*a, **k)
    real = e._step.decode
    e._step.decode = lambda *x: (time.sleep(0.01), real(*x))[1]
    return e
MesaEngine.load = slow_load
from runtime.serve import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_finishes_short_streams_cancels_long_ones_and_exits_0(engine_dir, tmp_path):
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(engine_dir), "--port", "0", "--slots", "2",
                             "--backend", "ort-cpu", "--grace", "1.5"], cwd=ROOT, stdout=log, stderr=log)
    try:
        assert wait_for(lambda: "Uvicorn running on" in (tmp_path / "server.log").read_text(), timeout=60), \
            (tmp_path / "server.log").read_text()
        url = re.search(r"running on (http://\S+)", (tmp_path / "server.log").read_text()).group(1)
        results: dict[str, list[str]] = {}

        def stream(name, n):
            body = {"prompt": ids(30, n), "max_tokens": n, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                results[name] = []
                try:
                    for line in r.iter_lines():
                        results[name].append(line)
                except httpx.HTTPError:  # cut at the end of the grace period
                    results[name].append("cut")

        threads = [threading.Thread(target=stream, args=a) for a in (("short", 40), ("long", 400))]
        for t in threads:
            t.start()
        assert wait_for(lambda: all(len(results.get(k, [])) > 2 for k in ("short", "long")), timeout=20)
        t0 = time.monotonic()
        proc.send_signal(15)
        assert wait_for(lambda: "Shutting down" in (tmp_path / "server.log").read_text(), timeout=5)
        with pytest.raises(httpx.HTTPError):  # no longer accepting
            httpx.get(url + "/health", timeout=2)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 10
        for t in threads:
            t.join(timeout=10)
        assert "data: [DONE]" in results["short"]  # finished within the grace period
        assert "data: [DONE]" not in results["long"]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


# ---------------------------------------------------------------------------------------------- playground

def _chromium() -> str | None:
    return next((p for p in ("chromium", "chromium-browser") if shutil.which(p)), None)


@pytest.mark.skipif(_chromium() is None or shutil.which("chromedriver") is None,
                    reason="headless Chromium not installed (apt-get install -y chromium chromium-driver)")
def test_the_playground_streams_tokens_in_chromium(engine, service, live, client, healthy):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1000,900"):
        options.add_argument(flag)
    options.binary_location = shutil.which(_chromium())
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(live.url + "/")
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: "max_len 480" in d.find_element(By.ID, "params").text)
        assert "push_width=4" in driver.find_element(By.ID, "params").text
        prompt = " ".join(["hello world once upon a time"] * 30)  # 181 tokens: prefill in several steps
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("12")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text)
        assert "generated tokens" in driver.find_element(By.ID, "status").text
        want = client.completions.create(model=service.name, prompt=prompt, max_tokens=12, temperature=0)
        assert driver.find_element(By.ID, "output").get_attribute("textContent") == want.choices[0].text
        if os.environ.get("MESA_PLAYGROUND_SCREENSHOT"):  # for a person to look at
            driver.save_screenshot(os.environ["MESA_PLAYGROUND_SCREENSHOT"])
        assert driver.find_element(By.ID, "bar").get_attribute("value") == driver.find_element(
            By.ID, "bar").get_attribute("max")  # the prefill bar reached the prompt's length
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------------- Ray Serve

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ray_replicas_spread_requests_and_answer_as_one_engine(engine_dir, engine, tmp_path):
    pytest.importorskip("ray.serve", reason="ray[serve] not installed (extra serve-ray)")
    import ray
    from ray import serve

    from runtime.serve import parser
    from runtime.serve_ray import start

    port = _free_port()
    args = parser().parse_args([str(engine_dir), "--ray", "--replicas", "2", "--port", str(port), "--slots", "2",
                                "--backend", "ort-cpu", "--replica-cpus", "0.5", "--model-name", "tiny"])
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        start(args, ray_init=dict(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                                  _node_ip_address="127.0.0.1"))
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)

        def one(i):
            r = c.completions.with_raw_response.create(model="tiny", prompt=ids(30 + 20 * i, i), max_tokens=6,
                                                       temperature=0, extra_body={"return_token_ids": True})
            return r.headers["x-mesa-replica"], r.parse().choices[0].token_ids

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(16), timeout=120))
        assert len({replica for replica, _ in answers}) == 2
        for i, (_, tokens) in enumerate(answers):
            assert tokens == alone(engine, ids(30 + 20 * i, i), 6)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
