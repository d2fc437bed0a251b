"""Held-out evaluation: greedy accuracy (and mean accuracy over k samples), one sampler call
per decoding mode, with the responses kept for eval_samples.jsonl."""

from __future__ import annotations

from cepo import distributed as dist_utils
from cepo.data import Example
from cepo.samples import sample_record
from cepo.sampler import SamplingParams
from cepo.sampler.base import mix_seed
from cepo.vision import display_prompt


def evaluate(examples: list[Example], *, render, sampler, verifier, info, max_new_tokens: int,
             samples: int = 0, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             step: int = 0) -> tuple[dict, list[dict]]:
    """(metrics, rows) over all ranks. metrics: ``eval_accuracy`` (greedy) and, when
    ``samples`` > 0, ``eval_mean_at_k`` (mean over ``samples`` draws per problem at the
    training temperature; problem i's draws are seeded by its global index, so they do
    not depend on the number of ranks). rows: this rank's greedy responses as
    samples.jsonl records. Collective (every rank calls it). Examples with images
    (``ex.vision``, prepared by cepo.vision) send them to the sampler (``images=``)."""
    mine = list(range(info.rank, len(examples), info.world_size))
    prompt_ids = [render(examples[i].prompt) for i in mine]
    answers = [examples[i].answer for i in mine]
    images = [getattr(examples[i], "vision", None) for i in mine]
    extra = {"images": images} if any(im is not None for im in images) else {}

    def run(n: int, params: SamplingParams, seeds):
        if not mine:
            return [], []
        outs = sampler.generate(prompt_ids, n, params, seeds=seeds, **extra)
        flat = [c for group in outs for c in group]
        scores = verifier.score([c.text for c in flat], [a for a in answers for _ in range(n)])
        return flat, scores

    flat, scores = run(1, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens), None)
    rows = [sample_record(step, prompt=display_prompt(examples[i].prompt), response=c.text, extracted=s.extracted,
                          gold=examples[i].answer, reward=s.reward, status=s.status,
                          truncated=c.finish_reason == "length")
            for i, c, s in zip(mine, flat, scores)]
    greedy = float(sum(s.correct for s in scores))
    sampled = 0.0
    if samples:
        params = SamplingParams(temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens)
        _, draws = run(samples, params, [mix_seed(seed, i) for i in mine])
        sampled = float(sum(s.correct for s in draws))
    greedy, sampled, total = dist_utils.all_reduce_sum([greedy, sampled, float(len(mine))],
                                                       info.device)
    metrics = {"eval_accuracy": greedy / max(total, 1.0)}
    if samples:
        metrics["eval_mean_at_k"] = sampled / max(total * samples, 1.0)
    return metrics, rows
