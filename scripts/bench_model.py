"""Model M and what a step of it costs: the FLOPs of a prefill and the bytes of a decode step.

Model M is a random-weight Llama written with save_pretrained (vocab 32000, hidden 1024, intermediate
2816, 12 layers, 16 heads, 4 KV heads, max_position_embeddings 4096) plus a WordLevel tokenizer (the
onnxruntime-genai model builder insists on one). Every benchmark (bench.py, bench_batch.py,
bench_serve.py) runs it.

FLOPs counted (multiply-add = 2 FLOPs), for a prompt of L tokens:
    linear    = L * layers * 2 * (h*(H*d) + 2*h*(Hkv*d) + (H*d)*h + 3*h*I)     projections + SwiGLU MLP
    lm_head   = 2 * h * vocab                                               logits of the last token only
    attention = layers * 4 * H * d * P                                      QK^T and PV
where P counts (query, key) pairs a query actually sees: L(L+1)/2 for full causal attention and, for the
Mesa schedule, the sum of runtime.mesa.Step.attention_pairs over runtime.mesa.prefill_steps.
Bytes of a decode step (fp32): every weight once, and the K/V of the visible keys.
"""

from __future__ import annotations

from pathlib import Path

MODEL_M = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
               num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
MAX_LEN = 16448  # 16k prompt + 64 generated tokens


def make_model_m(folder: Path) -> Path:
    """Model M with save_pretrained plus a WordLevel tokenizer; reused when present."""
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    import transformers

    from scripts.harness import make_word_tokenizer

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL_M)).save_pretrained(folder)
    make_word_tokenizer(folder, MODEL_M["vocab_size"])
    return folder


def prefill_flops(cfg: dict, length: int, schedule: str, params=None) -> dict:
    """FLOPs of one prefill of `length` tokens under `schedule` ("full" or "mesa"); see the module doc."""
    from runtime import mesa

    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // H
    linear = length * layers * 2 * (h * H * d + 2 * h * Hkv * d + H * d * h + 3 * h * inter)
    pairs = length * (length + 1) // 2 if schedule == "full" else sum(s.attention_pairs for s in mesa.prefill_steps(length, params))
    attention = layers * 4 * H * d * pairs
    lm_head = 2 * h * cfg["vocab_size"]
    return {"linear": linear, "attention": attention, "lm_head": lm_head, "total": linear + attention + lm_head,
            "pairs": pairs}


def decode_bytes(cfg: dict, context: int) -> int:
    """Bytes a decode step must read (fp32): every layer weight and the LM head once, the new token's row of
    the embedding table (not the table), and the K/V of `context` keys."""
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // H
    weights = layers * (h * H * d + 2 * h * Hkv * d + H * d * h + 3 * h * inter + 2 * h) + vocab * h + 2 * h
    return 4 * (weights + layers * 2 * Hkv * d * context)
