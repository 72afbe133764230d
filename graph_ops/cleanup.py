"""Cleanup: constant folding, the optimizer's basic rewrites, common subexpressions, dead nodes,
unused functions/opsets, and shape inference — onnxscript's optimizer and onnx-ir's passes.

Functions are never inlined here (a graph that keeps ai.mesa::MesaAttention keeps running its body);
graph_ops/inline_parts.py decides what to expand. Common-subexpression elimination is what merges the
small per-layer casts/shapes the lowering derives from the shared step values (one per step).
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer


class CleanupPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(1 for _ in model.graph)
        onnxscript.optimizer.optimize_ir(model, inline=False)
        ir.passes.Sequential(
            ir.passes.common.CommonSubexpressionEliminationPass(),
            ir.passes.common.RemoveUnusedNodesPass(),
            ir.passes.common.RemoveUnusedFunctionsPass(),
            ir.passes.common.RemoveUnusedOpsetsPass(),
            ir.passes.common.ShapeInferencePass(),
            ir.passes.common.TopologicalSortPass(),
        )(model)
        return ir.passes.PassResult(model, modified=sum(1 for _ in model.graph) != before)


def cleanup(model: ir.Model) -> ir.Model:
    CleanupPass()(model)
    return model
