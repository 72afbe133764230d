"""Grouped decode: the in-place decode attention on the Mesa CPU kernel (`--decode-kernel grouped`).

The `inplace` kernel (lower_attention.py) decodes with com.microsoft::GroupQueryAttention in the `decode`
branch of each layer's If. ORT's CPU implementation of it computes every query head on its own, so it
reads each KV head's cache once per query head (num_heads / kv_num_heads times a step: 4x for model M).
This pass points those nodes at ai.mesa.cpu::GroupedDecodeAttention (runtime/ops/decode_attention.cpp),
which takes the same inputs, attributes and outputs and reads each KV head once for its whole group.

Pattern: a GroupQueryAttention node with do_rotary = 1 inside an If branch (only the in-place decode
branch rotates inside GQA; the prefill calls pass pre-rotated keys and no do_rotary). Replacement: the
same node, domain ai.mesa.cpu, op GroupedDecodeAttention. Check: the node's attributes are the ones
the kernel implements (rotate-half, the default scale, no softcap or local window).
"""

from __future__ import annotations

import onnx_ir as ir

from runtime.custom_ops import DOMAIN

OP = "GroupedDecodeAttention"
_KNOWN = {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved"}


def _check(node: ir.Node) -> None:
    extra = set(node.attributes) - _KNOWN
    if extra or node.attributes.get_int("rotary_interleaved", 0) != 0:
        raise ValueError(f"{node.name}: GroupedDecodeAttention implements rotate-half RoPE with the default "
                         f"scale only; this node also sets {', '.join(sorted(extra)) or 'rotary_interleaved'}")


def grouped_decode(model: ir.Model) -> int:
    """Rewrite in place; returns the number of nodes now on the Mesa kernel."""
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.graph is model.graph or not (node.domain == "com.microsoft" and node.op_type == "GroupQueryAttention"
                                             and node.attributes.get_int("do_rotary", 0) == 1):
            continue
        _check(node)
        node.domain, node.op_type = DOMAIN, OP
        count += 1
    if count:
        model.opset_imports[DOMAIN] = 1
    return count
