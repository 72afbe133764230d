"""Before/after benchmark of the graph passes (graph_ops/pipeline.py), plus int4 accuracy.

    python scripts/bench_passes.py                      # 8k prompt, all variants, accuracy; ~30-40 min here
    python scripts/bench_passes.py --length 4096 --repeats 1 --no-accuracy

Benchmark model "M" (scripts/bench.py: random weights, vocab 32000, hidden 1024, intermediate 2816,
12 layers, 16 heads, 4 KV heads, T = max_position_embeddings = 4096, Mesa defaults for T = 4096),
exported once per variant with max_len = length + 64:

| variant | how it is made |
|---|---|
| portable | `export.py --target portable`: no passes, MesaAttention runs its ONNX function body |
| ort-cpu | `export.py --target ort-cpu` (the default): the ort-cpu pipeline |
| ort-cpu-<kernel> | the portable graph + lower_attention[<kernel>] and the same fusion/inline/cleanup passes:
  the attention kernels the ort-cpu pipeline can choose from (attention, gqa, auto) |
| ort-cpu-int4 | `export.py --target ort-cpu --precision int4` |

All variants are timed in this one process, one after the other inside each repeat (so load from other
jobs on the machine hits them alike): prefill seconds of one prompt of --length random tokens through its
Mesa plan (runtime.scheduler.prefill + runtime.backends.OrtStep, logits of the last position only), then
decode ms/token over --decode-tokens greedy steps at that context. Reported: medians over --repeats.

Accuracy (against the fp32 ort-cpu engine): on the 8k run, max |Δlogit| and argmax agreement of the last
prompt position and the decode steps (teacher-forced on the fp32 engine's greedy tokens; also portable vs
ort-cpu, which must agree to float tolerance); on the published fixtures (tests/fixtures/official), max
|Δlogit| against the published logits and greedy agreement; on the trained passkey model
(tests/fixtures/trained), exact-answer accuracy of fp32 vs int4 engines.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



def log(msg: str) -> None:
    print(f"[bench_passes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ engines

def export(model: Path, out: Path, max_len: int, *flags: str) -> Path:
    if (out / "mesa.json").is_file():
        return out
    cmd = [sys.executable, str(ROOT / "export.py"), "--model", str(model), "--max-len", str(max_len),
           "--out", str(out), "--force", *flags]
    log("export: " + " ".join(cmd[2:]))
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def derive_kernel_variant(portable: Path, out: Path, kernel: str) -> Path:
    """The portable graph through the ort-cpu pipeline with another attention kernel."""
    if (out / "mesa.json").is_file():
        return out
    import onnx_ir as ir

    from graph_ops import pipeline
    from runtime import artifact

    model = ir.load(portable / artifact.MODEL_FILE)
    names = []
    for p in [pipeline._lower(kernel), pipeline.FUSE, pipeline.INLINE, pipeline.CLEANUP]:
        p.run(model)
        names.append(p.name)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ir.save(model, tmp / artifact.MODEL_FILE, external_data=artifact.MODEL_FILE + ".data")
    manifest = json.loads((portable / artifact.MANIFEST).read_text())
    manifest.update(passes=names, target="ort-cpu")
    (tmp / artifact.MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class Runner:
    """One engine on ONNX Runtime CPU as it is served: runtime.engine.MesaEngine, stepped by hand."""

    def __init__(self, directory: Path):
        from runtime.engine import MesaEngine

        self.engine = MesaEngine.load(directory, backend="ort-cpu")
        self.manifest = self.engine.manifest

    def prefill(self, ids: np.ndarray, all_logits: bool = False):
        """(seconds, last logits, the open sequence)."""
        seq = self.engine.sequence(ids, all_logits=all_logits)
        t0 = time.perf_counter()
        logits = seq.step()
        return time.perf_counter() - t0, logits, seq

    def decode(self, seq, tokens: list[int]):
        """Feed `tokens` one by one; returns (seconds per step, logits rows)."""
        times, rows = [], []
        for t in tokens:
            seq.append([t])
            t0 = time.perf_counter()
            rows.append(seq.step())
            times.append(time.perf_counter() - t0)
        return times, np.stack(rows)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    return {"max_abs_dlogit": float(np.abs(a - b).max()), "max_abs_logit": float(np.abs(b).max()),
            "argmax_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1)))}


def op_counts(directory: Path) -> dict:
    import onnx

    from runtime import artifact

    model = onnx.load(directory / artifact.MODEL_FILE, load_external_data=False)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------ timing

def timing(engines: dict[str, Path], length: int, decode_tokens: int, repeats: int, reference: str) -> dict:
    vocab = json.loads((next(iter(engines.values())) / "mesa.json").read_text())["vocab_size"]
    ids = np.random.default_rng(length).integers(3, vocab, length, dtype=np.int64)
    runners = {}
    for name, d in engines.items():
        log(f"loading {name}")
        runners[name] = Runner(d)
    res = {name: {"prefill_s": [], "decode_ms": []} for name in engines}
    order = [reference] + [n for n in engines if n != reference]
    last_rows, decode_rows, tokens = {}, {}, None
    for r in range(repeats):
        for name in order:
            run = runners[name]
            seconds, last, seq = run.prefill(ids)
            res[name]["prefill_s"].append(seconds)
            if tokens is None:  # the reference's first run: its greedy continuation, fed to every variant
                tokens, ms, rows = [int(last.argmax())], [], []
                for _ in range(decode_tokens):
                    t, row = run.decode(seq, tokens[-1:])
                    ms += t
                    rows.append(row[0])
                    tokens.append(int(row[0].argmax()))
                tokens, rows = tokens[:decode_tokens], np.stack(rows)
            else:
                ms, rows = run.decode(seq, tokens)
            res[name]["decode_ms"].append(1e3 * statistics.median(ms))
            if r == 0:
                last_rows[name], decode_rows[name] = last, rows
            log(f"repeat {r + 1}/{repeats} {name}: prefill {seconds:.1f} s, "
                f"decode {1e3 * statistics.median(ms):.1f} ms/token")
            seq.cancel()
            gc.collect()
    for name in engines:
        res[name]["prefill_s_median"] = statistics.median(res[name]["prefill_s"])
        res[name]["decode_ms_median"] = statistics.median(res[name]["decode_ms"])
        if name != reference and reference in last_rows:
            n = min(len(decode_rows[name]), len(decode_rows[reference]))
            res[name]["vs_" + reference] = {
                "last_prompt_position": compare(last_rows[name], last_rows[reference]),
                "decode_steps": compare(decode_rows[name][:n], decode_rows[reference][:n]),
            }
    return res


# ------------------------------------------------------------------------------ accuracy

def fixture_accuracy(work: Path) -> dict:
    from scripts.fixtures import load_official, official_cases

    out = {}
    for name in official_cases():
        case = load_official(name)
        flags = case.export_args()
        runs = {}
        for variant, extra in (("fp32", []), ("int4", ["--precision", "int4"])):
            d = export(case.model_dir, work / "fixtures" / f"{name}_{variant}", case.max_len,
                       "--target", "ort-cpu", *flags, *extra)
            run = Runner(d)
            _, _, seq = run.prefill(case.input_ids, all_logits=True)
            _, decode = run.decode(seq, case.fed_tokens)
            prefill = seq.prompt_logits
            seq.cancel()
            runs[variant] = np.concatenate([prefill, decode])
        published = np.concatenate([case.prefill_logits, case.decode_logits])
        out[name] = {"fp32_vs_published": compare(runs["fp32"], published),
                     "int4_vs_published": compare(runs["int4"], published),
                     "int4_vs_fp32": compare(runs["int4"], runs["fp32"])}
        log(f"fixture {name}: fp32 {out[name]['fp32_vs_published']['max_abs_dlogit']:.2e}, int4 "
            f"{out[name]['int4_vs_published']['max_abs_dlogit']:.3f} (argmax agreement "
            f"{out[name]['int4_vs_published']['argmax_agreement']:.2f})")
    return out


def passkey_accuracy(work: Path, lengths=(256, 1024), n: int = 20) -> dict:
    from scripts import fixtures

    trained = fixtures.TRAINED
    if not (trained / "model" / "config.json").is_file():
        return {}
    from runtime.engine import MesaEngine
    from scripts import passkey

    flags = ["--train-length", "256", "--first-chunk", "16", "--first-chunk-cache", "16", "--last-context", "64",
             "--reserve-tokens", "8", "--chunk-width", "256", "--push-width", "16", "--target", "ort-cpu"]
    max_len = max(lengths) + 16
    engines = {}
    for variant, extra in (("fp32", []), ("int4", ["--precision", "int4"])):
        d = export(trained / "model", work / f"trained_{variant}", max_len, *flags, *extra)
        engines[variant] = MesaEngine.load(d)
    task = passkey.Task.load(trained / "task.json")
    cells = passkey.run(engines, task, list(lengths), ["repeat", "random"], n, seed=0, progress=False)
    return {f"{c.engine} {c.mode} L={c.length}": c.row() for c in cells}


# ------------------------------------------------------------------------------ report

def markdown(results: dict) -> str:
    t = results["timing"]
    L = results["length"]
    base = t.get("portable")
    lines = [f"Model M, prompt {L} tokens (Mesa plan), decode at context {L}; {results['repeats']} repeat(s), "
             f"medians; {results['machine']}.", "",
             f"| variant | prefill {L} (s), median | speed-up | min | decode ms/token, median | speed-up | min |",
             "|---|---|---|---|---|---|---|"]
    for name, r in t.items():
        sp = f"{base['prefill_s_median'] / r['prefill_s_median']:.2f}x" if base else ""
        sd = f"{base['decode_ms_median'] / r['decode_ms_median']:.2f}x" if base else ""
        lines.append(f"| {name} | {r['prefill_s_median']:.1f} | {sp} | {min(r['prefill_s']):.1f} | "
                     f"{r['decode_ms_median']:.1f} | {sd} | {min(r['decode_ms']):.1f} |")
    lines += ["", "Logits against the fp32 ort-cpu engine (8k run; decode teacher-forced on its greedy tokens):", "",
              "| variant | last prompt position max abs dlogit | decode steps max abs dlogit | decode argmax agreement |",
              "|---|---|---|---|"]
    for name, r in t.items():
        for key in (k for k in r if k.startswith("vs_")):
            a, b = r[key]["last_prompt_position"], r[key]["decode_steps"]
            lines.append(f"| {name} | {a['max_abs_dlogit']:.3g} | {b['max_abs_dlogit']:.3g} | {b['argmax_agreement']:.2f} |")
    if results.get("fixtures"):
        lines += ["", "Published fixtures (prefill + 16 decode logits):", "",
                  "| case | fp32 ort-cpu max abs dlogit | int4 max abs dlogit | int4 argmax agreement | max abs logit |",
                  "|---|---|---|---|---|"]
        for name, r in results["fixtures"].items():
            lines.append(f"| {name} | {r['fp32_vs_published']['max_abs_dlogit']:.2e} | "
                         f"{r['int4_vs_published']['max_abs_dlogit']:.3f} | {r['int4_vs_published']['argmax_agreement']:.2f} | "
                         f"{r['int4_vs_published']['max_abs_logit']:.2f} |")
    if results.get("passkey"):
        lines += ["", "Trained passkey model, exact 5-digit answers:", "", "| engine, filler, L | accuracy | n |",
                  "|---|---|---|"]
        for key, c in results["passkey"].items():
            lines.append(f"| {key} | {c['accuracy']:.2f} | {c['n']} |")
    return "\n".join(lines)


def machine() -> str:
    import os
    import platform

    import onnxruntime

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/bench_passes.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "bench_out" / "passes"))
    p.add_argument("--model", help="checkpoint folder (default: model M, written under --work)")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="portable,ort-cpu,ort-cpu-int4,ort-cpu-attention,ort-cpu-gqa")
    p.add_argument("--no-accuracy", action="store_true", help="skip the fixture and passkey int4 accuracy runs")
    args = p.parse_args(argv)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)

    from graph_ops.lower_attention import KERNELS
    from scripts.bench_model import make_model_m

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else make_model_m(work / "model_M")
    max_len = args.length + 64
    variants = args.variants.split(",")
    engines: dict[str, Path] = {}
    for v in variants:
        d = work / f"M_{max_len}_{v}"
        if v == "portable":
            engines[v] = export(model, d, max_len, "--target", "portable")
        elif v == "ort-cpu":
            engines[v] = export(model, d, max_len, "--target", "ort-cpu")
        elif v == "ort-cpu-int4":
            engines[v] = export(model, d, max_len, "--target", "ort-cpu", "--precision", "int4")
        elif v.startswith("ort-cpu-") and v[len("ort-cpu-"):] in KERNELS:
            engines[v] = derive_kernel_variant(export(model, work / f"M_{max_len}_portable", max_len,
                                                      "--target", "portable"), d, v[len("ort-cpu-"):])
        else:
            raise SystemExit(f"unknown variant {v}")
    results = {"length": args.length, "repeats": args.repeats, "machine": machine(),
               "engines": {k: {"dir": str(v), "ops": op_counts(v),
                               "passes": json.loads((v / "mesa.json").read_text())["passes"]}
                           for k, v in engines.items()}}
    reference = "ort-cpu" if "ort-cpu" in engines else variants[0]
    results["timing"] = timing(engines, args.length, args.decode_tokens, args.repeats, reference)
    (work / "bench_passes.json").write_text(json.dumps(results, indent=1))
    if not args.no_accuracy:
        results["fixtures"] = fixture_accuracy(work)
        results["passkey"] = passkey_accuracy(work)
    (work / "bench_passes.json").write_text(json.dumps(results, indent=1))
    report = markdown(results)
    (work / "bench_passes.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
