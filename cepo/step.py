"""The model passes of one step: scoring contexts and the PPO update, on packed micro-batches.

Responses are the rows of a flat token axis (N response tokens of this rank, rollout
after rollout: the "canonical order"). Each pass packs sequences (context + response)
into padding-free micro-batches of at most ``token_budget`` tokens, runs the policy, and
maps the rows back to canonical order. Every rank runs the same number of micro-batches
(FSDP2's collectives must match), padding with a 2-token dummy that contributes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import cepo_kernels as ck
from cepo.distributed import all_reduce_max
from cepo.packing import pack_by_budget, pack_sequences, response_gather_index


@dataclass
class Responses:
    """The response tokens a rank trains on, flattened in canonical order."""

    response_ids: list[list[int]]   # per rollout
    offsets: list[int]              # start of each rollout's tokens on the flat axis
    targets: torch.Tensor           # [N] token ids

    @classmethod
    def of(cls, response_ids: list[list[int]]) -> "Responses":
        offsets, total = [], 0
        for ids in response_ids:
            offsets.append(total)
            total += len(ids)
        flat = [t for ids in response_ids for t in ids]
        return cls(response_ids, offsets, torch.tensor(flat, dtype=torch.long))

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())

    def positions(self, rollout_indices: list[int]) -> torch.Tensor:
        """Canonical token positions of the given rollouts, in that order."""
        parts = [torch.arange(self.offsets[i], self.offsets[i] + len(self.response_ids[i]))
                 for i in rollout_indices]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _micro_batches(contexts: list[list[int]], responses: Responses, token_budget: int,
                   device: torch.device):
    """Yield (rollout indices, PackedBatch, gather index) per micro-batch; None for padding."""
    seqs = [ctx + resp for ctx, resp in zip(contexts, responses.response_ids)]
    groups = pack_by_budget([len(s) for s in seqs], token_budget) if seqs else []
    count = all_reduce_max(len(groups), device)
    for k in range(count):
        if k >= len(groups):
            yield None
            continue
        members = groups[k]
        batch = pack_sequences([seqs[i] for i in members])
        index, _ = response_gather_index(batch, [len(contexts[i]) for i in members],
                                         [len(responses.response_ids[i]) for i in members])
        yield members, batch.to(device), index.to(device)


def _dummy(pad_id: int, device: torch.device):
    batch = pack_sequences([[pad_id, pad_id]]).to(device)
    return batch, torch.zeros(1, dtype=torch.long, device=device)


@torch.no_grad()
def hidden_states(policy, contexts: list[list[int]], responses: Responses, *, token_budget: int,
                  pad_id: int, device: torch.device) -> torch.Tensor:
    """[N, H] hidden states predicting each response token, under the given contexts."""
    out = None
    for item in _micro_batches(contexts, responses, token_budget, device):
        if item is None:
            policy(*_dummy(pad_id, device))
            continue
        members, batch, index = item
        h = policy(batch, index)
        if out is None:
            out = h.new_empty(responses.num_tokens, h.shape[1])
        out[responses.positions(members).to(device)] = h
    if out is None:  # this rank has no response tokens
        hdim = policy.base.config.hidden_size
        out = torch.zeros(0, hdim, device=device)
    return out


def head_weight(policy) -> torch.Tensor:
    """The LM head weight, unsharded (call inside ``unsharded(policy)``)."""
    return policy.head_weight()


class unsharded:
    """Context manager: FSDP2 root parameters (embeddings, norm, LM head) gathered."""

    def __init__(self, policy):
        self.policy = policy

    def __enter__(self):
        if hasattr(self.policy, "unshard"):
            self.policy.unshard()
        return self.policy

    def __exit__(self, *exc):
        if hasattr(self.policy, "reshard"):
            self.policy.reshard()


def evidence(policy, policy_ctx, pos_ctx, neg_ctx, responses: Responses, advantages: torch.Tensor,
             has_negative: torch.Tensor, *, lam: float, eps_w: float, temperature: float,
             token_budget: int, pad_id: int, device: torch.device) -> ck.Evidence:
    """DESIGN.md steps 2-5: three no-grad body passes, then one contrastive_evidence call."""
    kw = dict(token_budget=token_budget, pad_id=pad_id, device=device)
    h_pol = hidden_states(policy, policy_ctx, responses, **kw)
    h_pos = hidden_states(policy, pos_ctx, responses, **kw)
    h_neg = hidden_states(policy, neg_ctx, responses, **kw)
    with unsharded(policy), torch.no_grad():
        weight = head_weight(policy)
        return ck.contrastive_evidence(h_pol, h_pos, h_neg, weight, responses.targets.to(device),
                                       advantages.to(device), has_negative.to(device), lam=lam,
                                       eps_w=eps_w, temperature=temperature)


@torch.no_grad()
def policy_logprobs(policy, policy_ctx, responses: Responses, *, temperature: float,
                    token_budget: int, pad_id: int, device: torch.device) -> torch.Tensor:
    """[N] log-probs of the responses under the current policy (old log-probs for mini-batches)."""
    h = hidden_states(policy, policy_ctx, responses, token_budget=token_budget, pad_id=pad_id,
                      device=device)
    with unsharded(policy):
        return ck.fused_logprobs(h, head_weight(policy), responses.targets.to(device),
                                 temperature=temperature).logprobs


def ppo_update(policy, policy_ctx, responses: Responses, rollout_indices: list[int], *,
               token_advantages: torch.Tensor, old_logprobs: torch.Tensor | None,
               ref_logprobs: torch.Tensor | None, global_tokens: float, world_size: int,
               clip_low: float, clip_high: float, temperature: float, kl_coef: float,
               token_budget: int, pad_id: int, device: torch.device) -> dict:
    """Forward + backward of the fused PPO loss over the given rollouts (one mini-batch).

    The loss of each micro-batch is divided by the global number of tokens of the
    mini-batch (all ranks), so the summed gradient is the token mean over the whole
    mini-batch; FSDP2 averages gradients over ranks, hence the factor world_size.
    Returns summed statistics (weighted by tokens) for logging, and under "logprobs" the
    [N] log-probs of the responses' tokens under the weights before this update (NaN
    outside the given rollouts), from the loss forward at no extra cost.
    """
    contexts = [policy_ctx[i] for i in rollout_indices]
    picked = responses.positions(rollout_indices)
    local = Responses.of([responses.response_ids[i] for i in rollout_indices])
    adv = token_advantages.to(device)[picked.to(device)]
    old = old_logprobs.to(device)[picked.to(device)] if old_logprobs is not None else None
    ref = ref_logprobs.to(device)[picked.to(device)] if ref_logprobs is not None else None
    totals = dict(loss=0.0, clip_frac_low=0.0, clip_frac_high=0.0, approx_kl=0.0, ratio_mean=0.0,
                  entropy=0.0, tokens=0.0)
    logprobs = torch.full((responses.num_tokens,), float("nan"))
    for item in _micro_batches(contexts, local, token_budget, device):
        if item is None:
            batch, index = _dummy(pad_id, device)
            targets = torch.full((1,), pad_id, dtype=torch.long, device=device)
            none = torch.zeros(1, device=device)
            loss, _ = policy(batch, index, targets, ppo=dict(
                old_logprobs=None, token_advantages=none, mask=none.bool(), normalizer=1.0,
                temperature=temperature))
            (loss * world_size).backward()
            continue
        members, batch, index = item
        pos = local.positions(members).to(device)
        targets = local.targets.to(device)[pos]
        loss, stats = policy(batch, index, targets, ppo=dict(
            old_logprobs=old[pos] if old is not None else None, token_advantages=adv[pos],
            mask=torch.ones_like(targets, dtype=torch.bool), clip_low=clip_low,
            clip_high=clip_high, temperature=temperature, normalizer=global_tokens,
            ref_logprobs=ref[pos] if ref is not None else None, kl_coef=kl_coef,
            return_entropy=True))
        (loss * world_size).backward()
        logprobs[picked[pos.cpu()]] = stats.logprobs.detach().float().cpu()
        n = float(stats.num_tokens)
        totals["loss"] += float(loss.detach())
        totals["tokens"] += n
        for key in ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "entropy"):
            totals[key] += float(getattr(stats, key)) * n
    totals["logprobs"] = logprobs
    return totals
