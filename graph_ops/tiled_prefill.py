"""Tiled prefill: the prefill chunks' attention on the Mesa CPU kernel (`--prefill-kernel tiled`).

The `gqa` and `inplace` kernels (lower_attention.py) run a prefill chunk's attention with
com.microsoft::GroupQueryAttention: the rotated visible cache rows as its past, the chunk as its new
keys, its causal rule as the Mesa mask. ORT's CPU implementation materialises the probabilities of every
query head over every visible key and streams them through memory (1 GB per layer for a 4k chunk of
model M). This pass points those nodes at ai.mesa.cpu::TiledPrefillAttention
(runtime/ops/prefill_attention.cpp): the same inputs, attention output only, computed a tile of queries
and a block of keys at a time with an online softmax, each KV head's keys read once for its group.

Pattern: a GroupQueryAttention node without do_rotary whose present_key / present_value outputs nothing
reads (the prefill calls; the in-place decode calls rotate inside GQA and write their presents).
Replacement: ai.mesa.cpu::TiledPrefillAttention on its first seven inputs with its first output.
Check: only the attributes the kernel implements (num_heads, kv_num_heads, scale).
"""

from __future__ import annotations

import onnx_ir as ir

from runtime.custom_ops import DOMAIN

OP = "TiledPrefillAttention"
_KNOWN = {"num_heads", "kv_num_heads", "scale"}


def _is_prefill_gqa(node: ir.Node) -> bool:
    return (node.domain == "com.microsoft" and node.op_type == "GroupQueryAttention"
            and node.attributes.get_int("do_rotary", 0) == 0
            and all(not out.uses() and not out.is_graph_output() for out in node.outputs[1:]))


def _check(node: ir.Node) -> None:
    extra = set(node.attributes) - _KNOWN
    if extra or len(node.inputs) < 7 or any(v is not None for v in node.inputs[7:]):
        raise ValueError(f"{node.name}: TiledPrefillAttention implements GroupQueryAttention's causal prefill with "
                         f"pre-rotated keys only; this node also has {', '.join(sorted(extra)) or 'rotary or mask inputs'}")


def tiled_prefill(model: ir.Model) -> int:
    """Rewrite in place; returns the number of nodes now on the Mesa kernel."""
    found = [node for node in ir.traversal.RecursiveGraphIterator(model.graph) if _is_prefill_gqa(node)]
    for node in found:
        _check(node)
        tiled = ir.Node(DOMAIN, OP, list(node.inputs[:7]), attributes=list(node.attributes.values()),
                        num_outputs=1, name=node.name)
        graph, old = node.graph, node.outputs[0]
        graph.insert_before(node, tiled)
        new = tiled.outputs[0]
        new.shape, new.type = old.shape, old.type
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        new.name = old.name
    if found:
        model.opset_imports[DOMAIN] = 1
    return len(found)
