"""Padding-free sequence packing: micro-batches filled to a token budget, balanced across ranks.

Sequences are concatenated into one row ``[1, T]`` with ``position_ids`` reset to 0 at each
sequence start (for the rotary embedding) and their boundaries in ``cu_seqlens``. The
model is given the boundaries explicitly (cepo.model.packed_attention_kwargs: varlen
``cu_seqlens`` for flash-attn, a block-diagonal causal mask for sdpa / eager / flex), so
attention never crosses sequences on any supported transformers version:
tests/test_packing.py checks packed == one by one.

Planning works on lengths only: ``balance_across_ranks`` spreads sequences over ranks by
tokens, ``pack_by_budget`` fills one rank's micro-batches. Every rank must run the same
number of micro-batches (FSDP2's collectives must match): a rank with fewer runs
``padding_micro_batch``, a zero-contribution forward/backward (cepo.step.micro_batches).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
_warned_long = False


@dataclass
class PackedBatch:
    """One packed, padding-free row of B sequences, T tokens in all.

    input_ids, position_ids: [1, T] long (positions restart at 0 per sequence);
    cu_seqlens: [B + 1] int32 cumulative lengths (flash-attn varlen layout);
    seq_lens: the B lengths; max_seqlen: the longest of them.
    prefix_of: None for plain packing; else, per segment, the index of the segment it
    continues (it attends to that segment, its shared context, before itself; its
    positions continue from it) or -1 (cepo.shared_context).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_lens: list[int]
    max_seqlen: int
    prefix_of: list[int] | None = None

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        """A copy with the tensors on ``device`` (lengths stay Python ints)."""
        return PackedBatch(self.input_ids.to(device, non_blocking=non_blocking),
                           self.position_ids.to(device, non_blocking=non_blocking),
                           self.cu_seqlens.to(device, non_blocking=non_blocking),
                           list(self.seq_lens), self.max_seqlen,
                           None if self.prefix_of is None else list(self.prefix_of))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_sequences(self) -> int:
        return len(self.seq_lens)


def _check_lengths(lengths: list[int]) -> None:
    bad = [n for n in lengths if n < 0]
    if bad:
        raise ValueError(f"lengths must be >= 0 tokens, got {bad[0]}")


def _longest_first(lengths: list[int]) -> list[int]:
    """Indices by decreasing length, ties by index (the one order every rank agrees on)."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def pack_by_budget(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``token_budget`` tokens.

    First-fit decreasing: deterministic, every index exactly once, indices ascending
    within a micro-batch. A sequence longer than the budget gets a micro-batch of its
    own (logged once per process: raise the budget). lengths: [N] -> list of index lists.
    """
    global _warned_long
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    _check_lengths(lengths)
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in _longest_first(lengths):
        n = lengths[i]
        if n > token_budget and not _warned_long:
            log.warning("a sequence of %d tokens exceeds token_budget=%d: it gets its own "
                        "micro-batch (raise token_budget to avoid the memory spike)",
                        n, token_budget)
            _warned_long = True
        for b, load in enumerate(loads):
            if load + n <= token_budget:
                bins[b].append(i)
                loads[b] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    return [sorted(b) for b in bins]


def balance_across_ranks(lengths: list[int], world_size: int) -> list[list[int]]:
    """Split sequence indices among ``world_size`` ranks with balanced token counts.

    Greedy longest-first to the least-loaded rank (ties to the lower rank): the spread
    max - min of the rank loads is at most the longest sequence. Deterministic; indices
    ascending within a rank; a rank may get none (``[]``) when there are few sequences.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    _check_lengths(lengths)
    parts: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for i in _longest_first(lengths):
        r = min(range(world_size), key=lambda k: (loads[k], k))
        parts[r].append(i)
        loads[r] += lengths[i]
    return [sorted(p) for p in parts]


def pack_sequences(seqs: list[list[int]]) -> PackedBatch:
    """Concatenate B token sequences (each non-empty) into one padding-free row."""
    if not seqs:
        raise ValueError("pack_sequences needs at least one sequence; for a rank with "
                         "nothing to run use padding_micro_batch(pad_id)")
    empty = [k for k, s in enumerate(seqs) if len(s) == 0]
    if empty:
        raise ValueError(f"pack_sequences: sequence {empty[0]} is empty; every sequence needs "
                         "at least one token (drop it before packing)")
    lens = [len(s) for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return PackedBatch(ids, pos, cu, lens, max(lens))


def padding_micro_batch(pad_id: int) -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
    """(batch, index [1], targets [1]) for a padding turn: a rank with no work left.

    A 2-token row of ``pad_id`` whose one "response" token the caller must give zero
    weight (mask False / advantage 0), so the loss is exactly 0 yet every parameter,
    the LM head included, gets a (zero) gradient: FSDP2's reduce-scatters then match
    the other ranks'. Not a 0-token row: transformers cannot run one (IndexError in
    its packed-sequence detection, 5.23).
    """
    batch = pack_sequences([[pad_id, pad_id]])
    index, targets = response_gather_index(batch, [1], [1])
    return batch, index, targets


def response_gather_index(batch: PackedBatch, prompt_lens: list[int],
                          response_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [M] long, targets [M] long) with M = sum(response_lens).

    index: the packed-row positions whose hidden states predict each response token
    (token t of a sequence is predicted at t - 1, offset by the sequence's start);
    targets: those tokens. Sequence order, so ``hidden[index]`` and ``targets`` line
    up. Sequence i must be prompt_lens[i] + response_lens[i] tokens long; a response of
    0 tokens contributes nothing. Both tensors live on ``batch.input_ids.device``.
    """
    b = batch.num_sequences
    if len(prompt_lens) != b or len(response_lens) != b:
        raise ValueError(f"response_gather_index: prompt_lens ({len(prompt_lens)}) and "
                         f"response_lens ({len(response_lens)}) need one entry per packed "
                         f"sequence ({b})")
    for k, (p, r, n) in enumerate(zip(prompt_lens, response_lens, batch.seq_lens)):
        if p < 0 or r < 0 or p + r != n:
            raise ValueError(f"response_gather_index: sequence {k} has {n} tokens, not prompt "
                             f"{p} + response {r}")
        if r and p < 1:
            raise ValueError(f"response_gather_index: sequence {k} has a response but no "
                             "prompt token to predict its first token from")
    device = batch.input_ids.device
    resp = torch.tensor(response_lens, dtype=torch.long)
    first = batch.cu_seqlens[:-1].long().cpu() + torch.tensor(prompt_lens, dtype=torch.long) - 1
    m = int(resp.sum())
    # within-response offset 0..r-1 of each token: arange(M) minus its response's start
    starts = torch.cumsum(resp, 0) - resp
    offset = torch.arange(m) - torch.repeat_interleave(starts, resp)
    index = (torch.repeat_interleave(first, resp) + offset).to(device)
    targets = batch.input_ids[0, index + 1]
    return index, targets
