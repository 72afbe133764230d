"""The trained 256-token model: Mesa keeps passkey retrieval at 1024 tokens, plain RoPE loses it."""

from __future__ import annotations

import numpy as np
import pytest

from scripts import fixtures, passkey, passkey_demo

TRAINED = fixtures.trained()


@pytest.fixture(scope="module")
def task():
    return passkey.Task.load(TRAINED / "task.json")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from runtime.engine import MesaEngine

    dirs = passkey_demo.export_all(TRAINED / "model", tmp_path_factory.mktemp("passkey"), 1032, push_widths=(16,))
    return {name: MesaEngine.load(d, backend="ort-cpu") for name, d in dirs.items()}


@pytest.mark.parametrize("mode", passkey.MODES)
def test_prompt_layout(task, mode):
    rng = np.random.default_rng(0)
    for length in (15, 64, 300, 1024):
        prompt, answer = passkey.make_prompt(task, length, mode, rng)
        assert len(prompt) == length and prompt[0] == task.bos and prompt[-2:] == [task.query, task.ans]
        k = prompt.index(task.key)
        assert prompt[k + 1:k + 6] == answer and prompt[k + 6] == task.key
        assert len(set(answer)) == 5 and set(answer) <= set(task.digits)
        if mode == "repeat":
            assert (k - 1) % len(task.sentence) == 0  # the key sits at a sentence boundary


def test_prompt_matches_task_example(task):
    example = __import__("json").loads((TRAINED / "task.json").read_text())["example_repeat_L64_distinct"]
    filler = [t for t in example["prompt"][1:-2] if t >= task.filler_range[0]]
    assert filler == (list(task.sentence) * 4)[:54]
    assert len(example["prompt"]) == 64 and example["prompt"].index(task.key) == example["key_offset"]


def test_wilson_interval():
    lo, hi = passkey.wilson_interval(20, 20)
    assert 0.83 < lo < 0.84 and hi == 1.0
    lo, hi = passkey.wilson_interval(10, 20)
    assert abs((lo + hi) / 2 - 0.5) < 1e-9


def test_mesa_keeps_the_passkey_origin_loses_it(engines, task):
    mesa = passkey.evaluate(engines["mesa pw=16"], task, 1024, "random", 20) / 20
    origin = passkey.evaluate(engines["origin"], task, 1024, "random", 20) / 20
    print(f"L=1024, 20 random-filler prompts: mesa pw=16 {mesa:.2f}, origin {origin:.2f}")
    assert mesa >= 0.9 and origin <= 0.6


def test_mixed_length_batch_in_one_call(engines, task):
    rng = np.random.default_rng(7)
    cases = [passkey.make_prompt(task, length, "random", rng) for length in [1024, 1000, 960, 920] * 5]
    scores = {}
    for name, engine in engines.items():
        outs = engine.generate([p for p, _ in cases], max_new_tokens=5, stop_tokens=())
        scores[name] = np.mean([o.tokens == a for o, (_, a) in zip(outs, cases)])
    print(f"mixed-length batch of 20: {scores}")
    assert scores["mesa pw=16"] >= 0.9 and scores["origin"] <= 0.6
