"""cepo.integrations.trl: CEPOGRPOTrainer against TRL's own GRPOTrainer, and CEPO's token
advantages against cepo's pieces, on the shipped tiny model (CPU, fp32)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'cepo[trl]'); "
                                        "the TRL adapter tests need it")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import cepo_kernels as ck  # noqa: E402
from cepo.algorithms import group_advantages, lambda_at  # noqa: E402
from cepo.answers import extract_boxed  # noqa: E402
from cepo.arithmetic import make_split  # noqa: E402
from cepo.contexts import build_contexts, choose_wrong_answers  # noqa: E402
from cepo.integrations.trl import CEPOGRPOTrainer  # noqa: E402
from cepo_kernels import chunked  # noqa: E402
from test_kernels_contract import LargestTensor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "cepo" / "assets" / "tiny-arith"
G = 4


def _zero_reward(completions, **_):
    return [0.0] * len(completions)


def _dataset(n=4):
    rows = make_split("train", n, 0)
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "answer": r["answer"]} for r in rows])


def _config(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=G,
                max_completion_length=48, report_to="none", save_strategy="no", use_cpu=True,
                bf16=False, logging_steps=1, max_steps=1, seed=0, disable_tqdm=True,
                gradient_checkpointing=False)
    base.update(overrides)
    return GRPOConfig(**base)


def _trainer(cls, model, tokenizer, tmp_path, reward=_zero_reward, cepo=None, **overrides):
    extra = cepo or {}
    return cls(model=model, processing_class=tokenizer, reward_funcs=reward,
               args=_config(tmp_path, **overrides), train_dataset=_dataset(), **extra)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    return model, tokenizer


def _batch(vocab, *, batch=8, prompt_len=7, length=13, seed=0, with_is_ratio=False,
           with_tool_mask=False):
    """A TRL training batch on random tokens: left-padded prompts, right-padded
    completions of varied lengths, advantages of both signs, off-policy old log-probs
    (so both clip sides bind) and reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(5, vocab, (batch, prompt_len), generator=g)
    prompt_mask = torch.ones(batch, prompt_len, dtype=torch.long)
    for i in range(batch):
        prompt_mask[i, : i % 3] = 0
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = torch.randint(5, vocab, (batch, length), generator=g)
    lengths = torch.tensor([length - (i * 3) % length for i in range(batch)])
    lengths[-1] = 0  # one empty completion
    completion_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    out = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
           "completion_mask": completion_mask,
           "advantages": torch.randn(batch, generator=g),
           "num_items_in_batch": completion_mask.sum() * 2}
    return out, g


def _with_logps(batch, trainer, g, *, with_is_ratio=False, with_tool_mask=False):
    """Old / reference log-probs near the current ones (ratios around the clip range)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        lp, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, attn, batch["completion_ids"].shape[1])
    batch = dict(batch)
    batch["old_per_token_logps"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
    batch["ref_per_token_logps"] = lp + 0.5 * torch.randn(lp.shape, generator=g)
    if with_is_ratio:
        batch["importance_sampling_ratio"] = torch.rand(lp.shape, generator=g) * 2
    if with_tool_mask:
        batch["tool_mask"] = (torch.rand(lp.shape, generator=g) > 0.2).long()
    return batch


def _loss_and_grads(trainer, batch, accumulation=2):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = accumulation
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
             if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.detach(), grads, metrics


CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo"),
    dict(loss_type="dapo"),
    dict(loss_type="grpo", epsilon=0.1, epsilon_high=0.1),
    dict(loss_type="bnpo", beta=0.04),
    dict(loss_type="dr_grpo", beta=0.04, epsilon=0.15, epsilon_high=0.3),
    dict(loss_type="dapo", beta=0.04, temperature=0.7),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="bnpo", beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradients_equal_trl(tiny, tmp_path, case):
    model, tokenizer = tiny
    ours = _trainer(CEPOGRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path / "a", **case)
    theirs = _trainer(GRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path / "b", **case)
    batch, g = _batch(model.config.vocab_size)
    batch = _with_logps(batch, theirs, g)
    if case.get("beta", 0.0) == 0.0:
        batch.pop("ref_per_token_logps")
    loss_a, grads_a, metrics_a = _loss_and_grads(ours, batch)
    loss_b, grads_b, metrics_b = _loss_and_grads(theirs, batch)
    assert max(gr.abs().max() for gr in grads_b.values()) > 1e-3  # a batch that says something
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-5, msg=name)
    # TRL's metrics for these loss types, from the kernel's detached log-probs
    assert metrics_b["clip_ratio/region_mean"] > 0  # clipping binds in this batch
    for key in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max") + (("kl",) if "beta" in case else ()):
        assert metrics_a[key] == pytest.approx(metrics_b[key], abs=1e-5), key


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_on_policy_vllm_ratio_and_tool_mask_equal_trl(tiny, tmp_path, loss_type):
    """No old log-probs (ratio 1, TRL's default single-iteration case), token-level vLLM
    importance-sampling ratios and a tool mask."""
    model, tokenizer = tiny
    ours = _trainer(CEPOGRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path / "a",
                    loss_type=loss_type)
    theirs = _trainer(GRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path / "b",
                      loss_type=loss_type)
    batch, g = _batch(model.config.vocab_size, seed=1)
    batch = _with_logps(batch, theirs, g, with_is_ratio=True, with_tool_mask=True)
    batch.pop("old_per_token_logps")
    batch.pop("ref_per_token_logps")
    for t in (ours, theirs):  # what GRPOConfig(use_vllm=True, vllm_importance_sampling_correction=True) sets
        t.use_vllm, t.vllm_importance_sampling_correction = True, True
    loss_a, grads_a, _ = _loss_and_grads(ours, batch, accumulation=1)
    loss_b, grads_b, _ = _loss_and_grads(theirs, batch, accumulation=1)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-5, msg=name)


def test_lora_loss_and_gradients_equal_trl(tiny, tmp_path):
    """A PEFT (LoRA) policy: the body call keeps the adapters, gradients reach them alike."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model, tokenizer = tiny
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ours = CEPOGRPOTrainer(model=copy.deepcopy(model), processing_class=tokenizer,
                           reward_funcs=_zero_reward, args=_config(tmp_path / "a", beta=0.04),
                           train_dataset=_dataset(), peft_config=peft.LoraConfig(**lora))
    theirs = GRPOTrainer(model=copy.deepcopy(model), processing_class=tokenizer,
                         reward_funcs=_zero_reward, args=_config(tmp_path / "b", beta=0.04),
                         train_dataset=_dataset(), peft_config=peft.LoraConfig(**lora))
    torch.manual_seed(0)
    for a, b in zip(ours.model.parameters(), theirs.model.parameters()):  # same adapter weights
        with torch.no_grad():
            a.copy_(b)
    batch, g = _batch(model.config.vocab_size, seed=3)
    batch = _with_logps(batch, theirs, g)
    loss_a, grads_a, _ = _loss_and_grads(ours, batch)
    loss_b, grads_b, _ = _loss_and_grads(theirs, batch)
    assert grads_b and all("lora" in name for name in grads_b)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("cast_head", [False, True], ids=["bf16-head", "fp32-head"])
def test_bf16_model_matches_trl(tiny, tmp_path, cast_head):
    """A bf16 policy, with and without TRL's cast_lm_head_to_fp32 (an fp32 head under a
    bf16 body): same loss and gradients as TRL's own path to bf16 accuracy."""
    model, tokenizer = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    kw = dict(loss_type="dapo", cast_lm_head_to_fp32=cast_head)
    ours = _trainer(CEPOGRPOTrainer, copy.deepcopy(bf16), tokenizer, tmp_path / "a", **kw)
    theirs = _trainer(GRPOTrainer, copy.deepcopy(bf16), tokenizer, tmp_path / "b", **kw)
    assert ours.model.lm_head.weight.dtype == (torch.float32 if cast_head else torch.bfloat16)
    batch, g = _batch(model.config.vocab_size, seed=4)
    batch = _with_logps(batch, theirs, g)
    batch.pop("ref_per_token_logps")
    loss_a, grads_a, _ = _loss_and_grads(ours, batch)
    loss_b, grads_b, _ = _loss_and_grads(theirs, batch)
    # the same weights in fp32 through TRL: the fused path is as close to it as TRL's own
    exact = _trainer(GRPOTrainer, copy.deepcopy(bf16).float(), tokenizer, tmp_path / "c", **kw)
    loss_x, grads_x, _ = _loss_and_grads(exact, batch)
    assert abs(loss_a - loss_x) <= 1.5 * abs(loss_b - loss_x) + 2e-3
    assert grads_a.keys() == grads_b.keys() == grads_x.keys()

    def error(grads):
        return sum(float((grads[n].float() - grads_x[n]).norm() ** 2) for n in grads_x) ** 0.5

    scale = sum(float(grads_x[n].norm() ** 2) for n in grads_x) ** 0.5
    assert error(grads_a) <= 1.5 * error(grads_b) + 1e-3 * scale
    assert error(grads_a) <= 3e-2 * scale


def test_logprobs_and_entropies_equal_trl(tiny, tmp_path):
    model, tokenizer = tiny
    ours = _trainer(CEPOGRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path / "a",
                    temperature=0.8)
    theirs = _trainer(GRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path / "b",
                      temperature=0.8)
    batch, _ = _batch(model.config.vocab_size, seed=2)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    t = batch["completion_ids"].shape[1]
    with torch.no_grad():
        lp_a, ent_a, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, attn, t,
                                                                 batch_size=3, compute_entropy=True)
        lp_b, ent_b, _ = theirs._get_per_token_logps_and_entropies(theirs.model, ids, attn, t,
                                                                   batch_size=3, compute_entropy=True)
    m = batch["completion_mask"].bool()
    torch.testing.assert_close(lp_a[m], lp_b[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_a[m], ent_b[m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setting", [dict(loss_type="sapo"), dict(loss_type="cispo"),
                                     dict(importance_sampling_level="sequence", loss_type="grpo"),
                                     dict(top_entropy_quantile=0.5), dict(delta=2.0)])
def test_unsupported_settings_raise(tiny, tmp_path, setting):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="trl.GRPOTrainer"):
        _trainer(CEPOGRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path, **setting)


def test_bad_cepo_argument_names_the_field(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="cepo_lambda0"):
        _trainer(CEPOGRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path,
                 cepo={"cepo_lambda0": 1.5})


# ---- CEPO -----------------------------------------------------------------------------

PATTERN = [1.0, 0.0, 0.0, 1.0,    # mixed: wrong answer from a rejected rollout
           1.0, 1.2, 1.0, 1.0,    # all correct, not flat: A != 0, RLSD fallback
           0.0, 0.0, 0.0, 0.0]    # flat: A = 0, no teacher pass


def _pattern_reward(completions, **_):
    return [PATTERN[i % len(PATTERN)] for i in range(len(completions))]


def test_cepo_token_advantages_equal_cepo_pieces(tiny, tmp_path):
    """Token advantages of a real TRL rollout batch equal those built independently from
    group_advantages + choose_wrong_answers + build_contexts + contrastive_evidence
    (reference backend, float64 logits) with the hidden states of unpadded sequences."""
    model, tokenizer = tiny
    lam0, t_warm, eps_w = 0.5, 10, 0.2
    trainer = _trainer(CEPOGRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path,
                       reward=_pattern_reward, per_device_train_batch_size=12,
                       cepo={"cepo_lambda0": lam0, "cepo_t_warm": t_warm, "cepo_eps_w": eps_w})
    trainer.model.train()
    trainer.state.global_step = 3
    rows = [dict(r) for r in _dataset(3)]
    inputs = [r for r in rows for _ in range(G)]
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(inputs)
    token_adv = out["advantages"]
    assert token_adv.shape == out["completion_ids"].shape

    # independently, from cepo's pieces
    cmask = out["completion_mask"].bool()
    responses = [ids[m].tolist() for ids, m in zip(out["completion_ids"], cmask)]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rewards = torch.tensor(PATTERN).view(-1, G)
    adv = group_advantages(rewards, eps=1e-4).flatten()  # TRL's epsilon
    groups = [[{"answer": extract_boxed(texts[g * G + i]), "reward": PATTERN[g * G + i],
                "correct": PATTERN[g * G + i] >= 1.0} for i in range(G)] for g in range(3)]
    golds = [r["answer"] for r in rows]
    wrong = choose_wrong_answers(groups, "worst", gold_answers=golds)
    assert wrong[0] is not None and wrong[1] is None  # a wrong-answer group and an RLSD one
    policy, pos, neg = build_contexts(tokenizer, [r["prompt"][0]["content"] for r in rows],
                                      golds, wrong)
    trl_policy = [ids[m.bool()].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"])]
    assert trl_policy == [policy[i // G] for i in range(3 * G)]  # TRL and cepo render alike
    lam = lambda_at(3, algo="cepo", lam0=lam0, t_warm=t_warm, schedule="linear")

    body, weight = trainer.model.model, trainer.model.lm_head.weight

    def states(ctx, resp):
        ids = torch.tensor([ctx + resp])
        with torch.no_grad():
            h = body(input_ids=ids, use_cache=False).last_hidden_state[0]
        return h[len(ctx) - 1: len(ctx) - 1 + len(resp)]

    checked = 0
    for i in range(3 * G):
        g, resp = i // G, responses[i]
        if adv[i] == 0 or not resp:
            torch.testing.assert_close(token_adv[i][cmask[i]], torch.full((len(resp),), float(adv[i])),
                                       atol=1e-5, rtol=0)
            continue
        h_pol, h_pos = states(policy[g], resp), states(pos[g], resp)
        h_neg = states(neg[g], resp) if neg[g] is not None else h_pos
        y = torch.tensor(resp)
        ev = ck.contrastive_evidence(
            h_pol.double(), h_pos.double(), h_neg.double(), weight.double(), y,
            torch.full((len(resp),), float(adv[i]), dtype=torch.float64),
            torch.full((len(resp),), neg[g] is not None), lam=lam, eps_w=eps_w,
            backend="reference")
        torch.testing.assert_close(token_adv[i][cmask[i]], ev.token_advantages.float(),
                                   atol=1e-5, rtol=1e-5)
        checked += 1
    assert checked >= 4  # the mixed and the RLSD-fallback groups were compared
    # the token weights really move the advantages away from A
    assert not torch.allclose(token_adv[:G][cmask[:G]],
                              adv[:G, None].expand(G, token_adv.shape[1])[cmask[:G]])


def test_cepo_token_advantages_equal_cepo_train_step(tiny, tmp_path, monkeypatch):
    """The same rollouts through cepo.train's own step code (sample_groups with a sampler
    and a verifier that replay TRL's completions and rewards, train_items, then
    cepo.train.score_evidence: one packed pass, the chunked kernels) give the token
    advantages the TRL adapter computed, row for row."""
    import functools
    from types import SimpleNamespace

    from cepo import rollout as cepo_rollout
    from cepo.answers import extract_answer
    from cepo.contexts import render_prompt
    from cepo.data import Example
    from cepo.policy import FusedHeadPolicy
    from cepo.rollout import sample_groups, train_items
    from cepo.sampler import SamplingParams
    from cepo.sampler.base import Completion
    from cepo.step import Responses
    from cepo.step_metrics import StepMetrics
    from cepo.train import score_evidence
    from cepo.verifier import Score

    model, tokenizer = tiny
    lam0, t_warm, eps_w, step = 0.5, 10, 0.2, 3
    trainer = _trainer(CEPOGRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path,
                       reward=_pattern_reward, per_device_train_batch_size=12,
                       cepo={"cepo_lambda0": lam0, "cepo_t_warm": t_warm, "cepo_eps_w": eps_w})
    trainer.model.train()
    trainer.state.global_step = step
    rows = [dict(r) for r in _dataset(3)]
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([r for r in rows for _ in range(G)])
    cmask = out["completion_mask"].bool()
    trl_responses = [ids[m].tolist() for ids, m in zip(out["completion_ids"], cmask)]
    eos = tokenizer.eos_token_id

    class Replay:  # the sampler cepo.train would have called, returning TRL's completions
        def generate(self, prompt_ids, n, params, seeds=None, on_prompt_done=None):
            assert n == G and len(prompt_ids) == 3
            groups = []
            for g in range(3):
                group = []
                for i in range(G):
                    ids = trl_responses[g * G + i]
                    stop = bool(ids) and ids[-1] == eos
                    body = ids[:-1] if stop else ids
                    group.append(Completion(g, body, tokenizer.decode(body, skip_special_tokens=True),
                                            "stop" if stop else "length",
                                            stop_token_id=eos if stop else None))
                groups.append(group)
            return groups

    class Verifier:  # TRL's rewards, as cepo's verifier reports them (groups in order)
        done = 0

        def score(self, texts, answers):
            first, self.done = self.done, self.done + len(texts)
            return [Score(PATTERN[i], PATTERN[i] >= 1.0, "ok" if PATTERN[i] >= 1.0 else "wrong",
                          extract_answer(t, "boxed")) for i, t in enumerate(texts, first)]

    # TRL normalises by std + 1e-4, cepo by std + 1e-6: give cepo TRL's epsilon
    monkeypatch.setattr(cepo_rollout, "group_advantages",
                        functools.partial(cepo_rollout.group_advantages, eps=1e-4))
    examples = [Example(r["prompt"][0]["content"], r["answer"], "trl") for r in rows]
    groups = sample_groups(examples, [render_prompt(tokenizer, e.prompt) for e in examples],
                           [0, 1, 2], sampler=Replay(), verifier=Verifier(), group_size=G,
                           params=SamplingParams(max_new_tokens=48), std_normalize=True,
                           wrong_answer_strategy="worst", find_wrong_answers=True)
    assert groups.wrong_answers[0] is not None and groups.wrong_answers[1] is None
    items = train_items(groups, build_contexts=functools.partial(build_contexts, tokenizer),
                        with_teachers=True, algo="cepo")
    kept = [i for i, r in enumerate(groups.rollouts) if r.advantage != 0.0 and r.response_ids]
    assert len(kept) >= 4
    run = SimpleNamespace(
        cfg=SimpleNamespace(mini_batches=1, eps_w=eps_w, temperature=1.0, token_budget=256),
        policy=FusedHeadPolicy(copy.deepcopy(model)).eval(), tokenizer=tokenizer,
        info=SimpleNamespace(device=torch.device("cpu")), teacher=None,
        images=lambda items: {})  # the policy scores the teachers; a text model
    lam = lambda_at(step, algo="cepo", lam0=lam0, t_warm=t_warm, schedule="linear")
    resp = Responses.of([it.response_ids for it in items])
    ev = score_evidence(run, items, resp, lam, StepMetrics())
    for k, i in enumerate(kept):
        n = len(items[k].response_ids)
        first = resp.offsets[k]
        torch.testing.assert_close(out["advantages"][i][cmask[i]],
                                   ev.token_advantages[first:first + n].float(),
                                   atol=2e-5, rtol=2e-5)
    # rollouts the step skips (A = 0) keep their sequence advantage, 0, in TRL too
    for i in set(range(3 * G)) - set(kept):
        assert torch.all(out["advantages"][i][cmask[i]] == 0)


def test_cepo_off_after_warmup_keeps_sequence_advantages(tiny, tmp_path):
    model, tokenizer = tiny
    trainer = _trainer(CEPOGRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path,
                       reward=_pattern_reward, per_device_train_batch_size=12,
                       cepo={"cepo_lambda0": 0.5, "cepo_t_warm": 2})
    trainer.model.train()
    trainer.state.global_step = 2  # lambda = 0 from t_warm on: GRPO exactly
    out = trainer._generate_and_score_completions([dict(r) for r in _dataset(3) for _ in range(G)])
    assert out["advantages"].dim() == 1


# ---- memory: no [tokens x vocab] tensor ---------------------------------------------------

def test_loss_never_materialises_logits(tiny, tmp_path, monkeypatch):
    """A wider-vocabulary random model; the largest tensor produced while computing the
    fused loss and its backward stays far below [tokens x vocab]."""
    import transformers

    _, tokenizer = tiny
    vocab, hidden = 4000, 16
    config = transformers.Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 1 << 16)
    monkeypatch.setattr(chunked, "MAX_VOCAB_TILE", 1000, raising=False)  # older engines tile V too
    trainer = _trainer(CEPOGRPOTrainer, model, tokenizer, tmp_path, loss_type="dapo",
                       cepo={"kernels_backend": "torch"})
    batch, g = _batch(vocab, batch=8, prompt_len=8, length=64)
    n = int(batch["completion_ids"].numel())
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with LargestTensor() as rec:
        trainer._compute_loss(trainer.model, batch).backward()
    assert rec.largest < n * vocab // 4
    assert rec.largest <= max(1 << 16, vocab * hidden, 8 * 2 * 72 * 72)  # a tile, dW, attention
    # the recorder sees a materialised [N, V] (the reference backend does that)
    trainer.kernels_backend = "reference"
    with LargestTensor() as rec_ref:
        trainer._compute_loss(trainer.model, batch)
    assert rec_ref.largest >= n * vocab


# ---- the example ----------------------------------------------------------------------------

@pytest.mark.parametrize("accumulation", [1, 2])
def test_example_runs_two_steps(tmp_path, accumulation):
    """The example end to end; with 2 accumulation steps TRL samples once for both and
    splits the batch, [B, T] token advantages included."""
    spec = importlib.util.spec_from_file_location("trl_cepo_example", ROOT / "examples" / "trl_cepo.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "2", "--output-dir", str(tmp_path), "--prompts-per-step", "2",
                           "--max-completion-length", "40",
                           "--gradient-accumulation-steps", str(accumulation)])
    assert result["steps"] == 2
    assert len(result["logs"]) == 2
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in result["logs"])
    assert result["logs"][0]["cepo/lambda"] == pytest.approx(0.5)
