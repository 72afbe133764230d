"""What an export checks before any heavy work: that --out is safe to write, and that the export can finish.

Everything here is stdlib only (no torch), so a refusal costs milliseconds and touches nothing.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from export import commit
from runtime import artifact

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class Refused(Exception):
    """An export that would destroy what it did not write, or could not finish; str() says which and why."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _guarded(checkpoint: Path) -> list[tuple[str, Path, bool]]:
    """(what, path, refuse inside it too). Inside the current or home directory is where engines go;
    the checkpoint folder is not (and may be a Hugging Face cache snapshot)."""
    places = [("the checkpoint folder", Path(checkpoint).resolve(), True), ("the current directory", Path.cwd(), False)]
    try:
        places.append(("the home directory", Path.home().resolve(), False))
    except RuntimeError:  # no HOME and no passwd entry
        pass
    return places


def check_out(out: Path, force: bool, checkpoint: Path) -> None:
    """Refuse an --out (already resolved) that is, holds or sits in a folder the export must not replace,
    a non-directory, or an existing directory --force may not replace (only engines and empty ones)."""
    for what, place, inside in _guarded(checkpoint):
        if out == place:
            raise Refused(f"--out {out} is {what}; an engine needs a directory of its own (nothing touched)")
        if out in place.parents:
            raise Refused(f"--out {out} contains {what} {place}; refusing to replace it (nothing touched)")
        if inside and place in out.parents:
            raise Refused(f"--out {out} is inside {what} {place}; write the engine beside it (nothing touched)")
    if os.path.lexists(out) and not out.is_dir():
        raise Refused(f"--out {out} exists and is not a directory; it is not replaced, even with --force "
                      "(nothing touched)")
    if out.is_dir():
        if not force:
            raise Refused(f"{out} exists; pass --force to replace it")
        if not commit.replaceable(out):
            raise Refused(f"--force replaces only an engine directory (with a {artifact.MANIFEST} of format "
                          f"'{artifact.FORMAT}') or an empty one, and {out} is neither; nothing touched: remove "
                          "it yourself or choose another --out")


def _existing_ancestor(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_disk(out: Path, need: int) -> None:
    """Refuse when --out's parent cannot be created or written, or has less than `need` bytes free."""
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir():
        raise Refused(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise Refused(f"cannot write {out}: {parent} is not writable")
    free = shutil.disk_usage(parent).free
    if need > free:
        raise Refused(f"the engine needs about {_gib(need)} in {parent} (weights and RoPE tables) but only "
                      f"{_gib(free)} are free there")


def engine_bytes(shapes: dict[str, tuple], dtype: str, max_len: int, head_dim: int) -> int:
    """The engine's size: every checkpoint tensor at the export dtype, plus the float32 cos/sin tables."""
    return sum(math.prod(s) for s in shapes.values()) * DTYPE_BYTES[dtype] + 2 * max_len * (head_dim // 2) * 4


def check_memory(max_len: int, head_dim: int, layers: int, kv_heads: int, dtype: str) -> None:
    """Refuse a --max-len whose RoPE tables (cos + sin, float32) and example KV cache (keys + values,
    batch 1: the trace's inputs) alone exceed this machine's memory; the export would die after minutes."""
    per_token = 4 * head_dim + 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if max_len * per_token > memory:
        raise Refused(f"--max-len {max_len} needs about {_gib(max_len * per_token)} of memory for the RoPE tables "
                      f"and the KV cache the export traces with, and this machine has {_gib(memory)}: the largest "
                      f"--max-len it can export is about {memory // per_token}")
