"""Next-token cross-entropy with an optional z-loss and a loss mask.

cross_entropy takes logits; linear_cross_entropy takes the final hidden
states and the output projection and never holds more than one chunk of
logits, so a realistic vocabulary costs neither the [tokens, vocab] float32
buffer nor float32 GEMMs in the backward pass.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _finish(nll_sum, lse2_sum, correct_sum, tokens, z_loss):
    count = jnp.maximum(tokens, 1.0)
    ce, zl = nll_sum / count, z_loss * lse2_sum / count
    return ce + zl, {"ce": ce, "z_loss": zl, "tokens": tokens, "accuracy": correct_sum / count}


def _logit_stats(logits, targets, mask):
    """Per-token logsumexp of float32 logits, and their sums over unmasked
    tokens of nll, lse^2 and correct predictions. A prediction is correct
    when the target's logit is the largest (a tie counts): it reuses the
    logsumexp's max, where an argmax would be one more pass over the
    [tokens, vocab] logits."""
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1))  # its gradient cancels
    lse = peak + jnp.log(jnp.sum(jnp.exp(logits - peak[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= peak) * mask
    return lse, jnp.stack([((lse - target_logit) * mask).sum(), ((lse ** 2) * mask).sum(),
                           correct.sum()])


def cross_entropy(logits, targets, mask=None, *, z_loss: float = 0.0):
    """Mean over unmasked tokens. Returns (loss, metrics) with metrics holding
    the plain cross-entropy, the z-loss term, the token count and accuracy."""
    logits = logits.astype(jnp.float32)
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    _, (nll, lse2, correct) = _logit_stats(logits, targets, mask)
    return _finish(nll, lse2, correct, mask.sum(), z_loss)


def _chunk_logits(x, w, dtype):
    """A chunk's logits as float32, from a GEMM whose output is stored in
    dtype: bfloat16 halves the bytes of the [tokens, vocab] chunk that the
    logsumexp's passes (and the backward's) read."""
    return jnp.dot(x, w, preferred_element_type=dtype).astype(jnp.float32)


def _chunks(a, n):
    """[B, S, ...] -> [n, B, S / n, ...]: chunks along the sequence, so each
    chunk keeps the batch axis (and its sharding) whole."""
    B, S = a.shape[:2]
    return jnp.moveaxis(a.reshape(B, n, S // n, *a.shape[2:]), 1, 0)


def _unchunk(a):
    n, B, c = a.shape[:3]
    return jnp.moveaxis(a, 0, 1).reshape(B, n * c, *a.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sums(x, w, targets, mask, n, dtype):
    return _sums_fwd(x, w, targets, mask, n, dtype)[0]


def _sums_fwd(x, w, targets, mask, n, dtype):
    def body(_, chunk):
        return None, _logit_stats(_chunk_logits(chunk[0], w, dtype), chunk[1], chunk[2])
    _, (lse, sums) = jax.lax.scan(body, None, (_chunks(x, n), _chunks(targets, n),
                                               _chunks(mask, n)))
    return sums.sum(0), (x, w, targets, mask, lse)


def _sums_bwd(n, dtype, res, g):
    x, w, targets, mask, lse = res
    g_nll, g_lse2 = g[0], g[1]  # the correct-token count has no gradient

    def body(dw, chunk):
        xc, tc, mc, lc = chunk
        p = jnp.exp(_chunk_logits(xc, w, dtype) - lc[..., None])
        onehot = jax.nn.one_hot(tc, w.shape[1], dtype=jnp.float32)
        scale = (mc * (g_nll + 2.0 * g_lse2 * lc))[..., None]
        dlogits = (scale * p - (mc * g_nll)[..., None] * onehot).astype(xc.dtype)
        dx = jnp.dot(dlogits, w.T)
        dw = dw + jnp.einsum("bsd,bsv->dv", xc, dlogits, preferred_element_type=jnp.float32)
        return dw, dx

    dw, dx = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32),
                          (_chunks(x, n), _chunks(targets, n), _chunks(mask, n), lse))
    return _unchunk(dx).astype(x.dtype), dw.astype(w.dtype), None, None


_sums.defvjp(_sums_fwd, _sums_bwd)


def num_chunks(batch: int, seq_len: int, chunk_tokens: int) -> int:
    """The most chunks of at most ~chunk_tokens tokens that split seq_len evenly."""
    want = max(1, -(-batch * seq_len // chunk_tokens))
    return next(n for n in range(min(want, seq_len), seq_len + 1) if seq_len % n == 0)


def linear_cross_entropy(x, w, targets, mask=None, *, z_loss: float = 0.0,
                         chunk_tokens: int = 8192, logits_dtype=jnp.float32):
    """cross_entropy(x @ w, targets, mask) for hidden states x [B, S, D] and the
    output projection w [D, V] (both in the compute dtype), in chunks of about
    chunk_tokens tokens along the sequence. The GEMM accumulates in float32
    and stores each chunk's logits in logits_dtype (float32 as the plain path;
    bfloat16 rounds them to 8 bits of mantissa first, as MaxText's default);
    the softmax runs in float32. The backward recomputes each chunk's logits
    and runs both its GEMMs in the compute dtype."""
    if x.ndim != 3 or w.ndim != 2 or x.shape[-1] != w.shape[0] or targets.shape != x.shape[:2]:
        raise ValueError(f"linear_cross_entropy: x {x.shape} must be [B, S, D], w {w.shape} "
                         f"[D, V] and targets {targets.shape} [B, S]")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = num_chunks(x.shape[0], x.shape[1], chunk_tokens)
    nll, lse2, correct = _sums(x, w.astype(x.dtype), targets, mask, n, jnp.dtype(logits_dtype))
    return _finish(nll, lse2, correct, mask.sum(), z_loss)
