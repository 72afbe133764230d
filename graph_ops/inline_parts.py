"""Expand the `ai.mesa` functions left in the main graph into the standard ops of their bodies.

After lowering and mask fusion the graph calls MesaCachedKV (per layer), MesaStepPositions (once per
step) and, for the decomposed kernel, MesaAttend; this pass inlines those calls (onnx-ir's
InlinePass) and drops the function definitions nobody calls any more. MesaAttention itself is left
alone: a graph that still has it (the portable target) keeps running its function body.
"""

from __future__ import annotations

import onnx_ir as ir

from graph_ops import mesa_op

PARTS = frozenset(f.name for f in mesa_op.PARTS)


class InlineMesaPartsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = ir.passes.common.InlinePass(
            criteria=lambda fn: fn.domain == mesa_op.DOMAIN and fn.name in PARTS)(model)
        ir.passes.common.RemoveUnusedFunctionsPass()(model)
        ir.passes.common.RemoveUnusedOpsetsPass()(model)
        return ir.passes.PassResult(model, modified=result.modified)


def inline_parts(model: ir.Model) -> bool:
    return InlineMesaPartsPass()(model).modified
