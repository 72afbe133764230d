"""Trace the reference decoder to the ONNX step graph and write an engine directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from export import loading
from export.model import MesaDecoder, ModelArgs
from graph_ops import mesa_op, methods_op
from runtime import artifact, mesa, methods
from runtime.kv_cache import CacheShape

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPORTER_VERSION = "0.1.0"
# Weights above this go to external data (protobuf's 2 GB limit, with margin).
EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass
class LoadedModel:
    model: MesaDecoder
    config: object  # transformers PretrainedConfig
    path: Path
    alias: loading.Alias | None
    params: mesa.MesaParams
    method: str
    max_len: int
    dtype: str
    method_obj: methods.Method | None = None  # runtime/methods.py's; None for mesa and origin

    @property
    def cache_shape(self) -> CacheShape:
        a = self.model.args
        return CacheShape(a.num_hidden_layers, a.num_key_value_heads, self.max_len, a.head_dim)


def build_model(path: Path, config, params: mesa.MesaParams, method: str, max_len: int, dtype: str,
                alias: loading.Alias | None = None, method_obj: methods.Method | None = None) -> LoadedModel:
    """Build MesaDecoder on the meta device and assign the checkpoint's tensors: one copy in memory.
    The checkpoint's names and shapes are checked against the model first, from the file headers, so a
    mismatch is one ModelLoadError before any tensor data is read."""
    rope = loading.rope_config(config)
    if isinstance(method_obj, methods.YaRN):
        rope = dataclasses.replace(rope, yarn=method_obj)
    args = ModelArgs.from_hf_config(config, rope)
    g = mesa.graph_params(params, method, max_len)
    with torch.device("meta"):
        model = MesaDecoder(args, max_len, g.train_length, g.push_width, method_obj)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loading.check_tensors(path, expected, loading.tensor_shapes(path))
    model.reset_rope_tables()
    model.load_hf_state_dict(loading.load_state_dict(path, dtype=DTYPES[dtype]))
    return LoadedModel(model.eval(), config, path, alias, params, method, max_len, dtype, method_obj)


def example_inputs(lm: LoadedModel, q: int = 5):
    a = lm.model.args
    cache = torch.zeros(a.num_hidden_layers, 1, a.num_key_value_heads, lm.max_len, a.head_dim,
                        dtype=DTYPES[lm.dtype])
    scalar = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return (torch.zeros(1, q, dtype=torch.int64), cache, cache.clone(), scalar(0), scalar(0), scalar(0),
            scalar(lm.params.chunk_width), scalar(1))


def trace(lm: LoadedModel) -> ir.Model:
    """torch.onnx (dynamo) export: attention becomes ai.mesa::MesaAttention with its function body."""
    batch = torch.export.Dim("batch", max=1024)
    q = torch.export.Dim("q", max=lm.max_len)
    dynamic = ({0: batch, 1: q}, {1: batch}, {1: batch}, None, None, None, None, None)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            lm.model, example_inputs(lm), dynamo=True, opset_version=mesa_op.OPSET,
            custom_translation_table={torch.ops.mesa.attention.default: mesa_op.mesa_attention_translation,
                                      torch.ops.mesa.method_attention.default:
                                          methods_op.method_attention_translation},
            input_names=list(artifact.STEP_INPUTS), output_names=list(artifact.STEP_OUTPUTS),
            dynamic_shapes=dynamic, optimize=True, verbose=False,
        )
    model = program.model
    own = lm.method if lm.method in methods_op.OPS else None
    fn = ir.serde.deserialize_function(methods_op.function_proto(own) if own else mesa_op.function_proto())
    model.functions[fn.identifier()] = fn
    model.graph.outputs[0].shape = ir.Shape(["batch", "logits_to_keep", lm.model.args.vocab_size])
    return model


def tensor_specs(values) -> list[artifact.TensorSpec]:
    specs = []
    for v in values:
        dims = [d if isinstance(d, int) else str(d) for d in v.shape]
        specs.append(artifact.TensorSpec(v.name, v.dtype.numpy().name, dims))
    return specs


def config_hash(path: Path) -> str:
    return hashlib.sha256((path / "config.json").read_bytes()).hexdigest()


def make_manifest(lm: LoadedModel, model: ir.Model, source_name: str, passes: list[str], target: str,
                  precision: str = "fp32", decode_graph: ir.Model | None = None) -> artifact.Manifest:
    """The manifest of `model`, which it also binds to the model: `artifact.graph_metadata` goes into
    model.metadata_props, so the saved graph refuses any other manifest at load."""
    a, cfg = lm.model.args, lm.config
    manifest = artifact.Manifest(
        method=lm.method, params=lm.params.as_dict(), max_len=lm.max_len, dtype=lm.dtype,
        opset=mesa_op.OPSET, vocab_size=a.vocab_size, num_hidden_layers=a.num_hidden_layers,
        num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim,
        largest_distance=(mesa.largest_distance(lm.max_len, lm.params, lm.method) if lm.method_obj is None
                          else lm.method_obj.largest_distance(lm.max_len)),
        method_params={} if lm.method_obj is None else lm.method_obj.as_dict(),
        inputs=tensor_specs(model.graph.inputs), outputs=tensor_specs(model.graph.outputs),
        source={"model": source_name, "path": str(lm.path), "architecture": cfg.architectures[0],
                "config_sha256": config_hash(lm.path)},
        generation=generation_block(lm.path, cfg),
        tokenizer=(lm.path / "tokenizer.json").is_file() or (lm.path / "tokenizer.model").is_file(),
        passes=passes, target=target, exporter_version=EXPORTER_VERSION, precision=precision,
        decode_model=None if decode_graph is None else artifact.DECODE_MODEL_FILE,
    )
    model.metadata_props.update(artifact.graph_metadata(manifest))
    if decode_graph is not None:
        decode_graph.metadata_props.update(artifact.graph_metadata(manifest))
    return manifest


def generation_block(path: Path, cfg) -> dict:
    """The manifest's generation defaults: generation_config.json where the checkpoint has one (what
    transformers' generate() reads), else config.json's eos_token_id."""
    file, gen, source = path / "generation_config.json", {}, "config.json"
    if file.is_file():
        try:
            gen, source = json.loads(file.read_text(encoding="utf-8")), file.name
        except ValueError as e:
            raise loading.ModelLoadError(f"{file} is not JSON: {e}") from None
    gen.setdefault("eos_token_id", getattr(cfg, "eos_token_id", None))  # transformers falls back to config's
    return artifact.generation_defaults(gen, source)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt")


def save_model(model: ir.Model, directory: Path, name: str = artifact.MODEL_FILE) -> None:
    """Weights above EXTERNAL_DATA_BYTES go to one external file, streamed tensor by tensor (no
    second in-memory copy, no 2 GB protobuf limit)."""
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = name + ".data" if weights > EXTERNAL_DATA_BYTES else None
    ir.save(model, directory / name, external_data=external)


def write_engine(directory: Path, model: ir.Model, source: Path, decode_graph: ir.Model | None = None) -> None:
    """Write the model (and the decode graph of int8-int4) and the source's tokenizer files into
    `directory` (the manifest comes later)."""
    save_model(model, directory)
    if decode_graph is not None:
        save_model(decode_graph, directory, artifact.DECODE_MODEL_FILE)
    write_rope_tables(directory, model)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)


def write_rope_tables(directory: Path, model: ir.Model) -> None:
    """The graph's own cos/sin tables, for the runtime's re-rotation of the decode cache
    (runtime/decode_cache.py): recomputing them in numpy differs from HF's float32 tables. Half-precision
    graphs hold them cast (and folded under other names): those are the ones the in-place decode kernel
    rotates with, so they are the ones saved."""
    tables = _rope_tables(model)
    if tables is not None:  # None: methods with an op of their own rotate in the graph
        np.save(directory / artifact.ROPE_FILE, np.stack([t.const_value.numpy() for t in tables]).astype(np.float32))


def _rope_tables(model: ir.Model) -> tuple[ir.Value, ir.Value] | None:
    if "rope_cos" in model.graph.initializers:
        return model.graph.initializers["rope_cos"], model.graph.initializers["rope_sin"]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):  # the in-place decode attention's cos, sin
        if node.op_type in ("GroupQueryAttention", "GroupedDecodeAttention") and node.attributes.get_int("do_rotary", 0):
            cos, sin = node.inputs[7], node.inputs[8]
            if cos.const_value is not None and sin.const_value is not None:
                return cos, sin
    return None


def write_manifest(directory: Path, manifest: artifact.Manifest) -> None:
    (directory / artifact.MANIFEST).write_text(manifest.to_json())
