"""Flash attention for Hopper GPUs in Pallas Mosaic GPU (forward and backward).

Layout q [B,S,H,D], k/v [B,T,KH,D]; query head h reads kv head h // (H // KH).
Semantics are those of ``reference.py`` / ``mask.py`` (bottom-right alignment).

Each kernel runs three warpgroups per block: two consumers doing the math with
wgmma, one producer streaming tiles from HBM into a ring of shared-memory
slots with TMA copies.

Modules:
  common            the call's static description, warpgroup helpers, the launcher;
  schedule          block ranges, segment spans, block order (pure, tested on CPU);
  rings             producer rings, the tiles a block owns, streamed segment ids;
  forward           the forward kernel (persistent, online softmax in base 2);
  backward_queries  dQ kernels (query-parallel), delta folded in where it fits;
  backward_keys     dK/dV kernels (key-parallel), optionally forming dQ too;
  vjp               argument checks, padding, the custom VJP and the backward
                    plans it runs by name (``BACKWARD_PLANS``; the tuning table's
                    entries name theirs, ``tuning.BACKWARD_HEAD_DIMS`` says what
                    each is).

Logit soft-capping (c*tanh(logits/c)) costs one tanh per logit; the backward
recomputes it and scales dS by 1 - tanh^2. Segment ids (packed sequences)
arrive as two int32 operands: each consumer keeps its own rows' ids in
registers and the key (or query) blocks' ids stream through the ring beside
K (or Q). Where the ids are sorted (packed sequences) each tile visits only
the blocks of its own segments (spans found by a binary search in XLA); every
visited block is masked, since none is known to lie inside one segment.

Lengths that are not multiples of the blocks are padded: padded keys are
masked, padded query rows are sliced off (their dO is zero in the backward).
"""
from pallas_kernels.attention.mosaic_gpu.vjp import mosaic_flash_attention, supports

__all__ = ["mosaic_flash_attention", "supports"]
