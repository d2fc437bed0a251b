"""Packed attention without flash-attention, at the cost of the sequences, not of the row.

A packed row of T tokens holding sequences of lengths L_1..L_k needs attention within
each sequence only. Passing SDPA (or eager attention) a T x T block-diagonal mask computes
all T^2 scores and masks most of them away: at the trainer's token budgets (4,096 tokens
of 50-100-token sequences on the tiny model) that is 40-80x the useful work, and it made
attention most of a packed forward on CPU. This attention function runs SDPA causally on
each sequence's slice instead (sum_i L_i^2 scores, no mask tensor at all), which is what a
varlen flash-attention kernel does, with PyTorch's own SDPA kernels per sequence.

It is registered with transformers' attention interface under ``NAME`` and selected only
for the duration of a packed forward (``packed_forward``), so the same model keeps its
usual SDPA / eager attention for generation with padding and a KV cache. The sequence
boundaries arrive as the ``cu_seq_lens_q`` keyword (the varlen flash-attention
convention, passed down to every attention call by transformers) plus a host copy,
``cepo_seq_bounds``, so no layer synchronises with the device to read them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

NAME = "cepo_varlen_sdpa"
"""The name the attention function is registered under (never a model's load-time choice)."""

_registered = False


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence.

    query [1, Hq, T, D], key / value [1, Hkv, T, D] (grouped-query heads are broadcast by
    SDPA); ``cepo_seq_bounds``: the T-row's sequence boundaries [0, ..., T] as a list of
    ints; ``sliding_window`` (Mistral, Qwen's sliding layers), when set, limits each query
    to the last ``sliding_window`` keys, as transformers' sliding-window mask does.
    ``cepo_prefix_of`` (shared-context packing, cepo.shared_context), when given: per
    sequence, the index of an earlier sequence it continues, or -1; a continuing sequence
    attends to all of that one's keys, then causally to its own.
    Returns ([1, T, Hq, D], None), the layout transformers' attention functions return.
    """
    bounds = kwargs.get("cepo_seq_bounds")
    if bounds is None or attention_mask is not None:
        raise ValueError(f"{NAME}: runs packed rows only (sequence bounds given, no mask); "
                         "it is selected by cepo.varlen_attention.packed_forward")
    if query.shape[0] != 1 or bounds[-1] != query.shape[2]:
        raise ValueError(f"{NAME}: expected one packed row of {bounds[-1]} tokens, got query "
                         f"{tuple(query.shape)}")
    gqa = query.shape[1] != key.shape[1]
    window = kwargs.get("sliding_window")
    prefix_of = kwargs.get("cepo_prefix_of")
    drop = dropout if module.training else 0.0

    def attend(q, k, v, mask=None):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=scaling,
                                                  is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop,
                                              scale=scaling, enable_gqa=gqa)

    parts = []
    n_seq, s = len(bounds) - 1, 0
    while s < n_seq:
        a, b = bounds[s], bounds[s + 1]
        p = -1 if prefix_of is None else prefix_of[s]
        if p >= 0:  # a run of sequences continuing the same prefix (a shared context)
            e = s
            while e + 1 < n_seq and prefix_of[e + 1] == p:
                e += 1
            pa, pb, end = bounds[p], bounds[p + 1], bounds[e + 1]
            if pb == a and end - a <= GROUP_QUERIES:  # right after it, few tokens: one call
                mask = _continuation_mask(tuple(bounds[k + 1] - bounds[k] for k in range(s, e + 1)),
                                          pb - pa, window, str(query.device))
                parts.append(attend(query[:, :, a:end], key[:, :, pa:end], value[:, :, pa:end],
                                    mask))
            else:
                for k in range(s, e + 1):
                    ka, kb = bounds[k], bounds[k + 1]
                    if kb == ka:
                        continue
                    mask = _continuation_mask((kb - ka,), pb - pa, window, str(query.device))
                    parts.append(attend(query[:, :, ka:kb],
                                        torch.cat([key[:, :, pa:pb], key[:, :, ka:kb]], dim=2),
                                        torch.cat([value[:, :, pa:pb], value[:, :, ka:kb]], dim=2),
                                        mask))
            s = e + 1
            continue
        s += 1
        if b == a:
            continue
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        if window is not None and b - a > window:  # query i sees keys j with i - window < j <= i
            parts.append(attend(q, k, v, _continuation_mask((b - a,), 0, window,
                                                            str(query.device))))
        else:
            parts.append(attend(q, k, v))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


GROUP_QUERIES = 512
"""Responses after one shared context totalling at most this many tokens attend in one
SDPA call (a block mask over the context and all of them; the extra scores it computes
cost less than a call per response); longer ones get a call each."""


@functools.lru_cache(maxsize=512)
def _continuation_mask(lengths: tuple[int, ...], c: int, window: int | None,
                       device: str) -> torch.Tensor:
    """[R, c + R] bool for sequences of ``lengths`` (R tokens in all) that each continue
    the same c-token prefix and follow it in the row: the query at offset t of sequence i
    (position c + t) sees every prefix key j < c with j <= c + t, and its own sequence's
    keys up to itself, never another sequence's; with a sliding window, only keys whose
    position is > c + t - window (c = 0 and one length: a plain sequence's sliding-window
    band). Cached: every layer of a forward asks for the same."""
    lens = torch.tensor(lengths, dtype=torch.long)
    total = int(lens.sum())
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lens)              # [R]
    offset = torch.arange(total) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    q_pos = c + offset
    k_pos = torch.cat([torch.arange(c), q_pos])
    k_seq = torch.cat([torch.full((c,), -1, dtype=torch.long), seq])
    visible = (k_seq[None] == -1) | (k_seq[None] == seq[:, None])   # the prefix, or itself
    allowed = visible & (k_pos[None] <= q_pos[:, None])
    if window is not None:
        allowed &= k_pos[None] > q_pos[:, None] - window
    return allowed.to(device)


def register() -> None:
    """Make ``NAME`` known to transformers' attention interface (idempotent). It is not
    given a mask function, so transformers builds no mask while it is selected."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, varlen_sdpa_attention)
        _registered = True


def _configs(config):
    """The config and its sub-configs that carry an attention implementation."""
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            yield sub


@contextlib.contextmanager
def packed_forward(config):
    """Within the block, ``config`` (and its sub-configs) select the varlen attention
    function; the previous implementation is restored on exit, whatever happens."""
    register()
    saved = [(c, c._attn_implementation) for c in _configs(config)]
    try:
        for c, _ in saved:
            c._attn_implementation_internal = NAME
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation_internal = impl
