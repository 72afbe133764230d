"""The engine directory contract: `model.onnx` + `mesa.json` (+ tokenizer files).

The manifest is everything a service needs to drive the step graph without Python: the method and
its parameters, the step inputs/outputs, the cache layout and how it is updated. The exporter writes
it last into a temporary directory that is then renamed, so a directory with a readable manifest
whose files are all present is complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime import mesa

MANIFEST = "mesa.json"
MODEL_FILE = "model.onnx"
FORMAT = "mesa-engine"
FORMAT_VERSION = 1

# The step graph's I/O (DESIGN.md "The step graph"); shapes use these symbolic names.
STEP_INPUTS = ("input_ids", "k_cache", "v_cache", "sink_len", "window_start", "write_pos", "chunk_width",
               "logits_to_keep")
STEP_OUTPUTS = ("logits", "new_keys", "new_values")
CACHE_LAYOUT = ("layers", "batch", "kv_heads", "max_len", "head_dim")


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
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    tokenizer: bool = False
    passes: list[str] = field(default_factory=list)
    target: str = "portable"
    exporter_version: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    cache: dict = field(default_factory=dict)

    def __post_init__(self):
        self.inputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.inputs]
        self.outputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.outputs]
        if not self.cache:
            self.cache = {
                "layout": list(CACHE_LAYOUT),
                "shape": [self.num_hidden_layers, "batch", self.num_key_value_heads, self.max_len, self.head_dim],
                "keys": "stored before RoPE",
                "update": "the graph returns new_keys/new_values [layers, batch, kv_heads, q, head_dim]; "
                          "the caller writes them at [write_pos, write_pos + q) of its cache",
            }

    @property
    def mesa_params(self) -> mesa.MesaParams:
        return mesa.MesaParams(**self.params)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        if d.get("format") != FORMAT:
            raise ArtifactError(f"not a {FORMAT} manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"engine format version {d.get('format_version')} is not supported by this "
                                f"runtime (expects {FORMAT_VERSION}); re-export the engine")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def load_manifest(directory: str | Path) -> Manifest:
    """Read and check an engine directory's manifest; ArtifactError says what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"engine directory {directory} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: not an engine directory, or an export that did not finish")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ArtifactError(f"{path} is unreadable: {e}") from None
    if not (directory / MODEL_FILE).is_file():
        raise ArtifactError(f"{directory} is incomplete: {MODEL_FILE} is missing")
    return manifest
