"""Padding-free sequence packing: micro-batches filled to a token budget, balanced across ranks.

Sequences are concatenated into one row with ``position_ids`` reset to 0 at each sequence
start. Transformers (5.x) derives the sequence boundaries from the position ids when the
forward gets no attention mask and no cache, so attention never crosses sequences
(tests/test_packing.py checks packed == one by one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
_warned_long = False


@dataclass
class PackedBatch:
    """One packed row. input_ids, position_ids: [1, T]; cu_seqlens: [B + 1] int32."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_lens: list[int]
    max_seqlen: int

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device),
                           self.cu_seqlens.to(device), self.seq_lens, self.max_seqlen)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def pack_by_budget(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``token_budget`` tokens.

    First-fit decreasing: deterministic, each index exactly once; a sequence longer than
    the budget gets a micro-batch of its own (with a warning, once).
    """
    global _warned_long
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        n = lengths[i]
        if n > token_budget and not _warned_long:
            log.warning("a sequence of %d tokens exceeds token_budget=%d: it gets its own "
                        "micro-batch (raise token_budget)", n, token_budget)
            _warned_long = True
        for b, load in enumerate(loads):
            if load + n <= token_budget:
                bins[b].append(i)
                loads[b] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    return bins


def balance_across_ranks(lengths: list[int], world_size: int) -> list[list[int]]:
    """Split sequence indices among ranks with balanced token counts (greedy longest-first
    to the least-loaded rank; ties to the lower rank). Deterministic."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    parts: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda k: (loads[k], k))
        parts[r].append(i)
        loads[r] += lengths[i]
    return [sorted(p) for p in parts]


def pack_sequences(seqs: list[list[int]]) -> PackedBatch:
    """Concatenate token sequences into one padding-free row."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("pack_sequences needs at least one sequence, none of them empty")
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    lens = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return PackedBatch(ids, pos, cu, lens, max(lens))


def response_gather_index(batch: PackedBatch, prompt_lens: list[int],
                          response_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [M], targets [M]): the packed-row positions whose hidden states predict each
    response token (token t is predicted at t - 1), and those tokens, in sequence order.

    Sequence i is prompt_lens[i] + response_lens[i] tokens long; a response of 0 tokens
    contributes nothing.
    """
    if not (len(prompt_lens) == len(response_lens) == len(batch.seq_lens)):
        raise ValueError("prompt_lens and response_lens must have one entry per packed sequence")
    parts = []
    for start, p, r, n in zip(batch.cu_seqlens[:-1].tolist(), prompt_lens, response_lens,
                              batch.seq_lens):
        if p + r != n:
            raise ValueError(f"sequence of {n} tokens is not prompt {p} + response {r}")
        if r and p < 1:
            raise ValueError("a response needs at least one context token before it")
        parts.append(torch.arange(start + p - 1, start + p + r - 1))
    index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    targets = batch.input_ids[0, index + 1]
    return index, targets
