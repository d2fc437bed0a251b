"""OPSD and SDPO (--algo opsd / sdpo), PPO dual-clip and sequence-mean aggregation.

- the teacher contexts, checked by hand (OPSD with an answer and with a solution; SDPO's
  choice of demonstration, including a group with no success);
- the update (ppo_update with a DistillSpec, several micro-batches) against an
  independent float64 statement of the loss on full logits of the Hugging Face model;
- loss_agg seq against a sequence mean written out; clip_dual reaching the fused loss;
- bad option values failing with the option's name;
- both algorithms end to end for 2 steps on the shipped tiny model, 1 and 2 processes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cepo_kernels as ck
from cepo.build import _builtin
from cepo.config import TINY_MODEL, parse_config
from cepo.contexts import render_prompt
from cepo.data import Example, load_examples
from cepo.model import load_causal_lm
from cepo.policy import FusedHeadPolicy
from cepo.rollout import Groups, Rollout
from cepo.self_distill import (choose_demonstrations, distill_items, opsd_teacher_message,
                               sdpo_teacher_message, strip_thinking)
from cepo.step import DistillSpec, Responses, context_hidden_states, ppo_update
from launch import torchrun
from tiny_lm import make_tiny_model_dir

OPSD = ("{prompt}\n\nHere is a reference solution to this problem:\n{solution}"
        "\n\nNow solve the problem yourself, step by step, reaching the same final answer.")
SDPO = "{prompt}\nCorrect solution:\n\n{demonstration}\n\nCorrectly solve the original question."


# ----------------------------------------------------------------------------- contexts

def test_defaults_are_the_templates_documented_here():
    cfg = parse_config(["--model", TINY_MODEL])  # the options' own defaults
    assert cfg.opsd_template == OPSD and cfg.sdpo_template == SDPO
    assert (cfg.distill_divergence, cfg.distill_beta, cfg.distill_coef, cfg.distill_pg_coef,
            cfg.loss_agg, cfg.clip_dual) == ("jsd", 0.5, 1.0, 0.0, "token", None)


def test_opsd_teacher_with_answer_only():
    ex = Example("(7+5)*3-4", "32", "hand")
    assert opsd_teacher_message(ex, OPSD) == (
        "(7+5)*3-4\n\nHere is a reference solution to this problem:\n32\n\n"
        "Now solve the problem yourself, step by step, reaching the same final answer.")


def test_opsd_teacher_with_a_solution():
    ex = Example("(7+5)*3-4", "32", "hand", "7+5=12\n12*3=36\n36-4=32\n\\boxed{32}")
    assert opsd_teacher_message(ex, "{prompt} | {solution}") == (
        "(7+5)*3-4 | 7+5=12\n12*3=36\n36-4=32\n\\boxed{32}")
    # {answer}: the answer alone even where a solution exists (the shipped model's hint)
    assert opsd_teacher_message(ex, "{prompt}\n\n{answer}") == "(7+5)*3-4\n\n32"


def test_the_embedded_default_uses_the_hint_format_the_shipped_model_knows():
    cfg = parse_config(["--algo", "opsd"])  # no --model: cepo/configs/tiny-arith.yaml
    ex = Example("2+2", "4", "h", "2+2=4\n\\boxed{4}")
    assert opsd_teacher_message(ex, cfg.opsd_template) == "2+2\n\n4"
    assert sdpo_teacher_message(ex, "2+2=4", parse_config(["--algo", "sdpo"]).sdpo_template) \
        == "2+2\n\n2+2=4"


def test_the_builtin_task_and_files_carry_the_solution(tmp_path):
    for ex in _builtin("train", 5, 0):
        assert ex.solution.endswith("\\boxed{" + ex.answer + "}")
        assert ex.solution.splitlines()[0].split("=")[0] in ex.prompt.replace("(", "")
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "1+1", "a": "2", "sol": "1+1=2"}\n{"q": "2+2", "a": "4"}\n'
                    '{"q": "3+3", "a": "6", "sol": "  "}\n')
    got = load_examples(str(path), prompt_field="q", answer_field="a", solution_field="sol")
    assert [e.solution for e in got] == ["1+1=2", None, None]
    assert load_examples(str(path), prompt_field="q", answer_field="a")[0].solution is None


def test_sdpo_demonstration_choice():
    # the first success other than the rollout itself; the only success gets none
    assert choose_demonstrations([False, True, False, True]) == [1, 3, 1, 1]
    assert choose_demonstrations([True, False, False]) == [None, 0, 0]
    assert choose_demonstrations([True, True]) == [1, 0]
    assert choose_demonstrations([False, False, False]) == [None, None, None]  # no success
    assert choose_demonstrations([False, True, False, True], failed_only=True) == [
        1, None, 1, None]


def test_sdpo_teacher_message_drops_thinking():
    assert strip_thinking("<think>hmm\nso</think>\n2+2=4") == "2+2=4"
    msg = sdpo_teacher_message(Example("2+2", "4", "h"), "<think>x</think> 2+2=4\n\\boxed{4}",
                               SDPO)
    assert msg == ("2+2\nCorrect solution:\n\n2+2=4\n\\boxed{4}\n\n"
                   "Correctly solve the original question.")


def _rollout(g, text, correct, advantage, ids=(5, 6)):
    return Rollout(group=g, prompt_ids=[9, g], response_ids=list(ids), text=text, reward=float(correct),
                   correct=correct, status="ok", truncated=False, advantage=advantage)


def _groups():
    examples = [Example("1+1", "2", "a", "1+1=2"), Example("2+2", "4", "b")]
    rollouts = [_rollout(0, "1+1=2", True, 0.87), _rollout(0, "1+1=3", False, -0.87),
                _rollout(0, "1+1=5", False, -0.87, ids=()), _rollout(0, "oops", False, -0.87),
                _rollout(1, "2+2=5", False, 0.0), _rollout(1, "2+2=6", False, 0.0),
                _rollout(1, "x", False, 0.0), _rollout(1, "y", False, 0.0)]
    return Groups(examples, rollouts, [None, None])


def test_distill_items_pick_and_render_the_teacher():
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(TINY_MODEL)
    render = lambda text: render_prompt(tokenizer, text)  # noqa: E731
    kw = dict(group_size=4, render=render, opsd_template=OPSD, sdpo_template=SDPO)
    groups = _groups()
    opsd = distill_items(groups, algo="opsd", with_policy_gradient=False, **kw)
    assert len(opsd) == 7  # every rollout with a response, whatever its reward
    assert opsd[0].teacher_ids == render(OPSD.format(prompt="1+1", solution="1+1=2"))
    assert opsd[3].teacher_ids == render(OPSD.format(prompt="2+2", solution="4"))
    assert opsd[0].policy_ids == [9, 0] and opsd[0].response_ids == [5, 6]

    sdpo = distill_items(groups, algo="sdpo", with_policy_gradient=False, **kw)
    # group 0: the success is the only one (no teacher); the failures learn from it (the
    # empty response is dropped); group 1: no success, nothing distilled
    assert [it.advantage for it in sdpo] == [-0.87, -0.87]
    demo = render(SDPO.format(prompt="1+1", demonstration="1+1=2"))
    assert all(it.teacher_ids == demo for it in sdpo)
    # with the GRPO term, the success joins for its advantage, without a teacher
    mixed = distill_items(groups, algo="sdpo", with_policy_gradient=True, **kw)
    assert [(it.advantage, it.teacher_ids is None) for it in mixed] == [
        (0.87, True), (-0.87, False), (-0.87, False)]


# ----------------------------------------------------------------------------- the update

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", hidden=32)


def _policy(path):
    torch.manual_seed(0)
    return FusedHeadPolicy(load_causal_lm(str(path), dtype=torch.float32,
                                          attn_implementation="sdpa"))


def _problem(seed: int, rollouts: int = 6):
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(4, 60) for _ in range(n)]  # noqa: E731
    resp = Responses.of([tok(rng.randint(2, 8)) for _ in range(rollouts)])
    student = [tok(rng.randint(2, 5)) for _ in range(rollouts)]
    teacher = [tok(rng.randint(4, 9)) if i % 3 != 2 else None for i in range(rollouts)]
    adv = [rng.choice([-1.0, 0.0, 0.5, 1.2]) for _ in range(rollouts)]
    return resp, student, teacher, adv


def _full_logprobs(lm, context, response, temperature):
    """[L, V] float64 log-softmax of the logits predicting ``response`` after ``context``."""
    ids = torch.tensor([context + response])
    logits = lm(input_ids=ids).logits[0, len(context) - 1:-1].double()
    return F.log_softmax(logits / temperature, dim=-1)


def _divergence64(lp_s, lp_t, divergence, beta):
    """Per-token divergence between teacher and student distributions, float64, as the
    OPSD / SDPO papers define it (beta 0 = KL(T||S), 1 = KL(S||T))."""
    p_s, p_t = lp_s.exp(), lp_t.exp()
    kl = lambda p, lp, lq: (p * (lp - lq)).sum(-1)  # noqa: E731
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return kl(p_t, lp_t, lp_s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return kl(p_s, lp_s, lp_t)
    lm = torch.log(beta * p_t + (1 - beta) * p_s)
    return beta * kl(p_t, lp_t, lm) + (1 - beta) * kl(p_s, lp_s, lm)


def _grads(policy):
    return {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("divergence,beta,pg_coef,seq", [
    ("jsd", 0.5, 0.0, False), ("forward_kl", 0.5, 0.0, False), ("reverse_kl", 0.5, 0.7, True),
    ("jsd", 0.2, 0.5, False)])
def test_update_equals_the_float64_statement(model_dir, divergence, beta, pg_coef, seq):
    """ppo_update with a DistillSpec over several micro-batches gives the gradients of

        coef * sum_{t distilled} w_t D(p_T(.|t) || p_S(.|t)) / Z_d
          + pg_coef * sum_{t, A != 0} w_t (-A_t r_t) / Z_pg

    computed here on the model's own full logits in float64 (r_t = exp(lp - sg(lp)) = 1,
    w_t = 1 or 1 / length, Z = tokens or sequences)."""
    temperature, coef = 0.9, 1.3
    resp, student, teacher, adv = _problem(3)
    policy = _policy(model_dir)
    dev = torch.device("cpu")
    teacher_h = context_hidden_states(policy, {"teacher": teacher}, resp, token_budget=4096,
                                      pad_id=0, device=dev)["teacher"]
    lengths = torch.tensor([len(r) for r in resp.response_ids])
    taught = [t is not None for t in teacher]
    rows = lambda flags: torch.repeat_interleave(torch.tensor(flags), lengths)  # noqa: E731
    weights = torch.repeat_interleave(1.0 / lengths.float(), lengths) if seq else None
    count = (lambda flags: float(sum(flags))) if seq else (
        lambda flags: float(sum(n for n, f in zip(lengths.tolist(), flags) if f)))
    z_d, z_pg = count(taught), count([a != 0 for a in adv])
    spec = DistillSpec(teacher_hidden=teacher_h, distilled=rows(taught),
                       pg_mask=rows([a != 0 for a in adv]), normalizer=z_d, coef=coef,
                       pg_coef=pg_coef, divergence=divergence, beta=beta, token_weights=weights)
    token_adv = torch.repeat_interleave(torch.tensor(adv), lengths)
    ppo_update(policy, student, resp, list(range(len(adv))), token_advantages=token_adv,
               old_logprobs=None, ref_logprobs=None, global_tokens=z_pg, world_size=1,
               clip_low=0.2, clip_high=0.28, temperature=temperature, kl_coef=0.0,
               token_budget=24, pad_id=0, device=dev, token_weights=weights, distill=spec)
    got = _grads(policy)

    ref = _policy(model_dir)
    lm = ref.base
    loss = torch.zeros((), dtype=torch.float64)
    for i, ids in enumerate(resp.response_ids):
        w = 1.0 / len(ids) if seq else 1.0
        lp_s = _full_logprobs(lm, student[i], ids, temperature)
        if teacher[i] is not None:
            with torch.no_grad():
                lp_t = _full_logprobs(lm, teacher[i], ids, temperature)
            loss = loss + coef * w * _divergence64(lp_s, lp_t, divergence, beta).sum() / z_d
        if pg_coef and adv[i] != 0:
            lp = lp_s.gather(-1, torch.tensor(ids)[:, None])[:, 0]
            loss = loss + pg_coef * w * (-adv[i] * torch.exp(lp - lp.detach())).sum() / z_pg
    loss.backward()
    _assert_same_grads(got, _grads(ref))


def _assert_same_grads(got, want):
    """Every parameter's gradient, to 1e-4 of the largest gradient entry (fp32 kernels
    against float64 logits)."""
    assert set(got) == set(want)
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0
    for name in want:
        err = float((got[name].double() - want[name].double()).abs().max())
        assert err <= 1e-4 * scale, (name, err, scale)


def test_loss_agg_seq_is_the_mean_of_sequence_means(model_dir):
    """The PPO term alone with loss_agg seq: gradients of (1/S) sum_s (1/L_s) sum_t -A r_t."""
    resp, student, _, adv = _problem(5, rollouts=5)
    adv = [a if a else 0.4 for a in adv]
    lengths = torch.tensor([len(r) for r in resp.response_ids])
    policy = _policy(model_dir)
    ppo_update(policy, student, resp, list(range(5)),
               token_advantages=torch.repeat_interleave(torch.tensor(adv), lengths),
               old_logprobs=None, ref_logprobs=None, global_tokens=5.0, world_size=1,
               clip_low=0.2, clip_high=0.28, temperature=1.0, kl_coef=0.0, token_budget=20,
               pad_id=0, device=torch.device("cpu"),
               token_weights=torch.repeat_interleave(1.0 / lengths.float(), lengths))
    got = _grads(policy)
    ref = _policy(model_dir)
    means = []
    for i, ids in enumerate(resp.response_ids):
        lp = _full_logprobs(ref.base, student[i], ids, 1.0).gather(
            -1, torch.tensor(ids)[:, None])[:, 0]
        means.append((-adv[i] * torch.exp(lp - lp.detach())).mean())
    torch.stack(means).mean().backward()
    _assert_same_grads(got, _grads(ref))


def test_clip_dual_and_token_weights_reach_the_fused_loss(model_dir, monkeypatch):
    seen = []
    real = ck.fused_linear_ppo_loss

    def spy(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("clip_dual", "token_weights")})
        return real(*args, **kwargs)

    monkeypatch.setattr(ck, "fused_linear_ppo_loss", spy)
    resp, student, _, adv = _problem(7, rollouts=3)
    lengths = torch.tensor([len(r) for r in resp.response_ids])
    kw = dict(token_advantages=torch.repeat_interleave(torch.tensor(adv), lengths),
              old_logprobs=None, ref_logprobs=None, global_tokens=1.0, world_size=1,
              clip_low=0.2, clip_high=0.28, temperature=1.0, kl_coef=0.0, token_budget=4096,
              pad_id=0, device=torch.device("cpu"))
    policy = _policy(model_dir)
    ppo_update(policy, student, resp, [0, 1, 2], **kw)
    assert seen == [{"clip_dual": None, "token_weights": None}]  # off: not passed at all
    seen.clear()
    w = torch.rand(resp.num_tokens)
    ppo_update(policy, student, resp, [2, 0], clip_dual=3.0, token_weights=w, **kw)
    assert seen[0]["clip_dual"] == 3.0
    order = torch.cat([resp.positions([2]), resp.positions([0])])
    torch.testing.assert_close(seen[0]["token_weights"], w[order])


def test_clip_dual_bounds_negative_advantage_tokens(model_dir):
    """With ratios far above 1 and A < 0, dual-clip caps each token's loss at clip_dual |A|
    (EasyR1 / verl): the loss reported equals the formula on the op's own log-probs."""
    resp, student, _, _ = _problem(9, rollouts=3)
    policy = _policy(model_dir)
    n = resp.num_tokens
    adv = -torch.rand(n) - 0.5
    old = torch.full((n,), -30.0)  # r = exp(lp + 30): huge
    kw = dict(token_advantages=adv, old_logprobs=old, ref_logprobs=None, global_tokens=float(n),
              world_size=1, clip_low=0.2, clip_high=0.28, temperature=1.0, kl_coef=0.0,
              token_budget=4096, pad_id=0, device=torch.device("cpu"))
    out = ppo_update(policy, student, resp, [0, 1, 2], clip_dual=3.0, **kw)
    lp = out.logprobs.double()
    ratio = torch.exp(lp - old.double())
    per_token = torch.maximum(-adv.double() * ratio, -adv.double() * ratio.clamp(0.8, 1.28))
    per_token = torch.minimum(per_token, -adv.double() * 3.0)
    assert out.loss == pytest.approx(float(per_token.mean()), rel=1e-5)


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("args,name", [
    (["--algo", "opsdx"], "algo"), (["--distill_divergence", "tv"], "distill_divergence"),
    (["--distill_beta", "1.5"], "distill_beta"), (["--distill_beta", "-0.1"], "distill_beta"),
    (["--distill_coef", "-1"], "distill_coef"), (["--distill_pg_coef", "-0.5"], "distill_pg_coef"),
    (["--algo", "sdpo", "--distill_coef", "0"], "distill_coef"),
    (["--clip_dual", "0.5"], "clip_dual"), (["--loss_agg", "sum"], "loss_agg"),
    (["--opsd_template", "{prompt} only"], "opsd_template"),
    (["--opsd_template", "{answer} {solution}"], "opsd_template"),
    (["--sdpo_template", "{prompt} {x} {demonstration}"], "sdpo_template")])
def test_bad_values_name_the_option(args, name, capsys):
    with pytest.raises((ValueError, SystemExit)) as err:
        parse_config(args)
    message = str(err.value) + capsys.readouterr().err
    assert name in message, message


def test_good_values_parse():
    cfg = parse_config(["--algo", "opsd", "--distill_divergence", "reverse_kl", "--distill_beta",
                        "1", "--distill_pg_coef", "0.5", "--clip_dual", "3", "--loss_agg", "seq",
                        "--sdpo_failed_only", "true"])
    assert (cfg.algo, cfg.distill_divergence, cfg.distill_beta, cfg.distill_pg_coef,
            cfg.clip_dual, cfg.loss_agg, cfg.sdpo_failed_only) == (
        "opsd", "reverse_kl", 1.0, 0.5, 3.0, "seq", True)


# ----------------------------------------------------------------------------- end to end

def _train(out: Path, *args: str, nproc: int):
    return torchrun(["-m", "cepo.train", "--model", TINY_MODEL, "--output_dir", str(out),
                     "--prompts_per_step", "8", "--group_size", "4", "--max_new_tokens", "40",
                     "--num_eval", "4", "--eval_every", "0", "--checkpoint_every", "0",
                     "--num_train", "32", "--lr", "1e-4", "--progress", "false",
                     "--export", "false", "--steps", "2", *args], nproc=nproc)


def _steps(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.parametrize("algo,extra", [
    ("opsd", []),
    ("sdpo", ["--distill_pg_coef", "1", "--loss_agg", "seq", "--clip_dual", "3"])])
def test_end_to_end_one_and_two_processes(tmp_path, algo, extra):
    _train(tmp_path / "one", "--algo", algo, *extra, nproc=1)
    _train(tmp_path / "two", "--algo", algo, *extra, nproc=2)
    one, two = _steps(tmp_path / "one"), _steps(tmp_path / "two")
    assert len(one) == 2 and all(r["update_skipped"] == 0 for r in one)
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two],
                                                     rel=1e-4, abs=1e-7)
    for r in one:
        assert r["lambda"] == 0.0 and r["distill_loss"] > 0 and r["grad_norm"] > 0
        assert r["logprob_diff_mean"] < 1e-5  # the student's log-probs come from the loss
        if algo == "opsd":  # every rollout is distilled; pure distillation: loss = distill
            assert r["distilled_frac"] == 1.0
            assert r["loss"] == pytest.approx(r["distill_loss"], rel=1e-6)
            assert "clip_frac_low" not in r
        else:  # the GRPO term adds its share
            assert 0.0 < r["distilled_frac"] < 1.0 and "clip_frac_low" in r
            assert 0.0 <= r["clip_frac_dual"] <= 1.0
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["algo"] == algo and summary["world_size"] == 2
