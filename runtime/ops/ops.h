// The ops of libmesa_ops.so (domain ai.mesa.cpu), one file each; library.cpp registers them.
#pragma once

struct OrtCustomOp;

const OrtCustomOp* decode_attention_op();   // decode_attention.cpp: GroupedDecodeAttention
const OrtCustomOp* prefill_attention_op();  // prefill_attention.cpp: TiledPrefillAttention
