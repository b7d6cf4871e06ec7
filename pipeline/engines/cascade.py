"""Attention that reads the engine's shared prompt prefix once per step for all rows, not once per row.

Every prompt of a transformers engine starts with the same instruction + worked examples (317 tokens of the
~400-600 of a rollout or evaluation prompt on the embedded run). With one KV cache per row, every decode step
reads that prefix's keys and values once per row: at 18 rows over 600 tokens, as much memory traffic as the
model's weights. Here the prefix's KV is held once per layer (``[1, kv_heads, P, head_dim]``), a row's cache
holds only what follows it, and each layer's attention runs in two parts merged by their log-sum-exp:

    prefix: every row's queries against the one prefix  -> o_p, l_p   (no mask: the whole prefix precedes them)
    suffix: each row's queries against its own cache    -> o_s, l_s   (the usual padding / causal mask)
    out = (e^(l_p - m) o_p + e^(l_s - m) o_s) / (e^(l_p - m) + e^(l_s - m)),  m = max(l_p, l_s)

which is softmax attention over [prefix | suffix] up to rounding (fp32 logits within ~3e-5 of sdpa over the
whole cache on the embedded model). Both parts are torch's fused CPU flash-attention kernel, which returns the
log-sum-exp; a row's result does not depend on the other rows (each query is reduced on its own), so requests
stay independent of what else is batched, as with sdpa.

The batcher passes the prefix as ``shared_prefix=`` (a list of per-layer ``(keys, values)``) to the model's
forward; transformers hands forward keyword arguments down to the attention function. Without it (the prefix's
own prefill, training, the probe) this is plain sdpa. CPU only: the CUDA kernels' log-sum-exp outputs differ.
"""

from __future__ import annotations

import torch

NAME = "open_rstar_prefix_cascade"
_registered = False


def register() -> str:
    """Make ``NAME`` an attention implementation transformers knows (idempotent); returns it."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean masks sdpa gets
        _registered = True
    return NAME


def _flash(query, key, value, mask, scale, causal=False):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, is_causal=causal,
                                                                       attn_mask=mask, scale=scale)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_prefix=None, **kwargs):
    """transformers' attention-function signature: ``query`` ``[b, heads, q, d]``, ``key``/``value`` the rows'
    caches ``[b, kv_heads, S, d]``, ``attention_mask`` boolean ``[b, 1, q, S]`` or None; returns
    ``([b, q, heads, d], None)``."""
    if shared_prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    pk, pv = shared_prefix[module.layer_idx]  # [1, kv_heads, P, d]
    b, h, q, d = query.shape
    kvh, s = key.shape[1], key.shape[2]
    g = h // kvh  # query heads per kv head (repeat_kv's order: heads i*g .. i*g+g-1 read kv head i)
    grouped = query.reshape(b, kvh, g * q, d)
    out_p, lse_p = _flash(grouped.transpose(0, 1).reshape(1, kvh, b * g * q, d), pk, pv, None, scaling)
    out_p = out_p.reshape(kvh, b, g * q, d).transpose(0, 1)
    lse_p = lse_p.reshape(kvh, b, g * q).transpose(0, 1)
    mask, causal = None, False
    if attention_mask is not None:
        allowed = attention_mask[:, :, None].expand(b, 1, g, q, s).reshape(b, 1, g * q, s)
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed,
                                                                                               float("-inf"))
    elif q > 1:  # sdpa_mask skipped the mask: causal over the rows' own tokens, the last q of S
        if q == s:
            causal = g == 1
        if not causal:
            ok = torch.ones(q, s, dtype=torch.bool, device=query.device).tril(s - q)
            ok = ok[None, None, None].expand(b, 1, g, q, s).reshape(b, 1, g * q, s)
            mask = torch.zeros(ok.shape, dtype=query.dtype, device=query.device).masked_fill_(~ok, float("-inf"))
    out_s, lse_s = _flash(grouped, key, value, mask, scaling, causal)
    top = torch.maximum(lse_p, lse_s)
    w_p, w_s = torch.exp(lse_p - top).unsqueeze(-1), torch.exp(lse_s - top).unsqueeze(-1)
    out = (out_p.float() * w_p + out_s.float() * w_s) / (w_p + w_s)
    return out.to(query.dtype).reshape(b, h, q, d).transpose(1, 2).contiguous(), None
