"""The serving core: in-place decode over a rotated cache, batched rows, continuous batching, sequences.

Every check compares against something the code under test did not compute: the PyTorch reference
decoder (eager torch, pre-RoPE cache, stair positions recomputed every step) for long decodes, and the
same request run alone for batches and arrivals."""

from __future__ import annotations

import contextlib
import io
import threading
import time

import numpy as np
import pytest

from runtime import mesa
from runtime.engine import EngineError, MesaEngine, RequestError
from tests.conftest import (
    MESA_T64,
    MESA_T64_FLAGS,
    anchor_jumps,
    export_engine,
    prompt,
    reference_greedy,
    tiny_checkpoint,
)

TOL = 1e-4
T = MESA_T64["train_length"]
MAX_LEN = 480
FLAGS = MESA_T64_FLAGS
PARAMS = mesa.MesaParams(**MESA_T64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("batching")
    ckpt = tiny_checkpoint(d / "ckpt", max_position_embeddings=T)
    with contextlib.redirect_stdout(io.StringIO()):
        engine = export_engine(ckpt, d / "engine", MAX_LEN, [*FLAGS, "--no-verify"])
    return ckpt, engine


@pytest.fixture(scope="module")
def engine(model):
    e = MesaEngine.load(model[1], backend="ort-cpu", slots=4)
    yield e
    e.close()


@pytest.mark.parametrize("L", [40, 150])
def test_long_decode_matches_the_reference_across_anchor_jumps(model, engine, L):
    ckpt, _ = model
    steps = 300
    ids = prompt(L, L)
    W = mesa.dynamic_split(L, PARAMS)
    assert anchor_jumps(L, steps, W) >= 4  # S passes T, then the anchor moves every W steps
    fed, expected = reference_greedy(ckpt, ids, steps, MAX_LEN)
    with engine.sequence(ids) as seq:
        first = seq.step()
        assert int(np.argmax(first)) == fed[0]
        got = []
        for t in fed:
            seq.append([t])
            got.append(seq.step())
    got = np.stack(got)
    diff = np.abs(got - expected).max(axis=1)
    print(f"L={L} W={W}: max |dlogit| {diff.max():.2e} over {steps} steps")
    assert diff.max() <= TOL
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_batch_rows_equal_each_alone(engine):
    prompts = [prompt(n, n) for n in (5, 40, 70, 150)]  # L <= F, plain, past T, middle chunks
    together = engine.generate(prompts, max_new_tokens=60, return_logits=True)
    for p, row in zip(prompts, together):
        alone = engine.generate(p, max_new_tokens=60, return_logits=True)
        assert row.tokens == alone.tokens
        assert np.abs(row.decode_logits - alone.decode_logits).max() <= TOL
        assert np.abs(row.prefill_logits - alone.prefill_logits).max() <= TOL


def test_requests_arriving_and_leaving_equal_each_alone(model):
    """More requests than slots, staggered, of different lengths: each equals itself alone."""
    requests = [(prompt(n, i), k) for i, (n, k) in enumerate([(30, 40), (150, 10), (70, 80), (5, 25), (100, 60),
                                                              (64, 30)])]
    with contextlib.closing(MesaEngine.load(model[1], backend="ort-cpu", slots=3, token_budget=16)) as e:
        alone = [e.generate(p, max_new_tokens=k).tokens for p, k in requests]
        got: dict[int, list[int]] = {}

        def client(i):
            time.sleep(0.02 * i)
            p, k = requests[i]
            got[i] = list(e.stream(p, max_new_tokens=k))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [got.get(i) for i in range(len(requests))] == alone
        assert e.stats()["free_slots"] == 3


def test_a_long_prefill_does_not_freeze_running_decodes(model):
    with contextlib.closing(MesaEngine.load(model[1], backend="ort-cpu", slots=2, token_budget=8)) as e:
        running = e.stream(prompt(20, 1), max_new_tokens=300)
        a_tokens = [next(running)]
        seen: list[int] = []  # tokens A had when each of B's prefill sub-steps finished

        def progress(done, total):
            seen.append(len(a_tokens))

        b = threading.Thread(target=lambda: e.generate(prompt(200, 2), max_new_tokens=1, progress=progress))
        b.start()
        for token in running:
            a_tokens.append(token)
        b.join(timeout=120)
    plan = mesa.prefill_steps(200, PARAMS)
    assert [s.kind for s in plan].count("middle") >= 2
    # middle chunks in sub-steps of <= 8 tokens; the first and the last chunk whole
    assert len(seen) == 2 + sum(-(-s.q // 8) for s in plan if s.kind == "middle")
    assert seen[-1] - seen[0] >= len(seen) - 3  # A got a token in about every iteration of B's prefill


def test_splitting_middle_chunks_is_exact(model, engine):
    ids = prompt(200, 7)
    whole = engine.score(ids)
    with contextlib.closing(MesaEngine.load(model[1], backend="ort-cpu", slots=1, token_budget=8)) as e:
        split = e.score(ids)
    assert np.abs(whole - split).max() <= 1e-5


def test_cancel_frees_the_slot_at_once(model):
    with contextlib.closing(MesaEngine.load(model[1], backend="ort-cpu", slots=1)) as e:
        seq = e.sequence(prompt(30, 3))
        seq.step()
        assert e.stats()["free_slots"] == 0
        seq.cancel()
        assert e.stats()["free_slots"] == 1
        stream = e.stream(prompt(30, 3), max_new_tokens=50)
        next(stream)
        stream.close()  # a client that stops reading
        assert e.stats()["free_slots"] == 1
        assert len(e.generate(prompt(30, 3), max_new_tokens=5).tokens) == 5


def test_a_failed_step_leaves_the_engine_usable(model, monkeypatch):
    with contextlib.closing(MesaEngine.load(model[1], backend="ort-cpu", slots=2)) as e:
        before = e.generate(prompt(30, 4), max_new_tokens=8).tokens
        real = e._step.decode
        calls = iter([True])

        def failing(*args):
            if next(calls, False):
                raise RuntimeError("injected ORT failure")
            return real(*args)

        monkeypatch.setattr(e._step, "decode", failing)
        with pytest.raises(EngineError, match="injected"):
            e.generate(prompt(30, 4), max_new_tokens=8)
        assert e.stats()["free_slots"] == 2
        assert e.generate(prompt(30, 4), max_new_tokens=8).tokens == before


def test_stepwise_misuse_is_a_request_error(engine):
    with engine.sequence(prompt(10, 5)) as seq:
        seq.step()
        with pytest.raises(RequestError, match="append"):
            seq.step()
        with pytest.raises(RequestError, match="vocabulary"):
            seq.append([10**6])


def test_engines_without_inplace_decode_batch_row_by_row(model, tmp_path):
    """--target portable keeps the one-step contract: same tokens as the in-place engine."""
    with contextlib.redirect_stdout(io.StringIO()):
        portable = export_engine(model[0], tmp_path / "portable", MAX_LEN, [*FLAGS, "--no-verify", "--target", "portable"])
    prompts = [prompt(n, n) for n in (40, 150)]
    with contextlib.closing(MesaEngine.load(portable, backend="ort-cpu", slots=2)) as e, \
            contextlib.closing(MesaEngine.load(model[1], backend="ort-cpu", slots=2)) as inplace:
        assert not e.stats()["inplace_decode"] and inplace.stats()["inplace_decode"]
        got = e.generate(prompts, max_new_tokens=100, return_logits=True)
        want = inplace.generate(prompts, max_new_tokens=100, return_logits=True)
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        assert np.abs(g.decode_logits - w.decode_logits).max() <= TOL


def test_origin_engine_decodes_like_transformers_past_T(model, tmp_path):
    """--method origin (plain RoPE): the decode cache must never re-rotate; transformers' own model,
    run over the prompt and the generated tokens at once, gives the same logits at every step."""
    import torch
    import transformers

    with contextlib.redirect_stdout(io.StringIO()):
        origin = export_engine(model[0], tmp_path / "origin", 240, ["--method", "origin", "--no-verify"])
    ids = prompt(40, 9)
    with contextlib.closing(MesaEngine.load(origin, backend="ort-cpu")) as e:
        g = e.generate(ids, max_new_tokens=120, stop_tokens=(), return_logits=True)
        assert e.stats()["rotations"] == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(model[0], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        full = hf(torch.tensor([ids + g.tokens[:-1]])).logits[0].numpy()
    assert np.abs(g.decode_logits - full[len(ids):]).max() <= TOL  # positions up to 159, far past T = 64
    assert g.tokens[1:] == full[len(ids):].argmax(-1).tolist()


def test_a_stream_cancelled_before_its_first_token_frees_its_slot(model):
    """cancel() from another thread while the request still waits for a slot, or after it started."""
    with contextlib.closing(MesaEngine.load(model[1], backend="ort-cpu", slots=1)) as e:
        with e.sequence(prompt(30, 3)) as holder:
            holder.step()  # holds the only slot
            waiting = e.stream(prompt(30, 3), max_new_tokens=50)
            threading.Thread(target=waiting.cancel).start()
            time.sleep(0.2)
            assert list(waiting) == []  # ended without a token
        stats = e.stats()
        assert (stats["waiting"], stats["running"], stats["free_slots"]) == (0, 0, 1)
        started = e.stream(prompt(30, 3), max_new_tokens=200, stop_tokens=())
        next(started)
        started.close()
        assert e.stats()["free_slots"] == 1 and list(started) == []


def test_short_prompt_overtakes_a_long_prefill_and_both_stay_exact(model):
    """A short prompt arriving while a long one is part-way through its prefill is prefilled first (the
    long one's keys wait in their own buffer), and both generate exactly what they generate alone."""
    long_ids, short_ids = prompt(400, 7), prompt(30, 8)
    with MesaEngine.load(model[1], backend="ort-cpu", slots=2) as alone:
        expect_long = alone.generate(long_ids, 6, stop_tokens=()).tokens
        expect_short = alone.generate(short_ids, 6, stop_tokens=()).tokens
    with MesaEngine.load(model[1], backend="ort-cpu", slots=2, token_budget=32) as e:
        batcher, entered, gate = e._batcher, threading.Event(), threading.Event()
        real = batcher.step_fn

        def gated(*args):  # holds the long prompt's first prefill step until the short one is queued
            if not entered.is_set():
                entered.set()
                assert gate.wait(30)
            return real(*args)

        batcher.step_fn = gated
        order: list[str] = []  # the order in which the two prefills finished, seen by the batcher itself
        finish = batcher.decoder.finish_prefill  # (not by the readers: their threads may wake in any order)

        def finished(work):
            order.append("long" if len(work.ids) == len(long_ids) else "short")
            return finish(work)

        batcher.decoder.finish_prefill = finished
        long_stream = e.stream(long_ids, 6, stop_tokens=())
        assert entered.wait(30)
        short_stream = e.stream(short_ids, 6, stop_tokens=())
        gate.set()

        def read(stream, out):
            out.extend(stream)

        got_long, got_short = [], []
        threads = [threading.Thread(target=read, args=(long_stream, got_long)),
                   threading.Thread(target=read, args=(short_stream, got_short))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got_long == expect_long and got_short == expect_short
        assert order == ["short", "long"]  # first come first served would have finished the long one first
