"""The engine directory contract: `model.onnx` + `mesa.json` (+ tokenizer files).

The manifest is everything a service needs to drive the step graph without Python: the method and
its parameters, the step inputs/outputs, the cache layout and how it is updated. The exporter writes
it last into a temporary directory that is then renamed, so a directory with a readable manifest
whose files are all present is complete.

The manifest is bound to its graph: mesa.schema.json says what a well-formed manifest is (checked at
load), and model.onnx carries the method, the Mesa parameters, max_len and the sha256 of the contract
fields in its metadata_props (`graph_metadata`), so an edited manifest, or a graph paired with another
export's manifest, is refused instead of silently computing other logits.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime import mesa, methods
from runtime.kv_cache import CacheShape

MANIFEST = "mesa.json"
MODEL_FILE = "model.onnx"
DECODE_MODEL_FILE = "decode.onnx"  # int8-int4 engines: the graph decode steps run (same I/O, int4 weights)
FORMAT = "mesa-engine"
FORMAT_VERSION = 2  # 2: structured cache rules, the generation block, no bos_token_id

# The step graph's I/O (DESIGN.md "The step graph"); shapes use these symbolic names.
STEP_INPUTS = ("input_ids", "k_cache", "v_cache", "sink_len", "window_start", "write_pos", "chunk_width",
               "logits_to_keep")
STEP_OUTPUTS = ("logits", "new_keys", "new_values")
CACHE_LAYOUT = ("layers", "batch", "kv_heads", "max_len", "head_dim")
# Engines with in-place decode (graph_ops/lower_attention.py `inplace` kernel) add these inputs, and per
# layer l the rotated decode caches DECODE_CACHE.format("key" | "value", l) [batch, kv_heads, max_len,
# head_dim], returned as DECODE_PRESENT.format(...) and bound to the same buffers (runtime/decode_cache.py).
DECODE_INPUTS = ("decode_step", "seqlens_k", "total_sequence_length")
DECODE_CACHE = "past_{}_{}"
DECODE_PRESENT = "present_{}_{}"
DECODE_LAYOUT = ("batch", "kv_heads", "max_len", "head_dim")


def decode_io(layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, outputs) an in-place-decode graph has beyond STEP_INPUTS / STEP_OUTPUTS."""
    caches = [(kind, l) for l in range(layers) for kind in ("key", "value")]
    return (DECODE_INPUTS + tuple(DECODE_CACHE.format(*c) for c in caches),
            tuple(DECODE_PRESENT.format(*c) for c in caches))


ROPE_FILE = "rope.npy"  # float32 [2, max_len, head_dim / 2]: the graph's cos, sin tables, for re-rotation
SCHEMA_FILE = Path(__file__).with_name("mesa.schema.json")
# What decides the graph's logits and how it is driven; the rest (source, tokens, passes) only describes it.
CONTRACT_FIELDS = ("format_version", "method", "params", "max_len", "dtype", "opset", "vocab_size",
                   "num_hidden_layers", "num_key_value_heads", "head_dim", "largest_distance", "inputs", "outputs",
                   "cache", "precision", "decode_model")


def cache_contract(m: "Manifest") -> dict:
    """The manifest's `cache` block: the cache layout every step reads (pre-RoPE keys), the rule by
    which a caller writes a step's new rows, and for in-place-decode graphs the per-layer decode
    caches (keys rotated at their Stair-PE positions) with the names of their inputs and outputs."""
    decode = None
    if any(t.name == DECODE_INPUTS[0] for t in m.inputs):  # __post_init__ has made them TensorSpecs
        decode = {"rule": "in_place", "flag": DECODE_INPUTS[0], "past": DECODE_CACHE.format("{kind}", "{layer}"),
                  "present": DECODE_PRESENT.format("{kind}", "{layer}"), "layout": list(DECODE_LAYOUT),
                  "keys": "rotated", "rope_table": ROPE_FILE, "inputs": list(DECODE_INPUTS[1:])}
    return {"layout": list(CACHE_LAYOUT),
            "shape": [m.num_hidden_layers, "batch", m.num_key_value_heads, m.max_len, m.head_dim],
            "keys": "pre_rope",
            "update": {"rule": "write_rows", "outputs": ["new_keys", "new_values"], "inputs": ["k_cache", "v_cache"],
                       "axis": "max_len", "offset": "write_pos"},
            "decode": decode}


def generation_defaults(cfg: dict, source: str) -> dict:
    """The `generation` block from a checkpoint's generation_config.json (or config.json) as a dict:
    its EOS ids and its sampling settings, with transformers' defaults for what it leaves out."""
    eos = cfg.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {"eos_token_ids": [int(t) for t in eos], "do_sample": bool(cfg.get("do_sample", False)),
            "temperature": float(cfg.get("temperature") if cfg.get("temperature") is not None else 1.0),
            "top_k": int(cfg.get("top_k") if cfg.get("top_k") is not None else 50),
            "top_p": float(cfg.get("top_p") if cfg.get("top_p") is not None else 1.0), "source": source}


class ArtifactError(Exception):
    """An engine directory that is missing, incomplete, or of another format version."""


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list  # ints or symbolic names


@dataclass
class Manifest:
    method: str
    params: dict  # MesaParams.as_dict()
    max_len: int
    dtype: str  # fp32 | fp16 | bf16 (weights and activations)
    opset: int
    vocab_size: int
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    largest_distance: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: dict = field(default_factory=dict)  # model name, path, architecture, config hash
    generation: dict = field(default_factory=lambda: generation_defaults({}, "config.json"))
    tokenizer: bool = False
    passes: list[str] = field(default_factory=list)
    target: str = "portable"
    exporter_version: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    cache: dict = field(default_factory=dict)
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8 | int4 | int8-int4 (graph_ops/precision.py)
    decode_model: str | None = None  # DECODE_MODEL_FILE when decode steps run a graph of their own
    method_params: dict = field(default_factory=dict)  # runtime/methods.py parameters; {} for mesa, origin

    def __post_init__(self):
        self.inputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.inputs]
        self.outputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.outputs]
        if not self.cache:
            self.cache = cache_contract(self)

    @property
    def eos_token_ids(self) -> list[int]:
        return self.generation["eos_token_ids"]

    @property
    def cache_shape(self) -> CacheShape:
        return CacheShape(self.num_hidden_layers, self.num_key_value_heads, self.max_len, self.head_dim)

    @property
    def mesa_params(self) -> mesa.MesaParams:
        return mesa.MesaParams(**self.params)

    @property
    def method_object(self) -> methods.Method | None:
        """The runtime.methods.Method of the engine; None for mesa and origin."""
        return methods.method_from_manifest(self.method, self.method_params)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d) -> "Manifest":
        """A manifest checked against mesa.schema.json and MesaParams; ArtifactError names the field at fault."""
        if isinstance(d, dict):  # the version first: another version's fields are not ours to judge
            if d.get("format") != FORMAT:
                raise ArtifactError(f"not a {FORMAT} manifest (format={d.get('format')!r})")
            if d.get("format_version") != FORMAT_VERSION:
                raise ArtifactError(f"engine format version {d.get('format_version')} is not supported by this "
                                    f"runtime (expects {FORMAT_VERSION}); re-export the engine")
        errors = sorted(_validator().iter_errors(d), key=lambda e: list(map(str, e.absolute_path)))
        if errors:
            more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
            raise ArtifactError(_describe(errors[0]) + more)
        m = cls(**d)
        try:
            m.mesa_params
        except mesa.MesaParamError as e:
            raise ArtifactError(f"field params: {e}") from None
        try:
            m.method_object
        except (TypeError, mesa.MesaParamError) as e:
            raise ArtifactError(f"field method_params: {e}") from None
        return m


@functools.cache
def _validator():
    """mesa.schema.json's validator, with JSON integers only (1.0 is not an integer here) and the
    methods this runtime knows (runtime.methods.METHODS, which the file mirrors)."""
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    schema["properties"]["method"]["enum"] = list(methods.METHODS)
    base = jsonschema.validators.validator_for(schema)
    strict = base.TYPE_CHECKER.redefine("integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
    return jsonschema.validators.extend(base, type_checker=strict)(schema)


def _describe(e) -> str:
    """One schema violation as `field: what is wrong`, the field named by its path (params.push_width)."""
    def name(path) -> str:
        return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")

    path = list(e.absolute_path)
    if e.validator == "required":
        missing = next(k for k in e.validator_value if k not in e.instance)
        return f"field {name(path + [missing])} is missing"
    if e.validator == "additionalProperties":
        extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))[0]
        return f"field {name(path + [extra])} is not a manifest field"
    return f"field {name(path) or '(the whole manifest)'}: {e.message}"


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def graph_metadata(m: Manifest) -> dict[str, str]:
    """The metadata_props entries model.onnx carries for its manifest (the exporter writes them, the
    runtime compares them at load): method, params and max_len readable, the contract as a hash."""
    d = asdict(m)
    contract = {k: d[k] for k in CONTRACT_FIELDS}
    if m.method_params:  # only then: engines of mesa and origin keep the hash they were exported with
        contract["method_params"] = m.method_params
    return {"mesa.method": m.method, "mesa.params": json.dumps(d["params"], sort_keys=True),
            "mesa.max_len": str(m.max_len), "mesa.contract_sha256": _sha256_json(contract)}


def metadata_mismatch(found: dict[str, str], m: Manifest) -> str | None:
    """How the graph's metadata (`custom_metadata_map`) disagrees with the manifest, or None."""
    want = graph_metadata(m)
    missing = [k for k in want if k not in found]
    if missing:
        return f"the graph carries no {', '.join(missing)} metadata: exported before graphs were bound to manifests"
    if found["mesa.params"] != want["mesa.params"]:
        try:
            graph = json.loads(found["mesa.params"])
        except ValueError:
            graph = {}
        key = next((k for k in sorted(set(graph) | set(m.params)) if graph.get(k) != m.params.get(k)), "?")
        return f"params.{key} is {graph.get(key)} in the graph, {m.params.get(key)} in the manifest"
    for key in ("method", "max_len"):
        if found[f"mesa.{key}"] != want[f"mesa.{key}"]:
            return f"{key} is {found[f'mesa.{key}']} in the graph, {want[f'mesa.{key}']} in the manifest"
    if found["mesa.contract_sha256"] != want["mesa.contract_sha256"]:
        return f"the manifest's contract fields ({', '.join(CONTRACT_FIELDS)}) are not those the graph was exported for"
    return None


def load_manifest(directory: str | Path) -> Manifest:
    """Read and check an engine directory's manifest; ArtifactError says what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        missing = "is not a directory" if directory.exists() else "does not exist"
        raise ArtifactError(f"engine directory {directory} {missing}")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: not an engine directory, or an export that did not finish")
    try:  # ValueError: not UTF-8, not JSON, an integer too long to parse
        manifest = Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, RecursionError, ArtifactError) as e:
        raise ArtifactError(f"{path} is unreadable: {e}") from None
    for name in (MODEL_FILE, manifest.decode_model):
        if name is not None and not (directory / name).is_file():
            raise ArtifactError(f"{directory} is incomplete: {name} is missing")
    return manifest
