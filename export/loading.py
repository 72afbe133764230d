"""Find a Llama-family checkpoint offline, check it is one we can export, and read its weights.

A model is named by an alias (`llama2-7b`), a local folder (config.json + weights) or a Hugging Face id
already in the local HF cache. Nothing here touches the network: the cache is read with
`local_files_only=True`. Every failure a user can cause is a `ModelLoadError` whose text says what was
looked at and what to do; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from runtime import mesa

if TYPE_CHECKING:  # torch is imported where tensors are read, so the CLI can refuse bad input before it loads
    import torch

    from export.model import RopeConfig


class ModelLoadError(Exception):
    """A checkpoint that cannot be found, read or exported; str() is the message for the user."""


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear")

# ------------------------------------------------------------------------------------- aliases

@dataclass(frozen=True)
class Alias:
    """A short model name: its Hugging Face id and its Mesa preset (runtime.mesa.PRESETS, same key)."""
    hf_id: str
    preset: mesa.Preset

    @property
    def params(self) -> dict:
        return self.preset.params

    @property
    def source(self) -> str:
        return self.preset.source


_HF_IDS = {"llama2-7b": "meta-llama/Llama-2-7b-hf", "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
           "vicuna-7b": "lmsys/vicuna-7b-v1.5", "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
           "llama3-8b": "meta-llama/Meta-Llama-3-8B", "mistral-7b": "mistralai/Mistral-7B-v0.1",
           "qwen2-7b": "Qwen/Qwen2-7B"}
ALIASES: dict[str, Alias] = {name: Alias(hf_id, mesa.PRESETS[name]) for name, hf_id in _HF_IDS.items()}


# ------------------------------------------------------------------------------ finding a model

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "name" or "org/name"


def hub_cache_dir() -> Path:
    """The HF hub cache, read from the environment now (huggingface_hub reads it once, at import), in
    huggingface_hub's order: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub."""
    env = os.environ.get
    home = env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def _how_to_get(repo_id: str) -> str:
    gated = " (Meta's repositories are gated: accept the license on the Hub first)" if repo_id.startswith(
        "meta-llama/") else ""
    return (f"To provide it, run `huggingface-cli download {repo_id}` (newer huggingface_hub: `hf download "
            f"{repo_id}`) on a machine with network access{gated} and copy the cache here (or point HF_HUB_CACHE / "
            f"HF_HOME at it), or pass the checkpoint folder itself (config.json + weights).")


def _from_cache(repo_id: str, cache: Path) -> Path | None:
    from huggingface_hub import snapshot_download  # local_files_only: reads refs/ and snapshots/, no request

    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError (not cached), HFValidationError (not an id)
        return None
    return folder if (folder / "config.json").is_file() else None


def _checked_folder(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; pass the folder of a Hugging Face checkpoint "
                             "(config.json + model.safetensors or its shards).")
    return path.resolve()


def resolve_model(name: str | os.PathLike) -> tuple[Path, Alias | None]:
    """The checkpoint folder for `name` (a local folder, an alias or an HF id in the local cache) and the
    alias it came from. An existing folder wins over an alias or id of the same spelling."""
    name = os.fspath(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _checked_folder(path), None
    if path.is_file():
        raise ModelLoadError(f"{path} is a file; pass the folder that holds config.json and the weights.")
    cache = hub_cache_dir()
    alias = ALIASES.get(name)
    if alias is not None:
        folder = _from_cache(alias.hf_id, cache)
        if folder is None:
            raise ModelLoadError(f"model '{name}' is {alias.hf_id}, which is not in the Hugging Face cache "
                                 f"{cache} (looked offline). {_how_to_get(alias.hf_id)}")
        return folder, alias
    if _REPO_ID.match(name):
        folder = _from_cache(name, cache)
        if folder is not None:
            return folder, None
        if "/" in name:  # spelled like an HF id: it may be either, say both places
            raise ModelLoadError(f"model '{name}' not found: no folder {path.resolve()} and no {name} in the "
                                 f"Hugging Face cache {cache} (looked offline). {_how_to_get(name)}")
        raise ModelLoadError(f"unknown model '{name}': not an alias, no folder {path.resolve()}, not in the "
                             f"Hugging Face cache {cache}. Aliases: {', '.join(ALIASES)}; or pass a checkpoint "
                             "folder or the Hugging Face id of a cached model.")
    raise ModelLoadError(f"no checkpoint folder at {path.resolve()}; pass a folder with config.json and weights, "
                         f"an alias ({', '.join(ALIASES)}) or the Hugging Face id of a cached model.")


# ----------------------------------------------------------------------------- config checks

def load_config(path: str | os.PathLike):
    """The checkpoint's transformers config, read offline; ModelLoadError if unreadable or unsupported
    (call `check_supported` again for its warnings)."""
    from transformers import AutoConfig  # lazy: importing transformers costs seconds

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {path}; pass the folder of a Hugging Face checkpoint.")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # bad JSON, unknown model_type, ...
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e
    check_supported(config)
    return config


def _rope(config) -> tuple[str, float, float]:
    """(rope_type, rope_theta, linear factor) from transformers 5's `rope_parameters` or, for older
    configs, the `rope_theta` / `rope_scaling` attributes."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0), **(getattr(config, "rope_scaling", None) or {})}
    if any(isinstance(v, dict) for v in params.values()):  # per-layer-type RoPE (Gemma-style)
        raise ModelLoadError(f"per-layer-type RoPE parameters are not supported: {params}")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"RoPE scaling type '{rope_type}' is not supported; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)} (Mesa-Extrapolation replaces RoPE scaling).")
    theta = float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0))
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return rope_type, theta, factor


def check_supported(config) -> list[str]:
    """Raise ModelLoadError for what we cannot export; return warnings for what the export ignores."""
    archs = list(getattr(config, "architectures", None) or [])
    archs = archs or [_ARCH_BY_MODEL_TYPE.get(getattr(config, "model_type", None), "unknown")]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelLoadError(f"unsupported architecture {', '.join(archs)} (model_type "
                             f"{getattr(config, 'model_type', '?')}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}.")
    _rope(config)
    warnings = []
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        warnings.append(f"sliding_window={window} is ignored: the export attends over everything Mesa's "
                        "schedule makes visible, as the published method does for Llama.")
    return warnings


def rope_config(config) -> RopeConfig:
    from export.model import RopeConfig

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    _, theta, factor = _rope(config)
    return RopeConfig(head_dim=int(head_dim), rope_theta=theta, linear_factor=factor)


# ----------------------------------------------------------------------------------- weights

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The files holding the checkpoint's weights; safetensors preferred over pickled .bin."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"no checkpoint folder at {path.resolve()}.")
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        try:
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"cannot read the shard index {file}: {e!r}") from e
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelLoadError(f"{file} lists shards missing from {path}: {', '.join(missing)}.")
        return [path / s for s in shards]
    raise ModelLoadError(f"no weights in {path}: looked for {', '.join(WEIGHT_FILES)}.")


def _load_bin(file: Path) -> dict:
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def _read_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return SafetensorError, RuntimeError, OSError, ValueError, pickle.UnpicklingError, EOFError


def _safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}; no tensor data read."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= min(os.fstat(f.fileno()).st_size - 8, 1 << 30):
            raise ValueError(f"header length {n} does not fit the file: not a safetensors file")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the checkpoint, from the safetensors headers (pickled .bin files are
    memory-mapped, so their data is not read either)."""
    shapes = {}
    for file in weight_files(path):
        try:
            if file.suffix == ".safetensors":
                shapes.update({k: tuple(v["shape"]) for k, v in _safetensors_header(file).items()})
            else:
                shapes.update({k: tuple(t.shape) for k, t in _load_bin(file).items()})
        except _read_errors() + (KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot read weights from {file}: {e}") from e
    return shapes


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_tensors(path: str | os.PathLike, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    """ModelLoadError naming the first difference between the tensors the config implies (`expected`,
    name -> shape) and the checkpoint's (`found`), with the same name rules as MesaDecoder.load_hf_state_dict:
    rotary buffers ignored, a missing lm_head tied to the embedding."""
    found = {k: tuple(v) for k, v in found.items() if "rotary_emb" not in k}
    if "lm_head.weight" not in found and "model.embed_tokens.weight" in found:
        found["lm_head.weight"] = found["model.embed_tokens.weight"]
    layers = [len({int(m.group(1)) for m in map(_LAYER.match, names) if m}) for names in (expected, found)]
    if layers[0] != layers[1]:  # one line for the count, not one per missing tensor
        raise ModelLoadError(f"config.json of {path} says num_hidden_layers={layers[0]} but its weights hold "
                             f"{layers[1]} layers: the config and the weights are of different models")
    for name, shape in expected.items():
        if name not in found:
            raise ModelLoadError(f"the weights of {path} lack {name} (shape {list(shape)}), which config.json implies")
        if found[name] != tuple(shape):
            raise ModelLoadError(f"{name} in the weights of {path} has shape {list(found[name])}, but config.json "
                                 f"implies {list(shape)}: the config and the weights are of different models")
    extra = [k for k in found if k not in expected]
    if extra:
        raise ModelLoadError(f"the weights of {path} hold {extra[0]} (and {len(extra) - 1} more unknown tensors), "
                             "which config.json does not account for")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def iter_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one shard at a time and one tensor at a time within safetensors, so a 7B
    model can be streamed without holding two copies. Floating tensors are cast to `dtype` (None: as
    stored). Tied weights absent from the files (e.g. lm_head with tie_word_embeddings) are not added."""
    from safetensors import safe_open

    for file in weight_files(path):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, _cast(f.get_tensor(name), dtype)
            else:
                sd = _load_bin(file)
                for name, t in sd.items():
                    yield name, _cast(t, dtype)
                del sd
        except _read_errors() as e:
            raise ModelLoadError(f"cannot read weights from {file}: {e}") from e


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype | str | None = "float32"
                    ) -> dict[str, torch.Tensor]:
    """All weights of the checkpoint in `path` as one dict (floating tensors cast to `dtype`; a string names
    a torch dtype, so the default needs no torch import)."""
    if isinstance(dtype, str):
        import torch

        dtype = getattr(torch, dtype)
    return dict(iter_state_dict(path, dtype))


__all__ = [
    "ALIASES", "Alias", "ModelLoadError", "SUPPORTED_ARCHITECTURES", "SUPPORTED_ROPE_TYPES", "WEIGHT_FILES",
    "check_supported", "check_tensors", "hub_cache_dir", "iter_state_dict", "load_config", "load_state_dict",
    "resolve_model", "rope_config", "tensor_shapes", "weight_files",
]
