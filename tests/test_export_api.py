"""export.api.export_engine: the exporter as a library function (returns the manifest, raises typed errors)."""

from __future__ import annotations

import pytest

from export import api, loading, preflight
from runtime import artifact, mesa
from tests.conftest import MESA_T64, tiny_checkpoint

MAX_LEN = 80


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama")


def test_returns_the_manifest_it_writes(tiny, tmp_path, capsys):
    out = tmp_path / "engine"
    manifest = api.export_engine(tiny, out, max_len=MAX_LEN, params=MESA_T64, verify=False, progress=False)
    assert isinstance(manifest, artifact.Manifest)
    assert manifest.max_len == MAX_LEN and manifest.method == "mesa" and manifest.target == "ort-cpu"
    assert manifest.params == MESA_T64 and manifest.dtype == "fp32"
    assert artifact.load_manifest(out) == manifest
    assert (out / artifact.MODEL_FILE).is_file()
    assert capsys.readouterr().out == ""  # a library prints no summary
    again = api.export_engine(tiny, out, max_len=MAX_LEN, method="origin", force=True, verify=False, progress=False)
    assert again.method == "origin" and artifact.load_manifest(out).method == "origin"


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(model="/nonexistent/checkpoint"), loading.ModelLoadError, "/nonexistent/checkpoint"),
    (dict(params={"bogus": 1}), mesa.MesaParamError, "bogus"),
    (dict(max_len=0), mesa.MesaParamError, "above zero"),
    (dict(params={**MESA_T64, "first_chunk": 90}), mesa.MesaParamError, "train_length"),
    (dict(target="gpu"), preflight.Refused, "target 'gpu'"),
    (dict(precision="int2"), preflight.Refused, "precision 'int2'"),
    (dict(precision="int8", target="tensorrt"), preflight.Refused, "precision int8 is for target ort-cpu"),
    (dict(max_len=10**9), preflight.Refused, "largest --max-len"),
    (dict(int4_block_size=64), preflight.Refused, "for precision int4 or int8-int4, not fp32"),
    (dict(precision="int4", int4_block_size=128.0), preflight.Refused, "int4 block size 128.0 is not one of"),
    (dict(precision="int8-int4", int4_block_size=True), preflight.Refused, "int4 block size True"),
])
def test_failures_raise_typed_errors_and_write_nothing(tiny, tmp_path, kwargs, error, fragment):
    out = tmp_path / "engine"
    options = dict(model=tiny, max_len=MAX_LEN, params=MESA_T64, verify=False, progress=False) | kwargs
    with pytest.raises(error, match=fragment) as e:
        api.export_engine(options.pop("model"), out, **options)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert e.value.export_written is False


def test_an_existing_directory_is_refused_without_force(tiny, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for force in (False, True):  # --force replaces only an engine or an empty directory
        with pytest.raises(preflight.Refused):
            api.export_engine(tiny, out, max_len=MAX_LEN, params=MESA_T64, force=force, verify=False, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_the_api_knows_the_pipeline_targets():
    from graph_ops import pipeline, precision

    assert api.TARGETS == pipeline.TARGETS
    assert api.PRECISIONS == precision.PRECISIONS
    assert api.DECODE_KERNELS == pipeline.DECODE_KERNELS and api.PREFILL_KERNELS == pipeline.PREFILL_KERNELS
    assert (api.INT4_BLOCK_SIZES, api.INT4_BLOCK_SIZE) == (precision.INT4_BLOCK_SIZES, precision.INT4_BLOCK_SIZE)


def test_manifest_contract_blocks(tiny, tmp_path):
    """The generation block comes from the checkpoint's generation_config.json (transformers' defaults
    for what it leaves out); the cache block names the update rule and the in-place decode caches."""
    import json
    import shutil

    ckpt = shutil.copytree(tiny, tmp_path / "sampling")
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 5]}))
    m = api.export_engine(ckpt, tmp_path / "e", max_len=MAX_LEN, params=MESA_T64, verify=False, progress=False)
    assert m.generation == {"eos_token_ids": [2, 5], "do_sample": True, "temperature": 0.6, "top_k": 50,
                            "top_p": 0.9, "source": "generation_config.json"}
    assert m.eos_token_ids == [2, 5]
    assert m.cache["update"] == {"rule": "write_rows", "outputs": ["new_keys", "new_values"],
                                 "inputs": ["k_cache", "v_cache"], "axis": "max_len", "offset": "write_pos"}
    decode = m.cache["decode"]
    names = {t.name for t in m.inputs} | {t.name for t in m.outputs}
    assert decode["rule"] == "in_place" and (tmp_path / "e" / decode["rope_table"]).is_file()
    for layer in range(2):
        for kind in ("key", "value"):
            assert {decode["past"].format(kind=kind, layer=layer), decode["present"].format(kind=kind, layer=layer)} <= names
    assert set(decode["inputs"]) | {decode["flag"]} <= names

    (ckpt / "generation_config.json").unlink()  # none: config.json's eos_token_id, no sampling
    m = api.export_engine(ckpt, tmp_path / "e", max_len=MAX_LEN, params=MESA_T64, target="portable", force=True,
                          verify=False, progress=False)
    assert m.generation["source"] == "config.json" and m.generation["do_sample"] is False
    assert m.cache["decode"] is None


def test_server_sampling_defaults_follow_the_checkpoint():
    from runtime.serve_service import sampling_defaults

    sampling = {"eos_token_ids": [2], "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.9,
                "source": "generation_config.json"}
    assert sampling_defaults(sampling) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert sampling_defaults({**sampling, "do_sample": False}) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
