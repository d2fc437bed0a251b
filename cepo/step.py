"""The model passes of one step: scoring contexts and the PPO update, on packed micro-batches.

Responses are the rows of a flat token axis (N response tokens of this rank, rollout
after rollout: the "canonical order"). A pass packs sequences (context + response) into
padding-free micro-batches of at most ``token_budget`` tokens, runs the policy body once
per micro-batch, and maps the rows back to canonical order. Every rank runs the same
number of micro-batches (FSDP2's collectives must match), padding with
``packing.padding_micro_batch``, which contributes nothing.

The teacher phase is ONE pass: every (context, response) sequence it needs (policy,
correct teacher, wrong teacher) is packed into the same set of micro-batches
(``context_hidden_states``), so the three contexts share micro-batches and FSDP2
all-gathers instead of paying them three times. Within a micro-batch a context shared by
several rollouts (a group's prompt, or its hinted teacher context) runs once, its
responses after it (cepo.shared_context), in the teacher phase and in the update alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import cepo_kernels as ck
from cepo.distributed import all_reduce_max
from cepo.model import supports_shared_contexts
from cepo.packing import pack_by_budget, pack_sequences, padding_micro_batch, response_gather_index
from cepo.shared_context import pack_shared_contexts, plan_shared_contexts, segment_sources


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


@dataclass
class Sequence:
    """One packed sequence: a context followed by rollout ``rollout``'s response."""

    context: list[int]
    rollout: int
    tag: str = ""


def micro_batches(sequences: list[Sequence], responses: Responses, token_budget: int,
                  device: torch.device, *, share_contexts: bool = False):
    """Yield, per micro-batch, (member indices into ``sequences``, PackedBatch, gather
    index [M] of the rows predicting the members' response tokens, in member order), or
    None for a padding turn. Every rank yields the same number of items (collective).

    share_contexts: sequences with identical contexts (a group's rollouts under one
    context) run that context once (cepo.shared_context); the model must support it
    (``cepo.model.supports_shared_contexts``). The hidden states are the same."""
    per_sequence = [responses.response_ids[s.rollout] for s in sequences]
    if share_contexts:
        plan = plan_shared_contexts([s.context for s in sequences],
                                    [len(r) for r in per_sequence], token_budget)
    else:
        full = [s.context + r for s, r in zip(sequences, per_sequence)]
        plan = pack_by_budget([len(f) for f in full], token_budget) if full else []
    count = all_reduce_max(len(plan), device)
    for k in range(count):
        if k >= len(plan):
            yield None
            continue
        if share_contexts:
            batch, index, members = pack_shared_contexts(plan[k], per_sequence)
        else:
            members = plan[k]
            batch = pack_sequences([full[i] for i in members])
            index, _ = response_gather_index(batch, [len(sequences[i].context) for i in members],
                                             [len(per_sequence[i]) for i in members])
        yield members, batch.to(device), index.to(device)


def _padding_turn(pad_id: int, device: torch.device):
    batch, index, targets = padding_micro_batch(pad_id)
    return batch.to(device), index.to(device), targets.to(device)


class PassImages:
    """The images of a pass over a vision-language policy: one ``ImageInputs`` (or None)
    per rollout, shared by all of the rollout's contexts. When the vision tower is frozen
    (or the pass has no gradient) the distinct images are encoded ONCE for the whole
    pass, every rank calling the tower once (``encoded``); a trainable tower runs per
    micro-batch instead, on that micro-batch's distinct images (``encoded`` None).

    cache: a dict kept for one step (``image_cache`` of the step functions): the first
    pass of a model encodes, its later passes in the step reuse the embeddings, so a
    frozen tower runs once per step. Every rank decides alike (a rank's later passes
    use a subset of its first pass's images), so the tower's collectives match."""

    def __init__(self, policy, per_rollout: list, *, precompute: bool,
                 cache: dict | None = None):
        self.per_rollout = per_rollout
        self.encoded = None
        if precompute:
            keys = {im.key for im in per_rollout if im is not None}
            cached = cache.get(id(policy)) if cache is not None else None
            if cached is not None and keys <= cached.keys():
                self.encoded = cached  # this step's first pass encoded them (every rank)
                return
            with torch.no_grad():
                self.encoded = policy(None, None, encode=[im for im in per_rollout
                                                          if im is not None])
            if cache is not None:
                cache[id(policy)] = self.encoded

    def kwargs(self, rollouts: list[int]) -> dict:
        """Keyword arguments of the policy forward for sequences of these rollouts."""
        return dict(images=[self.per_rollout[r] for r in rollouts], encoded=self.encoded)

    def padding_kwargs(self) -> dict:
        return dict(images=None, encoded=self.encoded)


def _vision_trainable(policy) -> bool:
    from cepo.vision import vision_tower
    return any(p.requires_grad for p in vision_tower(policy.base).parameters())


def _pass_images(policy, images, *, grad: bool, cache: dict | None = None) -> PassImages | None:
    if images is None:
        return None
    return PassImages(policy, images, precompute=not (grad and _vision_trainable(policy)),
                      cache=cache)


@torch.no_grad()
def context_hidden_states(policy, contexts: dict[str, list[list[int] | None]],
                          responses: Responses, *, token_budget: int, pad_id: int,
                          device: torch.device, images: list | None = None,
                          image_cache: dict | None = None) -> dict[str, torch.Tensor]:
    """[N, H] hidden states predicting each response token, per named context, from ONE
    packed pass over all (context, response) sequences.

    contexts: name -> one context (token ids) per rollout, or None where that rollout
    does not need this context (its rows stay 0). Every name gets an [N, H] tensor in
    canonical order. Identical contexts (a group's rollouts) run once per micro-batch,
    their responses after them (cepo.shared_context), for policies on SDPA.
    images (vision-language policies): one ``cepo.vision.ImageInputs`` (or None) per
    rollout, the same for every context of the rollout; each distinct image is encoded
    once for the whole pass, or once per step with ``image_cache`` (``PassImages``).
    """
    sequences = [Sequence(ctx, i, name) for name, per_rollout in contexts.items()
                 for i, ctx in enumerate(per_rollout) if ctx is not None]
    out: dict[str, torch.Tensor] = {}
    hdim = policy.base.config.get_text_config().hidden_size
    vis = _pass_images(policy, images, grad=False, cache=image_cache)
    share = supports_shared_contexts(policy.base)
    for item in micro_batches(sequences, responses, token_budget, device, share_contexts=share):
        if item is None:
            batch, index, _ = _padding_turn(pad_id, device)
            policy(batch, index, **(vis.padding_kwargs() if vis else {}))
            continue
        members, batch, index = item
        extra = (vis.kwargs([sequences[j].rollout for j in segment_sources(batch, members)])
                 if vis else {})
        h = policy(batch, index, **extra)
        if not out:
            out = {name: h.new_zeros(responses.num_tokens, hdim) for name in contexts}
        start = 0
        for j in members:
            seq = sequences[j]
            n = len(responses.response_ids[seq.rollout])
            first = responses.offsets[seq.rollout]
            out[seq.tag][first:first + n] = h[start:start + n]
            start += n
    if not out:  # this rank has no response tokens
        out = {name: torch.zeros(responses.num_tokens, hdim, device=device) for name in contexts}
    return out


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


def evidence(policy, contexts: dict[str, list[list[int] | None]], responses: Responses,
             advantages: torch.Tensor, has_negative: torch.Tensor, *, lam: float, eps_w: float,
             temperature: float, token_budget: int, pad_id: int,
             device: torch.device, teacher=None, images: list | None = None,
             image_cache: dict | None = None) -> ck.Evidence:
    """docs/algorithm.md steps 2-5: one packed no-grad pass over the contexts the step
    needs, then one contrastive_evidence call.

    contexts: "policy", "pos" and "neg", each one context per rollout or None where not
    needed: a rollout whose group has a wrong answer (has_negative) needs no policy
    context unless the caller wants ``lp_policy`` for it (old log-probs for several
    mini-batches); one without needs no "neg". Rows not computed are 0 in the hidden
    states, so ``lp_policy`` / ``lp_neg`` there are meaningless and unused.
    teacher: the model that scores "pos" and "neg" (``cepo.teacher``; None: the policy,
    one pass); "policy" is always scored by the policy.
    """
    if teacher is not None and teacher is not policy:
        return _evidence_with_teacher(
            policy, teacher, contexts, responses, advantages, has_negative, lam=lam,
            eps_w=eps_w, temperature=temperature, token_budget=token_budget, pad_id=pad_id,
            device=device)
    h = context_hidden_states(policy, contexts, responses, token_budget=token_budget,
                              pad_id=pad_id, device=device, images=images,
                              image_cache=image_cache)
    with unsharded(policy), torch.no_grad():
        weight = policy.head_weight()
        h = {k: v.to(weight.dtype) for k, v in h.items()}
        return ck.contrastive_evidence(h["policy"], h["pos"], h["neg"], weight,
                                       responses.targets.to(device), advantages.to(device),
                                       has_negative.to(device), lam=lam, eps_w=eps_w,
                                       temperature=temperature)


def _head_logprobs(model, h: torch.Tensor, targets: torch.Tensor, temperature: float):
    with unsharded(model), torch.no_grad():
        weight = model.head_weight()
        return ck.fused_logprobs(h.to(weight.dtype), weight, targets,
                                 temperature=temperature).logprobs.float()


def _evidence_with_teacher(policy, teacher, contexts, responses: Responses,
                           advantages: torch.Tensor, has_negative: torch.Tensor, *, lam: float,
                           eps_w: float, temperature: float, token_budget: int, pad_id: int,
                           device: torch.device) -> ck.Evidence:
    """``evidence`` with the teacher contexts on other weights: one packed pass of the
    teacher over "pos" + "neg" and one of the policy over "policy", each through its own
    LM head, then the same epilogue (steps 3-5) as the contrastive_evidence kernel."""
    from cepo_kernels._math import evidence_epilogue

    kw = dict(token_budget=token_budget, pad_id=pad_id, device=device)
    h_t = context_hidden_states(teacher, {"pos": contexts["pos"], "neg": contexts["neg"]},
                                responses, **kw)
    h_p = context_hidden_states(policy, {"policy": contexts["policy"]}, responses, **kw)
    targets = responses.targets.to(device)
    lp_pos = _head_logprobs(teacher, h_t["pos"], targets, temperature)
    lp_neg = _head_logprobs(teacher, h_t["neg"], targets, temperature)
    lp_pol = _head_logprobs(policy, h_p["policy"], targets, temperature)
    with torch.no_grad():
        delta, token_adv, clipped = evidence_epilogue(
            lp_pol, lp_pos, lp_neg, advantages.to(device), has_negative.to(device),
            targets != ck.IGNORE_INDEX, lam=lam, eps_w=eps_w)
    return ck.Evidence(lp_pol, lp_pos, lp_neg, delta, token_adv, clipped)


@torch.no_grad()
def policy_logprobs(policy, policy_ctx: list[list[int]], responses: Responses, *,
                    temperature: float, token_budget: int, pad_id: int,
                    device: torch.device, images: list | None = None,
                    image_cache: dict | None = None) -> torch.Tensor:
    """[N] log-probs of the responses under ``policy`` (old log-probs, or a reference)."""
    h = context_hidden_states(policy, {"policy": policy_ctx}, responses,
                              token_budget=token_budget, pad_id=pad_id, device=device,
                              images=images, image_cache=image_cache)["policy"]
    with unsharded(policy):
        weight = policy.head_weight()
        return ck.fused_logprobs(h.to(weight.dtype), weight, responses.targets.to(device),
                                 temperature=temperature).logprobs


UPDATE_STATS = ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "entropy")
"""Per-token means the fused PPO loss reports, logged per step (token-weighted)."""


@dataclass
class UpdateResult:
    """One mini-batch's update on this rank: its loss share (the ranks' shares add up to
    the mini-batch's token mean), token-weighted statistic sums, and the [N] log-probs of
    the responses under the weights before this update (NaN outside the mini-batch).
    ``stat_tokens``: the tokens the PPO statistics were summed over; ``distill_loss``: this
    rank's share of the weighted self-distillation term (OPSD / SDPO), included in ``loss``."""

    loss: float
    tokens: float
    stat_sums: dict[str, float]
    logprobs: torch.Tensor
    stat_tokens: float = 0.0
    distill_loss: float = 0.0


@dataclass
class DistillSpec:
    """What OPSD / SDPO add to an update: the self-teacher's hidden states and which tokens
    are distilled (docs/algorithm.md, "OPSD and SDPO"). Tensors are [N] / [N, H] in
    canonical order, like the token advantages."""

    teacher_hidden: torch.Tensor     # [N, H], no grad (context_hidden_states)
    distilled: torch.Tensor          # [N] bool: token of a rollout that has a teacher
    pg_mask: torch.Tensor            # [N] bool: token of a rollout with A != 0 (PPO term)
    normalizer: float                # global distilled tokens (sequences for loss_agg seq)
    coef: float                      # distill_coef
    pg_coef: float                   # distill_pg_coef (0: no PPO term)
    divergence: str
    beta: float
    token_weights: torch.Tensor | None = None  # [N] (loss_agg seq: 1 / length)


def ppo_update(policy, policy_ctx, responses: Responses, rollout_indices: list[int], *,
               token_advantages: torch.Tensor, old_logprobs: torch.Tensor | None,
               ref_logprobs: torch.Tensor | None, global_tokens: float, world_size: int,
               clip_low: float, clip_high: float, temperature: float, kl_coef: float,
               token_budget: int, pad_id: int, device: torch.device,
               token_weights: torch.Tensor | None = None, clip_dual: float | None = None,
               distill: DistillSpec | None = None, images: list | None = None,
               image_cache: dict | None = None) -> UpdateResult:
    """Forward + backward of the fused PPO loss over the given rollouts (one mini-batch).

    The loss of each micro-batch is divided by the global number of tokens of the
    mini-batch (all ranks), so the summed gradient is the token mean over the whole
    mini-batch; FSDP2 averages gradients over ranks, hence the factor world_size.
    ``token_weights`` [N] (loss_agg seq: 1 / the rollout's length, with ``global_tokens``
    then the global number of sequences) and ``clip_dual`` go to fused_linear_ppo_loss
    when given. ``distill`` (OPSD / SDPO): the self-distillation loss on the same student
    forward, plus the PPO term weighted by its pg_coef when that is > 0.
    images: as in ``context_hidden_states`` (one per rollout of ``policy_ctx``). A
    group's rollouts share their prompt's forward as in ``context_hidden_states``; the
    prompt's activations then receive the sum of their responses' gradients.
    """
    picked = responses.positions(rollout_indices)
    local = Responses.of([responses.response_ids[i] for i in rollout_indices])
    sequences = [Sequence(policy_ctx[i], k) for k, i in enumerate(rollout_indices)]
    on = picked.to(device)
    adv = token_advantages.to(device)[on]
    old = old_logprobs.to(device)[on] if old_logprobs is not None else None
    ref = ref_logprobs.to(device)[on] if ref_logprobs is not None else None
    weights = token_weights.to(device)[on] if token_weights is not None else None
    stat_names = UPDATE_STATS + (("clip_frac_dual",) if clip_dual is not None else ())
    result = UpdateResult(0.0, 0.0, {k: 0.0 for k in stat_names},
                          torch.full((responses.num_tokens,), float("nan")))
    # all of the rank's images (not only this mini-batch's): the step's first pass then
    # encodes the same set on every mini-batch split, and later ones reuse it alike
    vis = _pass_images(policy, images, grad=True, cache=image_cache)
    share = supports_shared_contexts(policy.base)
    for item in micro_batches(sequences, local, token_budget, device, share_contexts=share):
        if item is None:  # zero weight on the one token: loss exactly 0, zero gradients
            batch, index, targets = _padding_turn(pad_id, device)
            none = torch.zeros(1, device=device)
            loss, _ = policy(batch, index, targets, ppo=dict(
                old_logprobs=None, token_advantages=none, mask=none.bool(), normalizer=1.0,
                temperature=temperature), **(vis.padding_kwargs() if vis else {}))
            (loss * world_size).backward()
            continue
        members, batch, index = item
        pos = local.positions([sequences[j].rollout for j in members]).to(device)
        targets = local.targets.to(device)[pos]
        ppo = dict(
            old_logprobs=old[pos] if old is not None else None, token_advantages=adv[pos],
            mask=torch.ones_like(targets, dtype=torch.bool), clip_low=clip_low,
            clip_high=clip_high, temperature=temperature, normalizer=global_tokens,
            ref_logprobs=ref[pos] if ref is not None else None, kl_coef=kl_coef,
            return_entropy=True)
        if weights is not None:
            ppo["token_weights"] = weights[pos]
        if clip_dual is not None:
            ppo["clip_dual"] = clip_dual
        image_kwargs = (vis.kwargs([rollout_indices[sequences[j].rollout]
                                    for j in segment_sources(batch, members)]) if vis else {})
        if distill is None:
            loss, stats = policy(batch, index, targets, ppo=ppo, **image_kwargs)
            logprobs = stats.logprobs
        else:
            out = _distill_forward(policy, batch, index, targets, ppo, distill, on[pos],
                                   temperature, image_kwargs)
            loss, stats, logprobs = out.loss, out.ppo_stats, out.distill_stats.logprobs
            result.distill_loss += float(out.distill_loss)
        (loss * world_size).backward()
        result.logprobs[picked[pos.cpu()]] = logprobs.detach().float().cpu()
        result.loss += float(loss.detach())
        result.tokens += float(targets.numel())
        if stats is None:  # no PPO term (pure self-distillation): no PPO statistics
            continue
        n = float(stats.num_tokens)
        result.stat_tokens += n
        for key in stat_names:
            result.stat_sums[key] += float(getattr(stats, key)) * n
    return result


def _distill_forward(policy, batch, index, targets, ppo: dict, spec: DistillSpec,
                     rows: torch.Tensor, temperature: float, image_kwargs: dict):
    """One micro-batch of OPSD / SDPO through the root forward: a ``SelfDistillOutput``.
    ``rows``: the micro-batch's tokens on the canonical axis."""
    device = targets.device
    distill = dict(
        h_teacher=spec.teacher_hidden.to(device)[rows], coef=spec.coef,
        mask=spec.distilled.to(device)[rows], divergence=spec.divergence, beta=spec.beta,
        temperature=temperature, normalizer=spec.normalizer,
        token_weights=(spec.token_weights.to(device)[rows]
                       if spec.token_weights is not None else None))
    if spec.pg_coef > 0:
        ppo = dict(ppo, mask=spec.pg_mask.to(device)[rows], coef=spec.pg_coef)
    else:
        ppo = None
    return policy(batch, index, targets, ppo=ppo, distill=distill, **image_kwargs)
