"""Property tests: runtime/mesa.py against a brute-force restatement of MESA_SPEC (the published code's behaviour).

Every oracle below (`spec_*`) is written from the spec text (sections 2, 3, 5, 6, 11) in the most
literal way, deliberately naive and without reading anything from runtime/mesa.py except the
functions under test. The positions oracle builds the published list (integers A-m .. A-1, each
repeated pw times, then A .. S-1) and slices it from the end, rather than using the closed form.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from export.model import RopeConfig, rope_tables
from scripts import fixtures
from runtime import mesa
from runtime.mesa import (
    MesaParamError,
    MesaParams,
    decode_step,
    dynamic_split,
    key_positions,
    largest_distance,
    logn_scale,
    max_distance,
    origin_params,
    prefill_steps,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ============================================================================ spec oracles


class SpecReject(Exception):
    """The published code fails here (an assert, or a division by zero)."""


def spec_positions(S: int, W: int, T: int, pw: int) -> list[int]:
    """§5, 'How the official code builds it': the published list, keys = its last S entries."""
    if S <= T:
        return list(range(S))
    push_pos = (S - 1) % W
    A = S - push_pos
    m = A // pw + 1
    raw = []
    for value in range(A - m, A):
        for _ in range(pw):
            raw.append(value)
    for value in range(A, S):
        raw.append(value)
    assert len(raw) >= S
    return raw[len(raw) - S:]


def spec_query_positions(S: int, q: int, W: int, T: int, pw: int) -> list[int]:
    """§5: the q queries take the last q entries of the same list."""
    full = spec_positions(S, W, T, pw)
    return full[len(full) - q:]


def spec_max_distance(S: int, W: int, T: int, pw: int) -> int:
    """Largest query-key position distance of a call with S keys: p(S-1) - p(k) over every key k.

    The newest query has the largest position (p is non-decreasing, checked in the positions test),
    so no other query can see a larger distance.
    """
    p = spec_positions(S, W, T, pw)
    return max(p[S - 1] - p[k] for k in range(S))


def spec_dynamic_split(L: int, T: int, F: int, Fc: int, C: int, G: int, W_held: int) -> int:
    """§2 step by step. Asserts (and Python division by zero) become SpecReject.

    One addition the spec leaves implicit: a chunk width below 1 cannot drive the chunk loop of §3
    (or serve as the modulus of §5), so such a W is rejected too.
    """
    # 1.
    if L < T - G:
        return W_held
    try:
        # 2.
        X = L + G - C - F
        D = T - F - Fc
        N = X // D
        M = X % D
        # 3.
        if M < 200:
            W = D
        else:
            W = X // (N + 1)
            N = X // W
            MM = X % W
            if not MM < 200:
                raise SpecReject("non reasonable setting")
    except ZeroDivisionError as e:
        raise SpecReject(str(e)) from e
    # 4.
    if not W + F < T:
        raise SpecReject("W + F < T")
    if W < 1:
        raise SpecReject("chunk width below 1")
    return W


def spec_w_or_reject(L, T, F, Fc, C, G, W0):
    try:
        return spec_dynamic_split(L, T, F, Fc, C, G, W0)
    except SpecReject:
        return "raises"


def spec_chunks(L: int, F: int, W: int) -> list[tuple[str, int, int]]:
    """§3 chunk boundaries."""
    chunks = [("first", 0, min(F, L))]
    if L <= F:
        return chunks
    s = F
    while True:
        if s + W < L:
            chunks.append(("middle", s, s + W))
            s = s + W
        else:
            chunks.append(("last", s, L))
            break
    return chunks


def spec_visible(kind: str, start: int, stop: int, F: int) -> list[int]:
    """§3: absolute token indices of the keys a chunk's call sees, in call-index order."""
    if kind == "first":
        return list(range(start, stop))
    if kind == "middle":
        return list(range(0, F)) + list(range(start, stop))
    if kind == "last":
        return list(range(0, start)) + list(range(start, stop))
    raise AssertionError(kind)


def spec_logn(i: int, T: int) -> float:
    """§6: max(1, float32(ln(i+1)) / ln T)."""
    ratio = float(np.float32(math.log(i + 1))) / math.log(T)
    return max(1.0, ratio)


def step_visible(step) -> list[int]:
    """The module's step contract: cache[0:a] ++ cache[b:w] ++ new."""
    a, b, w = step.sink_len, step.window_start, step.write_pos
    return list(range(0, a)) + list(range(b, w)) + list(range(step.start, step.stop))


def make_params(T, F, Fc, C, G, pw, W0=0) -> MesaParams:
    return MesaParams(train_length=T, first_chunk=F, first_chunk_cache=Fc, last_context=C,
                      reserve_tokens=G, push_width=pw, chunk_width=W0)


SET_A = dict(T=128, F=8, Fc=8, C=32, G=8, pw=4, W0=128)
SET_D = dict(T=256, F=16, Fc=16, C=64, G=16, pw=8, W0=256)


def params_of(d) -> MesaParams:
    return make_params(d["T"], d["F"], d["Fc"], d["C"], d["G"], d["pw"], d["W0"])


def spec_w_of(L, d):
    return spec_w_or_reject(L, d["T"], d["F"], d["Fc"], d["C"], d["G"], d["W0"] or d["T"])


def module_w_or_raises(L, p):
    try:
        return dynamic_split(L, p)
    except MesaParamError:
        return "raises"


# ============================================================================ §5 positions


@st.composite
def stair_cases(draw):
    T = draw(st.integers(2, 5000))
    W = draw(st.integers(1, T))
    pw = draw(st.integers(1, 64))
    mode = draw(st.sampled_from(["any", "any", "any", "S=T", "S=T+1", "pp=0", "pp=1", "small"]))
    if mode == "any":
        S = draw(st.integers(1, 3 * T + 50))
    elif mode == "S=T":
        S = T
    elif mode == "S=T+1":
        S = T + 1
    elif mode == "small":
        S = draw(st.integers(1, min(T, 40)))
    else:  # S - 1 a multiple of W with S > T (pp = 0), or one past it
        k0 = -(-T // W)  # smallest k with k*W >= T, so S = 1 + k*W > T
        k = draw(st.integers(k0, k0 + 3 * T // W + 2))
        S = 1 + k * W + (1 if mode == "pp=1" else 0)
    return S, W, T, pw


@FAST
@given(stair_cases())
@example((16, 6, 16, 3))  # S = T
@example((17, 6, 16, 3))  # S = T + 1, pp = 4
@example((19, 6, 16, 3))  # pp = 0
@example((129, 128, 128, 4))  # pp = 0 at S = T + 1
@example((2, 1, 2, 1))
@example((3, 1, 2, 1))
@example((3, 2, 2, 64))
@example((15001, 5000, 5000, 64))
def test_key_positions_match_published_list(case):
    S, W, T, pw = case
    expected = spec_positions(S, W, T, pw)
    got = key_positions(S, W, T, pw)
    assert isinstance(got, np.ndarray) and got.shape == (S,)
    assert got.tolist() == expected
    # spec facts about the oracle itself: newest keeps its index, positions never exceed S - 1
    assert expected[-1] == S - 1
    assert max(expected) == S - 1 and min(expected) >= 0
    assert all(x <= y for x, y in zip(expected, expected[1:]))


@FAST
@given(stair_cases(), st.data())
def test_query_positions_are_last_q(case, data):
    S, W, T, pw = case
    q = data.draw(st.integers(1, S))
    assert key_positions(S, W, T, pw)[S - q:].tolist() == spec_query_positions(S, q, W, T, pw)


def _row(first, groups, tail=()):
    """A row of the §5 table: `first` alone, then each of `groups` three times, then `tail`."""
    out = [first]
    for g in groups:
        out += [g, g, g]
    return out + list(tail)


WORKED = {  # §5 worked examples, T = 16, W = 6, pw = 3
    19: _row(12, range(13, 19)),
    20: _row(12, range(13, 19), [19]),
    21: _row(12, range(13, 19), [19, 20]),
    24: _row(12, range(13, 19), [19, 20, 21, 22, 23]),
    25: _row(16, range(17, 25)),
}


@pytest.mark.parametrize("S", sorted(WORKED))
def test_worked_examples_table(S):
    expected = WORKED[S]
    assert len(expected) == S
    assert spec_positions(S, 6, 16, 3) == expected  # the oracle reproduces the table
    assert key_positions(S, 6, 16, 3).tolist() == expected
    pp = (S - 1) % 6
    assert pp == {19: 0, 20: 1, 21: 2, 24: 5, 25: 0}[S]


def test_worked_example_raw_list_s20():
    # "For S = 20 the official raw list is 12,12,12, 13,13,13, ..., 18,18,18, 19 (22 entries)"
    raw = [v for v in range(12, 19) for _ in range(3)] + [19]
    assert len(raw) == 22
    assert raw[-20:] == WORKED[20]


def test_data_set_position_examples():
    # T=128, W=128, pw=4, S=129 (pp=0): 96, 97x4, ..., 127x4, 128x4
    expected = [96] + [v for v in range(97, 129) for _ in range(4)]
    assert len(expected) == 129
    assert spec_positions(129, 128, 128, 4) == expected
    assert key_positions(129, 128, 128, 4).tolist() == expected
    # T=128, W=112, pw=4
    p1008 = key_positions(1008, 112, 128, 4).tolist()
    assert p1008[0] == 672 and p1008[-1] == 1007
    assert (1008 - 1) % 112 == 111
    p1009 = key_positions(1009, 112, 128, 4).tolist()
    assert p1009[0] == 756
    assert p1009[-6:] == [1007, 1007, 1008, 1008, 1008, 1008]
    p1010 = key_positions(1010, 112, 128, 4).tolist()
    assert p1010[-6:] == [1007, 1008, 1008, 1008, 1008, 1009]
    for S, p in ((1008, p1008), (1009, p1009), (1010, p1010)):
        assert p == spec_positions(S, 112, 128, 4)


def test_case_a_L340_last_chunk_queries():
    # §5: last chunk [232, 340), pp = 3, A = 337, 105 queries on stairs, query 232 at position 310
    W = dynamic_split(340, params_of(SET_A))
    assert W == 112
    steps = prefill_steps(340, params_of(SET_A))
    last = steps[-1]
    assert (last.start, last.stop, last.kv_len) == (232, 340, 340)
    qpos = key_positions(last.kv_len, W, 128, 4)[-last.q:]
    assert qpos[0] == 310
    assert int(np.sum(np.arange(232, 340) < 337)) == 105
    assert qpos.tolist() == spec_query_positions(340, 108, 112, 128, 4)


# ============================================================================ max distance


@FAST
@given(stair_cases())
@example((19, 6, 16, 3))
@example((16, 6, 16, 3))
def test_max_distance_brute_force(case):
    S, W, T, pw = case
    expected = spec_max_distance(S, W, T, pw)
    assert int(max_distance(S, W, T, pw)) == expected
    if S > T:  # §11 closed form, as a check of the oracle
        pp = (S - 1) % W
        assert expected == pp + (S - pp - 1) // pw


@MEDIUM
@given(st.integers(2, 400), st.integers(1, 400), st.integers(1, 16), st.integers(1, 300))
def test_max_distance_vectorised(T, W, pw, n):
    W = min(W, T)
    S = np.arange(1, n + 1)
    got = np.asarray(max_distance(S, W, T, pw))
    assert got.tolist() == [spec_max_distance(int(s), W, T, pw) for s in S]


@st.composite
def small_params(draw, max_T=200):
    T = draw(st.integers(2, max_T))
    F = draw(st.integers(1, T - 1))
    Fc = draw(st.integers(0, T))
    C = draw(st.integers(0, T))
    G = draw(st.integers(0, T))
    pw = draw(st.integers(1, 16))
    W0 = draw(st.integers(0, T))
    return dict(T=T, F=F, Fc=Fc, C=C, G=G, pw=pw, W0=W0)


def spec_largest_distance(max_len: int, d: dict) -> int:
    """§11 by brute force: every prompt length L (that the spec accepts), every S in [L, max_len]."""
    T, pw = d["T"], d["pw"]
    cache: dict[tuple[int, int], int] = {}

    def dist(S, W):
        if (S, W) not in cache:
            cache[(S, W)] = spec_max_distance(S, W, T, pw)
        return cache[(S, W)]

    best = 0
    for L in range(1, max_len + 1):
        W = spec_w_of(L, d)
        if W == "raises":
            continue
        for S in range(L, max_len + 1):
            best = max(best, dist(S, W))
    return best


def spec_largest_distance_every_step(max_len: int, d: dict) -> int:
    """Same, also counting the first and middle chunks of every prompt (each chunk is a step)."""
    best = spec_largest_distance(max_len, d)
    for L in range(1, max_len + 1):
        W = spec_w_of(L, d)
        if W == "raises":
            continue
        for kind, start, stop in spec_chunks(L, d["F"], W):
            S = len(spec_visible(kind, start, stop, d["F"]))
            best = max(best, spec_max_distance(S, W, d["T"], d["pw"]))
    return best


@FEW
@given(small_params(), st.integers(1, 400))
@example(dict(SET_A), 400)
@example(dict(SET_A), 129)
@example(dict(T=128, F=8, Fc=8, C=32, G=8, pw=4, W0=0), 300)
def test_largest_distance_brute_force(d, max_len):
    assert largest_distance(max_len, params_of(d)) == spec_largest_distance(max_len, d)


@FEW
@given(small_params(max_T=120), st.integers(1, 250))
def test_largest_distance_covers_every_step(d, max_len):
    assert largest_distance(max_len, params_of(d)) == spec_largest_distance_every_step(max_len, d)


def test_largest_distance_set_d():
    d = dict(SET_D)
    assert largest_distance(400, params_of(d)) == spec_largest_distance(400, d)


# ============================================================================ §2 DynamicSplit


@st.composite
def split_cases(draw):
    mode = draw(st.sampled_from(["realistic", "realistic", "wide", "wild"]))
    if mode == "realistic":  # reaches the M >= 200 branch: T - F - Fc > 200
        T = draw(st.integers(256, 4096))
        F = draw(st.integers(1, T // 8))
        Fc = draw(st.integers(0, T // 8))
        C = draw(st.integers(0, T // 4))
        G = draw(st.integers(0, T // 4))
        L = draw(st.integers(max(1, T - G - 50), 40 * T))
    elif mode == "wide":
        T = draw(st.integers(2, 4096))
        F = draw(st.integers(1, T - 1))
        Fc = draw(st.integers(0, T))
        C = draw(st.integers(0, 2 * T))
        G = draw(st.integers(0, 2 * T))
        L = draw(st.integers(1, 20 * T + 10))
    else:  # invalid or degenerate settings
        T = draw(st.integers(2, 600))
        F = draw(st.integers(1, T - 1))
        Fc = draw(st.sampled_from([0, T - F, T - F + 1, T, 3 * T, draw(st.integers(0, 3 * T))]))
        C = draw(st.integers(0, 4 * T))
        G = draw(st.integers(0, 4 * T))
        L = draw(st.integers(1, 10 * T + 10))
    W0 = draw(st.integers(0, 2 * T))
    return L, T, F, Fc, C, G, W0


@settings(max_examples=1500, deadline=None)
@given(split_cases())
@example((300, 128, 8, 8, 32, 8, 128))
@example((720, 256, 16, 16, 64, 16, 256))
@example((40617, 256, 16, 38, 0, 0, 0))  # MM = 200: "non reasonable setting"
@example((100, 128, 8, 8, 32, 8, 0))  # early return with W0 = 0 -> T
@example((500, 300, 50, 250, 0, 0, 0))  # D = 0
@example((500, 300, 50, 260, 0, 0, 0))  # D < 0
def test_dynamic_split_matches_spec(case):
    L, T, F, Fc, C, G, W0 = case
    p = make_params(T, F, Fc, C, G, 1, W0)
    expected = spec_w_or_reject(L, T, F, Fc, C, G, W0 if W0 else T)
    assert module_w_or_raises(L, p) == expected


@pytest.mark.parametrize("d, upto", [(SET_A, 3000), (SET_D, 6000),
                                     (dict(T=2048, F=64, Fc=64, C=256, G=256, pw=16, W0=0), 40000),
                                     (dict(T=300, F=20, Fc=40, C=10, G=5, pw=3, W0=7), 30000)])
def test_dynamic_split_sweep(d, upto):
    p = params_of(d)
    branches = set()
    for L in range(1, upto + 1):
        expected = spec_w_of(L, d)
        assert module_w_or_raises(L, p) == expected, L
        if L < d["T"] - d["G"]:
            branches.add("early")
        elif expected != "raises":
            D = d["T"] - d["F"] - d["Fc"]
            branches.add("M<200" if expected == D else "M>=200")
    if d["T"] - d["F"] - d["Fc"] > 200:
        assert "M>=200" in branches  # the sweep really reached the second branch


def test_dynamic_split_fixture_facts():
    a = params_of(SET_A)
    assert dynamic_split(300, a) == 112
    assert dynamic_split(100, a) == 128  # early return: W0
    assert dynamic_split(125, a) == 112  # T - G <= L <= T still runs DynamicSplit
    assert dynamic_split(130, a) == 112
    assert dynamic_split(720, params_of(SET_D)) == 218
    for L in (300, 100, 125, 720):
        d = SET_D if L == 720 else SET_A
        assert spec_w_of(L, d) == dynamic_split(L, params_of(d))
    # early return keeps the held W0, whatever it is; the default (0) means T
    assert dynamic_split(100, make_params(128, 8, 8, 32, 8, 4, 77)) == 77
    assert dynamic_split(100, make_params(128, 8, 8, 32, 8, 4)) == 128


def test_dynamic_split_rejects_non_reasonable_setting():
    p = make_params(256, 16, 38, 0, 0, 1)
    with pytest.raises(MesaParamError):
        dynamic_split(40617, p)
    assert spec_w_or_reject(40617, 256, 16, 38, 0, 0, 256) == "raises"
    assert dynamic_split(40616, p) == spec_dynamic_split(40616, 256, 16, 38, 0, 0, 256)


# ============================================================================ §3 chunk plan


def check_plan(L: int, d: dict):
    p = params_of(d)
    W = spec_w_of(L, d)
    if W == "raises":
        with pytest.raises(MesaParamError):
            prefill_steps(L, p)
        return None
    steps = prefill_steps(L, p)
    chunks = spec_chunks(L, d["F"], W)
    assert [(s.start, s.stop) for s in steps] == [(a, b) for _, a, b in chunks]
    T, pw, F = d["T"], d["pw"], d["F"]
    for step, (kind, start, stop) in zip(steps, chunks):
        visible = spec_visible(kind, start, stop, F)
        assert step.write_pos == step.start
        assert step_visible(step) == visible
        assert [k for lo, hi in step.visible_ranges for k in range(lo, hi)] == visible
        S = len(visible)
        q = stop - start
        # query i of the block (absolute index start + i) sees the cached keys and new keys start..start+i
        assert step.attention_pairs == sum(len([k for k in visible if k < start or k <= start + i]) for i in range(q))
        assert step.q == q
        assert step.kv_len == S
        assert step.kv_len == step.sink_len + (step.write_pos - step.window_start) + step.q
        assert step.chunk_width == W
        # positions and log-n factors of the chunk's queries (call indices P .. S-1)
        qpos = key_positions(step.kv_len, step.chunk_width, T, pw)[S - q:]
        assert qpos.tolist() == spec_query_positions(S, q, W, T, pw)
        lam = logn_scale(np.arange(S - q, S), T)
        assert np.allclose(lam, [spec_logn(i, T) for i in range(S - q, S)], rtol=1e-6, atol=1e-6)
        if kind == "middle":  # §5/§6: middle chunk tokens sit right after the first chunk, λ = 1
            assert S < T
            assert qpos.tolist() == list(range(F, F + q))
            assert np.all(lam == 1.0)
        if kind == "last":
            assert S == L
    return chunks


@st.composite
def plan_cases(draw):
    d = draw(small_params(max_T=300))
    mode = draw(st.sampled_from(["any", "any", "L<=F", "last=1", "last=W", "last=W-1"]))
    if mode == "L<=F":
        return d, draw(st.integers(1, d["F"]))
    L = draw(st.integers(1, 8 * d["T"] + 20))
    W = spec_w_of(L, d)
    if mode != "any" and W != "raises" and L > d["F"]:
        k = (L - d["F"]) // W
        L = d["F"] + k * W + {"last=1": 1, "last=W": 0, "last=W-1": -1}[mode]
        L = max(L, 1)
    return d, L


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_cases())
@example((dict(SET_A), 5))
@example((dict(SET_A), 8))
@example((dict(SET_A), 9))
@example((dict(SET_A), 130))
@example((dict(SET_A), 233))  # one-token last chunk: 233 - 8 = 2*112 + 1
@example((dict(SET_A), 232))  # last chunk of exactly W tokens
@example((dict(SET_D), 720))
def test_prefill_steps_match_spec(case):
    d, L = case
    check_plan(L, d)


@pytest.mark.parametrize("d, upto", [(SET_A, 1200), (SET_D, 1500),
                                     (dict(T=64, F=4, Fc=4, C=8, G=0, pw=2, W0=5), 400)])
def test_prefill_steps_sweep(d, upto):
    seen = set()
    for L in range(1, upto + 1):
        chunks = check_plan(L, d)
        if chunks is None:
            continue
        if L <= d["F"]:
            seen.add("L<=F")
        if len(chunks) > 1:
            kind, start, stop = chunks[-1]
            W = spec_w_of(L, d)
            seen.add({1: "one-token last", W: "full last"}.get(stop - start, "other"))
            if any(k == "middle" for k, _, _ in chunks):
                seen.add("middle")
    assert {"L<=F", "one-token last", "full last", "middle"} <= seen


FIXTURES = fixtures.OFFICIAL
FIXTURE_CASES = fixtures.official_cases()


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_plan_matches_official_chunks(case):
    inputs = json.loads((FIXTURES / case / "inputs.json").read_text())
    chunks = json.loads((FIXTURES / case / "chunks.json").read_text())
    ps = inputs["position_set_before_prefill"]
    d = dict(T=ps["train_length"], F=ps["first_chunk"], Fc=ps["first_chunk_cache"], C=ps["last_context"],
             G=ps["max_token_len"], pw=ps["push_width"], W0=ps["context_window_length"])
    L = len(inputs["input_ids"][0]) if isinstance(inputs["input_ids"][0], list) else len(inputs["input_ids"])
    assert L == inputs["total_length"]
    p = params_of(d)
    W_after = inputs["position_set_after_prefill"]["context_window_length"]
    assert dynamic_split(L, p) == W_after
    assert spec_w_of(L, d) == W_after

    recorded = [(c["q_len"], c["past_len"], c["kv_seq_len"], c["context_window_length"])
                for c in chunks["prefill_calls"]]
    steps = prefill_steps(L, p)
    got = [(s.q, s.kv_len - s.q, s.kv_len, s.chunk_width) for s in steps]
    assert got == recorded
    oracle = []
    for kind, start, stop in spec_chunks(L, d["F"], W_after):
        S = len(spec_visible(kind, start, stop, d["F"]))
        oracle.append((stop - start, S - (stop - start), S, W_after))
    assert oracle == recorded
    assert chunks["cache_len_after_prefill"] == L

    for t, c in enumerate(chunks["decode_calls"]):
        step = decode_step(L + t, W_after)
        assert (step.q, step.kv_len - step.q, step.kv_len, step.chunk_width) == (
            c["q_len"], c["past_len"], c["kv_seq_len"], c["context_window_length"])


# ============================================================================ decode


@FAST
@given(st.integers(0, 10**6), st.integers(1, 5000), st.integers(2, 5000), st.integers(1, 64))
@example(128, 128, 128, 4)
@example(1008, 112, 128, 4)
def test_decode_step(pos, W, T, pw):
    step = decode_step(pos, W)
    assert (step.start, step.stop, step.q, step.write_pos) == (pos, pos + 1, 1, pos)
    assert step.sink_len == 0 and step.window_start == 0
    assert step.kv_len == pos + 1
    assert step.chunk_width == W
    if pos < 20000:
        assert step_visible(step) == list(range(pos + 1))
        W = min(W, T)
        # §5: a decode query always sits at S - 1
        assert int(key_positions(step.kv_len, W, T, pw)[-1]) == pos
    # §6/§8: the decode query's factor is max(1, ln S / ln T) with S = pos + 1
    assert float(logn_scale(pos, T)) == pytest.approx(spec_logn(pos, T), rel=1e-6, abs=1e-6)


# ============================================================================ §6 log-n


@FAST
@given(st.integers(2, 5000), st.lists(st.integers(0, 10**6), min_size=1, max_size=50))
def test_logn_scale_matches_spec(T, idx):
    got = logn_scale(np.array(idx), T)
    assert got.dtype == np.float32
    expected = [spec_logn(i, T) for i in idx]
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=1e-6, atol=1e-6)
    for i, g in zip(idx, got):
        if i + 1 < T:
            assert g == 1.0
        elif i + 1 == T:  # float32(ln T) / ln T: exactly 1 for T in {128, 256, 2048}, within an ulp for others
            assert g == pytest.approx(1.0, abs=2e-7)
        else:  # §6: λ > 1 exactly for tokens with i >= T
            assert g > 1.0


@FAST
@given(st.integers(2, 5000), st.data())
def test_logn_scale_is_one_up_to_T(T, data):
    i = data.draw(st.integers(0, T - 2))
    assert float(logn_scale(i, T)) == 1.0
    # i + 1 = T: float32(ln T) / ln T, exactly 1 for T in {128, 256, 2048} (MESA_SPEC §6), an ulp off for some T
    assert float(logn_scale(T - 1, T)) == pytest.approx(1.0, abs=2e-7)
    assert [float(logn_scale(T - 1, T)) for T in (128, 256, 2048)] == [1.0, 1.0, 1.0]


def test_logn_scale_spec_values():
    for i, value in ((128, 1.001604), (339, 1.201342), (999, 1.423683)):
        assert abs(float(logn_scale(i, 128)) - value) <= 1e-6
        assert abs(spec_logn(i, 128) - value) <= 1e-6
    for T in (128, 256, 2048):  # exactly 1.0 at i + 1 = T
        assert logn_scale(T - 1, T).item() == 1.0
        assert np.all(logn_scale(np.arange(T), T) == np.float32(1.0))
        assert logn_scale(T, T).item() > 1.0


# ============================================================================ method "origin"


@MEDIUM
@given(small_params(max_T=2000), st.integers(1, 3000))
def test_origin_prefill_is_plain_causal_calls(d, L):
    steps = prefill_steps(L, params_of(d), "origin")
    assert [(s.start, s.stop) for s in steps] == [(a, min(a + mesa.FULL_PREFILL_CHUNK, L))
                                                  for a in range(0, L, mesa.FULL_PREFILL_CHUNK)]
    for s in steps:  # each call sees every earlier token and itself
        assert (s.sink_len, s.window_start) == (0, 0)
        assert s.kv_len == s.stop and step_visible(s) == list(range(s.stop))


@FEW
@given(st.integers(2, 1500))
@example(2)
@example(1500)
def test_origin_params_are_plain_rope(max_len):
    p = origin_params(max_len)
    for S in range(1, max_len + 1):
        assert np.array_equal(key_positions(S, p.chunk_width, p.train_length, p.push_width), np.arange(S))
    assert np.all(logn_scale(np.arange(max_len), p.train_length) == np.float32(1.0))
    assert largest_distance(max_len, p, "origin") == max_len - 1
    assert np.array_equal(max_distance(np.arange(1, max_len + 1), p.chunk_width, p.train_length,
                                       p.push_width), np.arange(max_len))
    # a prompt of any length up to max_len runs as full-attention calls under the origin plan
    assert [(s.start, s.stop, s.kv_len) for s in prefill_steps(max_len, p, "origin")][-1][1:] == (max_len, max_len)


# ============================================================================ RoPE tables


def hf_cos_sin(n: int, head_dim: int, theta: float, factor: float):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kwargs = dict(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=2,
                  head_dim=head_dim, max_position_embeddings=max(n, 2), rope_theta=theta)
    if factor != 1.0:
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    config = transformers.LlamaConfig(**kwargs)
    rope = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rope(x, torch.arange(n)[None, :])
    cos, sin = cos[0].numpy(), sin[0].numpy()
    half = head_dim // 2
    assert np.array_equal(cos[:, :half], cos[:, half:])  # HF duplicates the halves
    return cos[:, :half], sin[:, :half]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([2, 8, 16, 32, 64, 80, 96, 128, 256]),
       st.sampled_from([10000.0, 500000.0, 1000000.0, 10.0]),
       st.sampled_from([1.0, 2.0, 4.0, 8.0]),
       st.integers(1, 4096))
@example(64, 10000.0, 1.0, 4096)
@example(96, 10000.0, 1.0, 4096)  # a numpy float32 pow was one ulp off HF's here -> 7.6e-6
@example(96, 500000.0, 1.0, 4096)  # and here -> 1.9e-6
@example(128, 1000000.0, 1.0, 16384)
@example(128, 500000.0, 1.0, 4096)
@example(64, 10000.0, 2.0, 4096)
@example(128, 500000.0, 2.0, 8192)
def test_rope_tables_match_hf(head_dim, theta, factor, n):
    cos, sin = (t.numpy() for t in rope_tables(n, RopeConfig(head_dim=head_dim, rope_theta=theta, linear_factor=factor)))
    assert cos.shape == (n, head_dim // 2) and sin.shape == (n, head_dim // 2)
    assert cos.dtype == np.float32 and sin.dtype == np.float32
    hcos, hsin = hf_cos_sin(n, head_dim, theta, factor)
    np.testing.assert_allclose(cos, hcos, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, hsin, rtol=0, atol=1e-6)
