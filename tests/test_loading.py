"""export.loading on tiny random checkpoints written by transformers' own save_pretrained; never online."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from export.loading import (ALIASES, ModelLoadError, check_supported, hub_cache_dir,
                            iter_state_dict, load_config, load_state_dict, resolve_model, rope_config)
from export.model import RopeConfig
from runtime.mesa import MesaParamError, default_params, dynamic_split

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: loading must work offline."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _model(kind: str):
    torch.manual_seed(0)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    extra = {"sliding_window": 64} if kind == "mistral" else {}  # below max_position_embeddings: warned
    return cls[1](cls[0](**TINY, **extra)).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (folder, reference state dict)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for kind in ("llama", "mistral", "qwen2"):
        m = _model(kind)
        m.save_pretrained(root / kind)
        out[kind] = (root / kind, m.state_dict())
    m = _model("llama")
    m.save_pretrained(root / "sharded", max_shard_size="20KB")
    out["sharded"] = (root / "sharded", m.state_dict())
    # transformers 5 writes safetensors even with safe_serialization=False: write the .bin layouts by hand
    sd = m.state_dict()
    for name, shards in (("bin", [sd]), ("bin_sharded", [dict(list(sd.items())[:7]), dict(list(sd.items())[7:])])):
        folder = root / name
        folder.mkdir()
        m.config.save_pretrained(folder)
        if len(shards) == 1:
            torch.save(shards[0], folder / "pytorch_model.bin")
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
                torch.save(shard, folder / fname)
                weight_map.update(dict.fromkeys(shard, fname))
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        out[name] = (folder, sd)
    return out


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "sharded", "bin", "bin_sharded"])
def test_load_state_dict_matches_model(ckpts, name):
    folder, ref = ckpts[name]
    path, alias = resolve_model(folder)
    assert path == folder.resolve() and alias is None
    assert not check_supported(load_config(path)) or name == "mistral"
    _same(load_state_dict(path), ref)


def test_sharded_checkpoint_really_is_sharded_and_streams(ckpts):
    folder, ref = ckpts["sharded"]
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    names = [n for n, _ in iter_state_dict(folder)]
    assert sorted(names) == sorted(ref) and len(names) == len(set(names))


def test_dtype_cast(ckpts, tmp_path):
    folder, ref = ckpts["llama"]
    half = load_state_dict(folder, dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in half.values())
    _model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in load_state_dict(tmp_path, dtype=None).values())
    assert all(t.dtype == torch.float32 for t in load_state_dict(tmp_path).values())


def test_mistral_sliding_window_warns(ckpts):
    warnings = check_supported(load_config(ckpts["mistral"][0]))
    assert len(warnings) == 1 and "sliding_window" in warnings[0]


# --------------------------------------------------------------------------------------- errors

def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no checkpoint folder at .*nope"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no checkpoint folder"):
        load_state_dict(tmp_path / "nope")


def test_folder_without_config_or_weights(ckpts, tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(tmp_path)
    shutil.copy(ckpts["llama"][0] / "config.json", tmp_path)
    assert resolve_model(tmp_path)[0] == tmp_path.resolve()
    with pytest.raises(ModelLoadError) as e:
        load_state_dict(tmp_path)
    assert str(tmp_path) in str(e.value) and "model.safetensors" in str(e.value) and "pytorch_model.bin" in str(e.value)


def test_missing_shard(ckpts, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(ckpts["sharded"][0], folder)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="missing .*model-00002"):
        load_state_dict(folder)


def test_corrupt_weights(ckpts, tmp_path):
    shutil.copy(ckpts["llama"][0] / "config.json", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_state_dict(tmp_path)


def test_unsupported_architecture(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_config(tmp_path)


def test_unsupported_rope_scaling():
    cfg = transformers.LlamaConfig(**TINY, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ModelLoadError, match="'dynamic'.*default, linear"):
        check_supported(cfg)


def test_unknown_name_lists_aliases(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        resolve_model("llama9-70b")
    assert "unknown model 'llama9-70b'" in str(e.value) and all(a in str(e.value) for a in ALIASES)


@pytest.mark.parametrize("var", ["HF_HUB_CACHE", "HF_HOME"])
def test_alias_not_in_cache(tmp_path, monkeypatch, var):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cache = tmp_path if var == "HF_HUB_CACHE" else tmp_path / "hub"
    assert hub_cache_dir() == cache
    with pytest.raises(ModelLoadError) as e:
        resolve_model("llama2-7b")
    msg = str(e.value)
    assert str(cache) in msg and "huggingface-cli download meta-llama/Llama-2-7b-hf" in msg
    with pytest.raises(ModelLoadError) as e:  # an HF id: both places named
        resolve_model("someorg/some-model")
    assert str(tmp_path / "someorg" / "some-model") in str(e.value) and str(cache) in str(e.value)


def _fake_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hf_id_and_alias_found_in_local_cache(ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    snap = _fake_cache(tmp_path / "cache", "someorg/tiny-llama", ckpts["sharded"][0])
    path, alias = resolve_model("someorg/tiny-llama")
    assert path.resolve() == snap.resolve() and alias is None
    _same(load_state_dict(path), ckpts["sharded"][1])

    alias_id = ALIASES["tinyllama-1.1b"].hf_id
    snap = _fake_cache(tmp_path / "cache", alias_id, ckpts["llama"][0])
    path, alias = resolve_model("tinyllama-1.1b")
    assert path.resolve() == snap.resolve() and alias is ALIASES["tinyllama-1.1b"]
    assert resolve_model(alias_id) == (path, None)


# ------------------------------------------------------------------------------ params and rope

def test_alias_presets():
    chat = default_params(4096, ALIASES["llama2-7b-chat"].params, {})
    assert chat.as_dict() == dict(train_length=2048, first_chunk=100, first_chunk_cache=100, last_context=800,
                                  reserve_tokens=50, push_width=20, chunk_width=2048)
    for name, alias in ALIASES.items():
        assert alias.hf_id.count("/") == 1 and alias.source, name
        p = default_params(1, alias.params, {})  # the preset's T wins
        assert p.train_length == alias.params["train_length"] and p.chunk_width == p.train_length
        for L in (p.train_length, 3 * p.train_length + 777, 12 * p.train_length):
            assert dynamic_split(L, p) + p.first_chunk < p.train_length


@pytest.mark.parametrize("T", [16, 64, 128, 1000, 2048, 4096, 32768])
def test_default_rule_keeps_dynamic_split_valid(T):
    p = default_params(T, None, {})
    assert p.train_length == T and p.chunk_width == T and p.first_chunk_cache == p.first_chunk
    if T >= 2048:  # the paper's general setting, unscaled
        assert (p.first_chunk, p.last_context, p.reserve_tokens, p.push_width) == (100, 512, 50, 50)
    for L in range(T - p.reserve_tokens, 10 * T, max(1, T // 7)):  # the prompts DynamicSplit splits
        W = dynamic_split(L, p)
        assert 0 < W and W + p.first_chunk < T


def test_overrides_win():
    cfg = 4096
    p = default_params(cfg, ALIASES["llama2-7b-chat"].params, {"push_width": 7, "last_context": None, "train_length": 4096})
    assert (p.push_width, p.last_context, p.train_length, p.chunk_width) == (7, 800, 4096, 4096)
    assert default_params(cfg, None, {"train_length": 128}).first_chunk == 6  # rule follows the overridden T
    with pytest.raises(MesaParamError, match="unknown Mesa parameter"):
        default_params(cfg, None, {"chunk": 3})
    with pytest.raises(MesaParamError, match="must stay below"):
        default_params(cfg, None, {"train_length": 200, "first_chunk": 100, "first_chunk_cache": 100})


def test_rope_config_new_and_old_style(ckpts, tmp_path):
    assert rope_config(load_config(ckpts["llama"][0])) == RopeConfig(head_dim=4, rope_theta=10000.0)
    cfg = transformers.LlamaConfig(**{**TINY, "head_dim": 8}, rope_scaling={"rope_type": "linear", "factor": 4.0},
                                   rope_theta=500000.0)
    assert rope_config(cfg) == RopeConfig(head_dim=8, rope_theta=500000.0, linear_factor=4.0)
    # a transformers 4.x config.json (rope_theta + rope_scaling with "type"), read by transformers 5
    d = json.loads((ckpts["llama"][0] / "config.json").read_text())
    d.pop("rope_parameters", None)
    d.update(rope_theta=250000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert rope_config(load_config(tmp_path)) == RopeConfig(head_dim=4, rope_theta=250000.0, linear_factor=2.0)
    # a transformers 4.x config object (attributes, no rope_parameters)
    old = SimpleNamespace(hidden_size=64, num_attention_heads=4, rope_theta=1e6, rope_scaling=None)
    assert rope_config(old) == RopeConfig(head_dim=16, rope_theta=1e6)
