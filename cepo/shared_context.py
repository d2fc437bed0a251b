"""Shared-context packing: a context runs once for all the responses that follow it.

A group's G rollouts are scored under one teacher context (prompt + hint), so plain
packing (``cepo.packing.pack_sequences``) runs that context G times, once per (context,
response) sequence. Here a packed row holds each distinct context ONCE, followed by its
responses as separate segments: a response segment attends to its context and, causally,
to itself (never to the other responses), and its positions continue from the context's
end. Every response token then gets exactly the hidden state it gets in its own (context
+ response) sequence, for the context's cost once instead of G times.

The layout is a ``PackedBatch`` whose ``prefix_of`` names, per segment, the segment it
continues (its context) or -1 (a context, or a plain sequence): the attention function
that reads it is ``cepo.varlen_attention`` (``cepo.model.run_packed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cepo.packing import PackedBatch, pack_by_budget


@dataclass
class SharedContext:
    """One distinct context and the sequences (caller's indices) whose responses follow it."""

    context: list[int]
    members: list[int]


def plan_shared_contexts(contexts: list[list[int]], response_lens: list[int],
                         token_budget: int) -> list[list[SharedContext]]:
    """Micro-batches (each a list of ``SharedContext``) covering every sequence once.

    contexts[i], response_lens[i]: sequence i's context ids and response length. Sequences
    with identical contexts share one (first-seen order); a context whose responses
    overflow ``token_budget`` is split into several copies, each holding as many of its
    responses as fit (at least one). The copies are then packed by their token counts
    (``pack_by_budget``: context + its responses), so a micro-batch holds at most
    ``token_budget`` tokens unless one context + one response is longer.
    """
    if len(contexts) != len(response_lens):
        raise ValueError(f"plan_shared_contexts: {len(contexts)} contexts for "
                         f"{len(response_lens)} response lengths")
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, ctx in enumerate(contexts):
        by_context.setdefault(tuple(ctx), []).append(i)
    parts: list[SharedContext] = []
    for ctx, members in by_context.items():
        current: list[int] = []
        size = len(ctx)
        for i in members:
            if current and size + response_lens[i] > token_budget:
                parts.append(SharedContext(list(ctx), current))
                current, size = [], len(ctx)
            current.append(i)
            size += response_lens[i]
        parts.append(SharedContext(list(ctx), current))
    lengths = [len(p.context) + sum(response_lens[i] for i in p.members) for p in parts]
    return [[parts[k] for k in batch] for batch in pack_by_budget(lengths, token_budget)]


def pack_shared_contexts(parts: list[SharedContext],
                         responses: list[list[int]]) -> tuple[PackedBatch, torch.Tensor, list[int]]:
    """One packed row of the given contexts, each followed by its members' responses.

    responses[i]: sequence i's response ids (non-empty). Returns (batch, index [M] long,
    members): ``members`` the sequences in row order; ``index`` the row positions whose
    hidden states predict each member's response tokens, member after member (a
    response's first token is predicted at its context's last position, token t > 0 at
    the response's own position t - 1), the layout ``response_gather_index`` gives for
    plain packing. Contexts must be non-empty.
    """
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    seg_lens: list[int] = []
    prefix_of: list[int] = []
    index: list[torch.Tensor] = []
    members: list[int] = []
    for part in parts:
        c = len(part.context)
        if c == 0:
            raise ValueError("pack_shared_contexts: a context is empty; every response needs a "
                             "context token to predict its first token from")
        ctx_segment, ctx_last = len(seg_lens), len(ids) + c - 1
        ids += part.context
        positions.append(torch.arange(c))
        seg_lens.append(c)
        prefix_of.append(-1)
        for i in part.members:
            n = len(responses[i])
            if n == 0:
                raise ValueError(f"pack_shared_contexts: the response of sequence {i} is empty")
            start = len(ids)
            ids += responses[i]
            positions.append(torch.arange(c, c + n))
            seg_lens.append(n)
            prefix_of.append(ctx_segment)
            index.append(torch.cat([torch.tensor([ctx_last]), torch.arange(start, start + n - 1)]))
            members.append(i)
    cu = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seg_lens).cumsum(0)
    batch = PackedBatch(torch.tensor(ids, dtype=torch.long)[None], torch.cat(positions)[None], cu,
                        seg_lens, max(seg_lens), prefix_of=prefix_of)
    return batch, torch.cat(index), members


def segment_sources(batch: PackedBatch, members: list[int]) -> list[int]:
    """Per packed segment of ``batch``, the sequence (caller's index) it belongs to: for a
    plain batch its members in order; for a shared-context batch each response segment's
    member, and a shared context the member of the response right after it (the first
    that uses it). Per-sequence inputs (a vision-language rollout's images) follow this."""
    if batch.prefix_of is None:
        return list(members)
    responses = iter(members)
    source = [None if p < 0 else next(responses) for p in batch.prefix_of]
    return [source[s + 1] if p < 0 else source[s] for s, p in enumerate(batch.prefix_of)]
