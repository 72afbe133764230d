"""Export at scale: a random-weight checkpoint with a real model's config, timed, with peak RSS.

    python -m scripts.export_scale --config tinyllama-1.1b --max-len 8192 [--work DIR] [--precision fp32]

Writes the checkpoint with `save_pretrained` (once; reused from --work), then runs export.api.export_engine
in a fresh (spawned) process and reports its wall time and peak resident memory (the child's ru_maxrss).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

# Public configs of the checkpoints the aliases name (only the shapes matter for export cost).
CONFIGS = {
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
}


def write_checkpoint(name: str, folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    config = transformers.LlamaConfig(**CONFIGS[name], rms_norm_eps=1e-5, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder)
    return folder


def export_child(ckpt: str, out: str, options: dict) -> None:
    """The export, alone in its process (so ru_maxrss of the children is the export's own peak)."""
    from export import api

    try:
        api.export_engine(ckpt, out, **options)
    except api.errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.export_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tinyllama-1.1b")
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8", "int4", "int8-int4"))
    p.add_argument("--work", default="/tmp/mesa-export-scale", help="folder for the checkpoint and the engine")
    p.add_argument("--no-verify", action="store_true")
    args = p.parse_args(argv)
    work = Path(args.work)
    t = time.perf_counter()
    ckpt = write_checkpoint(args.config, work / f"{args.config}-random")
    print(f"checkpoint: {ckpt} ({time.perf_counter() - t:.0f} s)")
    options = dict(max_len=args.max_len, force=True, precision=args.precision, verify=not args.no_verify)
    child = multiprocessing.get_context("spawn").Process(
        target=export_child, args=(str(ckpt), str(work / f"{args.config}-engine"), options))
    t = time.perf_counter()
    child.start()
    child.join()
    code = child.exitcode
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
    print(f"export of {args.config} (weights {weights:.2f} GiB on disk, max_len {args.max_len}, {args.precision}): "
          f"exit {code}, wall {wall:.0f} s, peak RSS {peak:.2f} GiB ({peak / weights:.2f}x the weights)")
    return code


if __name__ == "__main__":
    sys.exit(main())
