"""Mask fusion: one `ai.mesa::MesaStepPositions` per step, shared by every layer.

After lowering (graph_ops/lower_attention.py) each layer calls MesaStepPositions with the same step
scalars, RoPE tables and attributes; only the `q` input differs, and it is read for its batch and
block length alone. This pass keeps the first call and points every other layer at its outputs, so
the stair positions, their cos/sin rows, the log-n scale and the [q, S] visibility mask are computed
once per step, from the step scalars, inside the graph. S = a + (w - b) + q: the mask covers the
visible keys only, never the max_len cache slots, and no mask tensor crosses the graph boundary.

Key points a merge must satisfy:
* identical cos, sin, scalar inputs (the same values, not equal-looking ones) and attributes;
* the `q` inputs have the same batch and block-length dimensions (equal static sizes or the same
  symbolic names, as the exporter annotates them); otherwise the calls are left alone.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from graph_ops import mesa_op

logger = logging.getLogger(__name__)
STEP_POSITIONS = (mesa_op.DOMAIN, "MesaStepPositions", "")


def _batch_and_length(q: ir.Value):
    """(batch, block length) dims of q [B, H, q, d], or None when unknown."""
    shape = q.shape
    if shape is None or shape.rank() != 4:
        return None
    dims = (shape[0], shape[2])
    for d in dims:
        if not isinstance(d, int) and (not isinstance(d, ir.SymbolicDim) or d.value is None):
            return None
    return tuple(d if isinstance(d, int) else d.value for d in dims)


class FuseStepPositionsPass(ir.passes.InPlacePass):
    """Merge the MesaStepPositions calls that compute the same thing into the first of them."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        keep: dict[tuple, ir.Node] = {}
        merged = 0
        for node in list(model.graph):
            if node.op_identifier() != STEP_POSITIONS:
                continue
            dims = _batch_and_length(node.inputs[0])
            if dims is None:
                logger.info("MesaStepPositions %s: q has no known batch/length dims; not merged", node.name)
                continue
            attrs = tuple(sorted((k, a.value) for k, a in node.attributes.items()))
            key = (tuple(id(v) for v in node.inputs[1:]), attrs, dims)
            first = keep.setdefault(key, node)
            if first is node:
                continue
            ir.convenience.replace_nodes_and_values(
                model.graph, insertion_point=node, old_nodes=[node], new_nodes=[],
                old_values=node.outputs, new_values=first.outputs)
            merged += 1
        return ir.passes.PassResult(model, modified=merged > 0)


def fuse_step_positions(model: ir.Model) -> int:
    """Apply the pass; returns how many MesaStepPositions calls remain (one per step when fused)."""
    FuseStepPositionsPass()(model)
    return sum(n.op_identifier() == STEP_POSITIONS for n in model.graph)
