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

With ``engines.group_attention`` a third part joins the merge: each request's prompt (question + history), held
once for the request's k sample rows (``GroupPrefix``), which then hold only the tokens they generate.

The batcher passes the prefix as ``shared_prefix=`` (a list of per-layer ``(keys, values)``) to the model's
forward; transformers hands forward keyword arguments down to the attention function. Without it (the prefix's
own prefill, training, the probe) this is plain sdpa. CPU only: the CUDA kernels' log-sum-exp outputs differ.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class GroupPart:
    """One bucket of ``kv_cache.GroupKV``: ``layers[i]`` is layer i's ``(keys, values)`` ``[R, kv_heads, w, d]``, one
    slot per running prompt (right aligned, zeros masked on the left); ``mask`` additive ``[R, 1, 1, w]`` or None
    when no slot is padded; ``gather`` ``[R * kmax]``: the row whose queries fill slot r's j-th query place (places
    past a slot's rows repeat one of them: computed, never read)."""

    layers: list
    mask: torch.Tensor | None
    gather: torch.Tensor
    kmax: int


@dataclass
class GroupPrefix:
    """Each request's prompt KV, held once for the request's rows: the buckets' parts, and ``scatter`` ``[rows]``:
    each row's place among all buckets' query places, in order."""

    parts: list[GroupPart]
    scatter: torch.Tensor


@dataclass
class Ragged:
    """A forward over two kinds of token in one flattened sequence (``[1, N]``, the batcher's fused tick): first
    ``rows`` running rows' next tokens, one each (their caches ``row_cache``; additive mask ``row_mask``
    ``[rows, 1, 1, S]`` in the model's dtype, built once for all layers; ``group_prefix`` under group attention),
    then ``prompts`` prompts' tokens, ``width`` each, left padded (the stored KV they extend ``prompt_cache``;
    boolean mask ``prompt_mask`` ``[prompts, 1, width, p + width]``). Linear layers, norms and RoPE see the tokens
    as one batch; attention splits them back and runs each part as its own forward would, and writes the new keys
    and values to those caches (the model's forward runs with ``use_cache=False``)."""

    rows: int
    row_cache: object
    row_mask: torch.Tensor | None
    group_prefix: GroupPrefix | None
    prompts: int
    width: int
    prompt_cache: object
    prompt_mask: torch.Tensor | None


def _ragged(module, query, key, value, ragged: Ragged, scaling, shared_prefix) -> tuple[torch.Tensor, None]:
    layer, b = module.layer_idx, ragged.rows
    h, d = query.shape[1], query.shape[-1]
    kvh = key.shape[1]
    outs = []
    if b:
        k, v = ragged.row_cache.layers[layer].update(key[0, :, :b].transpose(0, 1).unsqueeze(2),
                                                     value[0, :, :b].transpose(0, 1).unsqueeze(2))
        out, _ = attention(module, query[0, :, :b].transpose(0, 1).unsqueeze(2), k, v, ragged.row_mask,
                           scaling=scaling, shared_prefix=shared_prefix, group_prefix=ragged.group_prefix)
        outs.append(out.reshape(b, h, d))
    if ragged.prompts:
        n, w = ragged.prompts, ragged.width

        def split(x, heads):  # [heads, n * w, d] -> [n, heads, w, d]
            return x[0, :, b:].reshape(heads, n, w, d).transpose(0, 1)

        k, v = ragged.prompt_cache.layers[layer].update(split(key, kvh), split(value, kvh))
        out, _ = attention(module, split(query, h), k, v, ragged.prompt_mask, scaling=scaling,
                           shared_prefix=shared_prefix)
        outs.append(out.reshape(n * w, h, d))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.unsqueeze(0), None


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_prefix=None,
              group_prefix=None, ragged=None, **kwargs):
    """transformers' attention-function signature: ``query`` ``[b, heads, q, d]``, ``key``/``value`` the rows'
    caches ``[b, kv_heads, S, d]``, ``attention_mask`` boolean ``[b, 1, q, S]`` or None; returns
    ``([b, q, heads, d], None)``. With ``group_prefix`` too, a row attends to three parts, in order: the shared
    prefix, its request's prompt (``GroupPrefix``: one copy read by all the request's rows), its own cache.
    With ``ragged`` (``Ragged``), ``query``/``key``/``value`` are a fused tick's flattened tokens: see there."""
    if ragged is not None:
        return _ragged(module, query, key, value, ragged, scaling, shared_prefix)
    if shared_prefix is None and group_prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    b, h, q, d = query.shape
    kvh, s = key.shape[1], key.shape[2]
    g = h // kvh  # query heads per kv head (repeat_kv's order: heads i*g .. i*g+g-1 read kv head i)
    grouped = query.reshape(b, kvh, g * q, d)
    parts = []  # (out [b, kv_heads, g*q, d], log-sum-exp [b, kv_heads, g*q]) of each part the rows attend to
    kernels = getattr(module, "_fused_kernels", None)  # pipeline/engines/fused.py: decode attention in C
    own_kernel = kernels is not None and q == 1 and (attention_mask is None or attention_mask.dtype != torch.bool)
    scale = d**-0.5 if scaling is None else scaling
    if shared_prefix is not None:
        pk, pv = shared_prefix[module.layer_idx]  # [1, kv_heads, P, d]
        out_p, lse_p = _flash(grouped.transpose(0, 1).reshape(1, kvh, b * g * q, d), pk, pv, None, scaling)
        if own_kernel and group_prefix is None:  # the row's own part and the merge in one call
            merged = kernels.decode_attention_merged(grouped, key, value, attention_mask, scale, out_p, lse_p)
            if merged is not None:
                return merged, None
        parts.append((out_p.reshape(kvh, b, g * q, d).transpose(0, 1), lse_p.reshape(kvh, b, g * q).transpose(0, 1)))
    if group_prefix is not None:
        parts.append(_group_part(group_prefix, module.layer_idx, grouped, scaling))
    mask, causal = None, False
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        # Additive, [b, 1, 1, s], built once per forward for every layer (``Ragged.row_mask``): one query per row.
        if q != 1:
            raise ValueError(f"an additive attention mask is for one query per row, got {q}")
        mask = attention_mask.expand(b, 1, g, s)
    elif attention_mask is not None:
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
    own = kernels.decode_attention(grouped, key, value, attention_mask, scale) if own_kernel else None
    parts.append(own if own is not None else _flash(grouped, key, value, mask, scaling, causal)[:2])
    if len(parts) == 2:
        # The same weighted sum as below in 5 kernels instead of ~12 (each a few microseconds of dispatch on a small
        # CPU, in every layer of every decode step): o_1 + (o_0 - o_1) e^l0 / (e^l0 + e^l1).
        (o0, l0), (o1, l1) = parts
        out = torch.lerp(o1.float(), o0.float(), torch.sigmoid(l0 - l1).unsqueeze(-1))
        return out.to(query.dtype).reshape(b, h, q, d).transpose(1, 2).contiguous(), None
    top = parts[0][1]
    for _, lse in parts[1:]:
        top = torch.maximum(top, lse)
    # out = sum_i e^(lse_i - top) o_i / sum_i e^(lse_i - top): softmax over all the parts' keys together.
    num = den = None
    for o, lse in parts:
        w = torch.exp(lse - top).unsqueeze(-1)
        num = o.float() * w if num is None else num + o.float() * w
        den = w if den is None else den + w
    out = num / den
    return out.to(query.dtype).reshape(b, h, q, d).transpose(1, 2).contiguous(), None


def _group_part(group: GroupPrefix, layer: int, grouped: torch.Tensor, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' queries (``[b, kv_heads, g*q, d]``) against their requests' prompts: per bucket one flash call with
    each request's rows' queries side by side (``kmax`` places per slot), so a prompt's keys and values are read
    once for all its rows."""
    outs, lses = [], []
    m, d = grouped.shape[2], grouped.shape[3]
    for part in group.parts:
        gk, gv = part.layers[layer]
        r, kvh = gk.shape[0], gk.shape[1]
        places = grouped[part.gather].reshape(r, part.kmax, kvh, m, d).transpose(1, 2).reshape(r, kvh, part.kmax * m, d)
        out, lse = _flash(places, gk, gv, part.mask, scaling)[:2]
        outs.append(out.reshape(r, kvh, part.kmax, m, d).transpose(1, 2).reshape(r * part.kmax, kvh, m, d))
        lses.append(lse.reshape(r, kvh, part.kmax, m).transpose(1, 2).reshape(r * part.kmax, kvh, m))
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))
    return out[group.scatter], lse[group.scatter]
