"""The reference's teacher options (issue 13 item 4 a, b): chain-of-thought hints
(--hint_source, --hint_tokens) and the teacher's weights (--teacher policy|initial|lagged,
--teacher_sync_every): hand-checked hints, the hidden states each teacher mode gives, the
lagged copy's refresh cadence, its survival across a kill + resume, FSDP2 with 2 processes,
and the errors bad values give."""

import json
import random
from pathlib import Path

import pytest
import torch
import train_cli
from launch import TESTS, torchrun
from scripted_rollouts import ScriptedSampler, ScriptedVerifier
from tiny_lm import make_tiny_model_dir

from cepo.config import TrainConfig, parse_config
from cepo.contexts import choose_wrong_answers, choose_wrong_rollouts
from cepo.data import Example
from cepo.hints import best_correct_rollout, hint_token_ids, teacher_hints
from cepo.model import load_causal_lm
from cepo.policy import FusedHeadPolicy, apply_lora
from cepo.rollout import sample_groups, train_items
from cepo.sampler import SamplingParams
from cepo.sampler.base import Completion
from cepo.step import Responses, context_hidden_states, evidence
from cepo.teacher import AdaptersDisabled, Teacher, copy_parameters

STOP = 1  # the tiny tokenizer's <eos>


# ----------------------------------------------------------------------------- (a) hints

def _completion(text, ids, stopped=True):
    return Completion(0, ids, text, "stop" if stopped else "length",
                      stop_token_id=STOP if stopped else None)


# group 0: two correct (rewards 1.0 and 1.5: the second is best), a wrong one with an
# answer (the wrong-answer rollout), a truncated one without an answer
# group 1: nothing correct (r+ falls back to the gold answer); wrong answers 8 (reward 0.2)
# and 9 (reward 0.0: the worst)
# group 2: all correct with equal rewards (best: the first); no wrong answer (no r-)
SCRIPT = [
    [_completion("a0", [10, 11, 12, 13]), _completion("a1", [20, 21, 22]),
     _completion("a2", [30, 31, 32, 33, 34]), _completion("a3", [40, 41, 42], stopped=False)],
    [_completion("b0", [50, 51, 52]), _completion("b1", [60, 61, 62, 63]),
     _completion("b2", [70]), _completion("b3", [80, 81])],
    [_completion("c0", [90, 91]), _completion("c1", [92, 93]), _completion("c2", [94]),
     _completion("c3", [95, 96, 97])],
]
VERDICTS = {
    "a0": (0.0, False, "wrong", "7"), "a1": (1.0, True, "ok", "5"),
    "a2": (1.5, True, "ok", "5"), "a3": (0.0, False, "unparseable", None),
    "b0": (0.2, False, "wrong", "8"), "b1": (0.0, False, "wrong", "9"),
    "b2": (0.2, False, "wrong", "8"), "b3": (0.5, False, "wrong", None),
    "c0": (1.0, True, "ok", "3"), "c1": (1.0, True, "ok", "3"),
    "c2": (1.0, True, "ok", "3"), "c3": (1.0, True, "ok", "3"),
}
EXAMPLES = [Example("p0", "5", "t"), Example("p1", "4", "t"), Example("p2", "3", "t")]


def _groups():
    return sample_groups(EXAMPLES, [[5], [6], [7]], [0, 1, 2], sampler=ScriptedSampler(SCRIPT),
                         verifier=ScriptedVerifier(VERDICTS), group_size=4,
                         params=SamplingParams(max_new_tokens=5), std_normalize=True,
                         wrong_answer_strategy="worst", find_wrong_answers=True)


def ids_text(ids):
    return "|".join(map(str, ids))


def test_answer_hints_are_todays_contexts():
    groups = _groups()
    assert groups.wrong_answers == ["7", "9", None]
    assert groups.wrong_rollouts == [0, 1, None]
    pos, neg = teacher_hints(groups, source="answer", k=3, decode=ids_text)
    assert pos == ["5", "4", "3"] and neg == ["7", "9", None]

    def build(prompts, answers, wrong):
        return None, list(answers), list(wrong)

    today = train_items(groups, build_contexts=build, with_teachers=True, algo="cepo")
    hinted = train_items(groups, build_contexts=build, with_teachers=True, algo="cepo",
                         hints=(pos, neg))
    assert [(i.pos_ids, i.neg_ids) for i in today] == [(i.pos_ids, i.neg_ids) for i in hinted]


def test_cot_prefix_hints_by_hand():
    pos, neg = teacher_hints(_groups(), source="cot_prefix", k=2, decode=ids_text)
    assert pos == ["30|31", "4", "90|91"]   # best correct a2; no correct in group 1: gold
    assert neg == ["10|11", "60|61", None]  # worst wrong a0 / b1; group 2 has none
    pos, neg = teacher_hints(_groups(), source="cot_prefix", k=200, decode=ids_text)
    assert pos[0] == "30|31|32|33|34" and neg[0] == "10|11|12|13"  # all, stop token excluded


def test_cot_suffix_hints_by_hand():
    pos, neg = teacher_hints(_groups(), source="cot_suffix", k=2, decode=ids_text)
    assert pos == ["33|34", "4", "90|91"]   # the last 2 sampled tokens, not the stop token
    assert neg == ["12|13", "62|63", None]
    pos, _ = teacher_hints(_groups(), source="cot_suffix", k=1, decode=ids_text)
    assert pos[0] == "34"


def test_empty_decoded_hint_falls_back_to_the_answer():
    pos, neg = teacher_hints(_groups(), source="cot_prefix", k=2, decode=lambda ids: "  ")
    assert pos == ["5", "4", "3"] and neg == ["7", "9", None]


def test_a_truncated_rollout_keeps_its_last_token():
    assert hint_token_ids([1, 2, 3], "cot_suffix", 2) == [2, 3]
    assert hint_token_ids([1, 2, 3], "cot_prefix", 5) == [1, 2, 3]
    from cepo.hints import generated_ids
    assert generated_ids([4, 5, STOP], truncated=False) == [4, 5]
    assert generated_ids([4, 5, 6], truncated=True) == [4, 5, 6]


def test_best_correct_is_highest_reward_first_on_ties():
    assert best_correct_rollout([1.0, 1.5, 1.5, 2.0], [True, True, True, False]) == 1
    assert best_correct_rollout([0.0, 0.0], [False, False]) is None


def test_wrong_rollouts_match_wrong_answers_for_every_strategy():
    rng = random.Random(3)
    groups = [[{"answer": a, "reward": r, "correct": c} for a, r, c in g] for g in (
        [("1", 0.0, False), ("2", 0.1, False), ("2", 0.1, False), ("5", 1.0, True)],
        [("5", 1.0, True), ("", 0.0, False), ("3", 0.3, False), ("4", 0.3, False)],
        [("5", 1.0, True)] * 4)]
    for strategy in ("worst", "most_frequent", "random"):
        seed = rng.randrange(1000)
        idx = choose_wrong_rollouts(groups, strategy, random.Random(seed), gold_answers=["5"] * 3)
        ans = choose_wrong_answers(groups, strategy, random.Random(seed), gold_answers=["5"] * 3)
        assert [None if i is None else groups[g][i]["answer"] for g, i in enumerate(idx)] == ans
    assert choose_wrong_rollouts(groups, "worst")[:2] == [0, 2]
    assert choose_wrong_rollouts(groups, "most_frequent")[0] == 1


def test_cot_hints_reach_the_teacher_contexts():
    import tempfile

    from tiny_lm import make_tokenizer

    from cepo.contexts import build_contexts

    tok = make_tokenizer(Path(tempfile.mkdtemp()))
    groups = _groups()
    for r in groups.rollouts:  # character ids of the tiny tokenizer: decodable text
        r.response_ids = [(t % 40) + 4 for t in r.response_ids[:-1]] + r.response_ids[-1:]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    pos, neg = teacher_hints(groups, source="cot_prefix", k=3, decode=decode)
    items = train_items(groups, build_contexts=lambda p, a, w: build_contexts(tok, p, a, w),
                        with_teachers=True, algo="cepo", hints=(pos, neg))
    best = groups.rollouts[2].response_ids[:3]
    first = next(i for i in items if i.policy_ids == [5])
    assert first.pos_ids == build_contexts(tok, ["p0"], [decode(best)], [None])[1][0]
    assert decode(best) in tok.decode(first.pos_ids)


# ----------------------------------------------------------------------------- (b) weights

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", hidden=32)


def _policy(path, lora=False):
    lm = load_causal_lm(str(path), dtype=torch.float32, attn_implementation="sdpa")
    if lora:
        lm = apply_lora(lm, 4, 8, ["q_proj", "v_proj"])
    return FusedHeadPolicy(lm).eval()


def _batch(seed=0, rollouts=5):
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(4, 60) for _ in range(n)]  # noqa: E731
    responses = Responses.of([tok(rng.randint(2, 7)) for _ in range(rollouts)])
    contexts = {"policy": [tok(3) for _ in range(rollouts)],
                "pos": [tok(5) for _ in range(rollouts)],
                "neg": [tok(4) if i % 2 else None for i in range(rollouts)]}
    return contexts, responses


KW = dict(token_budget=64, pad_id=0, device=torch.device("cpu"))


@torch.no_grad()
def _update(model, step):
    """A stand-in for an optimizer step: every parameter moves, differently per step."""
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))


def _hidden(model, contexts, responses):
    return context_hidden_states(model, contexts, responses, **KW)


def test_initial_teacher_is_the_model_before_any_update(tiny_dir):
    contexts, responses = _batch()
    policy, frozen = _policy(tiny_dir), _policy(tiny_dir)
    before = _hidden(policy, contexts, responses)
    teacher = Teacher("initial", policy, copy=frozen)
    for step in range(3):
        teacher.at_step(step)
        _update(policy, step)
    after = _hidden(teacher.model, contexts, responses)
    for name in contexts:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    assert (_hidden(policy, contexts, responses)["pos"] - before["pos"]).abs().max() > 1e-3


def test_initial_teacher_with_lora_disables_the_adapters(tiny_dir):
    contexts, responses = _batch(1)
    plain = _hidden(_policy(tiny_dir), contexts, responses)
    policy = _policy(tiny_dir, lora=True)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # trained adapters: the policy differs from the base
                p.normal_(std=0.5)
    teacher = Teacher("initial", policy)
    assert isinstance(teacher.model, AdaptersDisabled)
    got = _hidden(teacher.model, contexts, responses)
    torch.testing.assert_close(got["pos"], plain["pos"], rtol=1e-6, atol=1e-6)
    adapted = _hidden(policy, contexts, responses)  # and the adapters are back on after
    assert (adapted["pos"] - plain["pos"]).abs().max() > 1e-3


def test_lagged_teacher_refreshes_exactly_every_k_steps(tiny_dir):
    contexts, responses = _batch(2)
    policy, copy = _policy(tiny_dir), _policy(tiny_dir)
    _update(copy, 99)  # whatever the copy held, step 0 overwrites it
    teacher = Teacher("lagged", policy, sync_every=3, copy=copy)
    snapshots, refreshed = {}, []
    for step in range(8):
        if teacher.at_step(step):
            refreshed.append(step)
        snapshots[step] = _hidden(policy, contexts, responses)["pos"]  # weights at step start
        lagged = _hidden(teacher.model, contexts, responses)["pos"]
        torch.testing.assert_close(lagged, snapshots[step - step % 3], rtol=0, atol=0)
        _update(policy, step)
    assert refreshed == [0, 3, 6]


def test_policy_teacher_path_is_unchanged_and_a_copy_gives_the_same_evidence(tiny_dir):
    contexts, responses = _batch(3)
    policy, copy = _policy(tiny_dir), _policy(tiny_dir)
    n = responses.num_tokens
    adv = torch.linspace(-1.0, 1.0, n)
    has_neg = torch.tensor([i % 2 == 1 for i, ids in enumerate(responses.response_ids)
                            for _ in ids])
    kw = dict(lam=0.5, eps_w=0.2, temperature=0.9, **KW)
    one_pass = evidence(policy, contexts, responses, adv, has_neg, **kw)
    same = evidence(policy, contexts, responses, adv, has_neg, teacher=policy, **kw)
    for a, b in zip(one_pass, same):
        assert torch.equal(a, b)
    two_pass = evidence(policy, contexts, responses, adv, has_neg, teacher=copy, **kw)
    for a, b in zip(one_pass, two_pass):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)
    _update(copy, 0)  # another teacher: the teacher log-probs move, the policy's do not
    moved = evidence(policy, contexts, responses, adv, has_neg, teacher=copy, **kw)
    torch.testing.assert_close(moved.lp_policy, one_pass.lp_policy, rtol=1e-5, atol=1e-5)
    assert (moved.lp_pos - one_pass.lp_pos).abs().max() > 1e-3


def test_copy_parameters_refuses_a_different_model(tiny_dir):
    with pytest.raises(ValueError, match="lagged copy"):
        copy_parameters(_policy(tiny_dir, lora=True), _policy(tiny_dir))


# ----------------------------------------------------------------------------- trainer runs

COMMON = {"--prompts_per_step": "4", "--group_size": "4", "--max_new_tokens": "8",
          "--num_eval": "4", "--eval_every": "0", "--progress": "false", "--samples_every": "0",
          "--reward_fn": "plugins_for_tests:digits_reward", "--dump_evidence": "true",
          "--export": "false", "--algo": "rlsd", "--lam0": "0.5", "--t_warm": "10",
          "--teacher": "lagged", "--teacher_sync_every": "2", "--checkpoint_every": "1",
          "--steps": "4", "--lr": "1e-2", "--warmup_steps": "0", "--min_lr_ratio": "1.0"}
"""Tiny runs whose lr does not depend on --steps (constant): 3 steps then a resume to 4
is the same run as 4 steps at once."""


def _train(out, model, env=None, **changes):
    opts = dict(COMMON, **{f"--{k}": str(v) for k, v in changes.items()})
    return train_cli.train(out, model, *[x for kv in opts.items() for x in kv], env=env)


def _evidence_rows(out):
    return sorted((r["step"], r["tokens"], r["delta"]) for r in
                  train_cli.rows(out, "evidence_rank0.jsonl"))


def _same_evidence(whole, resumed):
    a, b = _evidence_rows(whole), _evidence_rows(resumed)
    assert [r[:2] for r in a] == [r[:2] for r in b] and any(r[0] == 4 for r in a)
    for (step, _, da), (_, _, db) in zip(a, b):  # step 4 is scored by the step-2 teacher
        assert da == pytest.approx(db, abs=1e-5), step


@pytest.fixture(scope="module")
def whole_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = _train(out, tiny_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_lagged_teacher_survives_stop_and_resume(tiny_dir, whole_run, tmp_path):
    out = tmp_path / "resumed"
    first = _train(out, tiny_dir, steps=3)  # stopped after step k + 1 = 3
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["extra_models"] == ["teacher"]
    resumed = _train(out, tiny_dir, resume="true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_evidence(whole_run, out)


@pytest.mark.slow
def test_the_teacher_matters_for_the_resume_check(tiny_dir, whole_run, tmp_path):
    """The check above can fail: a teacher refreshed at step 3 scores step 4 differently."""
    other = _train(tmp_path / "every", tiny_dir, teacher_sync_every=1)
    assert other.returncode == 0, other.stderr[-3000:]
    a, b = _evidence_rows(whole_run), _evidence_rows(tmp_path / "every")
    step4 = [(da, db) for (s, _, da), (_, _, db) in zip(a, b) if s == 4]
    assert step4 and max(abs(x - y) for da, db in step4 for x, y in zip(da, db)) > 1e-4


@pytest.mark.slow
def test_lagged_teacher_survives_a_kill_and_resume(tiny_dir, whole_run, tmp_path):
    armed = tmp_path / "kill"
    armed.write_text(str(4 + 16 * 3 + 5))  # 4 evaluations, 3 steps of 16 scores: inside step 4
    out = tmp_path / "resumed"
    kill = dict(reward_fn="plugins_for_tests:kill_trainer_once")
    killed = _train(out, tiny_dir, env={"CEPO_TEST_KILL": str(armed)}, **kill)
    assert killed.returncode != 0 and not armed.exists()
    assert sorted(train_cli.step_rows(out)) == [1, 2, 3]  # killed after step k + 1 = 3
    resumed = _train(out, tiny_dir, resume="true", **kill)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_evidence(whole_run, out)


def test_extra_models_round_trip_and_a_missing_one_is_named(tmp_path):
    from cepo.checkpoint import load_checkpoint, save_checkpoint

    def parts(seed):
        torch.manual_seed(seed)
        model, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        return model, teacher, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, teacher, opt = parts(0)
    save_checkpoint(tmp_path / "with", 1, model=model, optimizer=opt, trainer_state={},
                    extra_models={"teacher": teacher})
    save_checkpoint(tmp_path / "without", 1, model=model, optimizer=opt, trainer_state={})
    model2, teacher2, opt2 = parts(1)
    load_checkpoint(tmp_path / "with" / "step_000001", model=model2, optimizer=opt2,
                    extra_models={"teacher": teacher2})
    for a, b in zip(teacher.parameters(), teacher2.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"holds no \['teacher'\]"):
        load_checkpoint(tmp_path / "without" / "step_000001", model=model2, optimizer=opt2,
                        extra_models={"teacher": teacher2})


def test_lagged_teacher_is_sharded_and_saved_with_two_processes(tiny_dir, tmp_path):
    torchrun([TESTS / "dist_teacher_worker.py", tiny_dir, tmp_path], timeout=240)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["placements_match"] and report["refreshed"] == [0, 2, 4]
    assert report["max_err_vs_snapshot"] == 0.0
    assert report["restored_err"] == 0.0 and report["restored_vs_policy"] > 1e-3


# ----------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("argv, field", [
    (["--hint_tokens", "0"], "hint_tokens"),
    (["--teacher_sync_every", "0"], "teacher_sync_every"),
    (["--algo", "opsd", "--teacher", "initial"], "teacher"),
    (["--algo", "sdpo", "--teacher", "lagged"], "teacher"),
    (["--algo", "sdpo", "--hint_source", "cot_prefix"], "hint_source"),
    (["--algo", "grpo", "--hint_source", "cot_suffix"], "hint_source"),
    # a vision-language checkpoint: the teacher contexts would need its images
    (["--model", str(TESTS.parent / "cepo/assets/tiny-vl"), "--algo", "opsd"], "algo"),
    (["--model", str(TESTS.parent / "cepo/assets/tiny-vl"), "--teacher", "initial"], "teacher"),
])
def test_bad_values_name_the_option(argv, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        parse_config(argv)


@pytest.mark.parametrize("field, value", [("teacher", "ema"), ("hint_source", "cot"),
                                          ("hint_tokens", -3), ("teacher_sync_every", 0)])
def test_validate_names_the_option(field, value):
    with pytest.raises(ValueError, match=f"'{field}'"):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize("option, value", [("--teacher", "ema"), ("--hint_source", "cot")])
def test_unknown_choices_are_rejected_by_the_parser(option, value, capsys):
    with pytest.raises(SystemExit):
        parse_config([option, value])
    err = capsys.readouterr().err
    assert option.lstrip("-") in err and value in err


def test_defaults_are_todays_behaviour():
    cfg = parse_config([])
    assert (cfg.hint_source, cfg.hint_tokens, cfg.teacher, cfg.teacher_sync_every) == (
        "answer", 200, "policy", 10)
