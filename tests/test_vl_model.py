"""Vision-language policies (cepo.vision) on tiny random Qwen3-VL / Qwen2.5-VL models: the
packed forward against the model's own per-sequence forward, one vision-tower run per
pass for all contexts and rollouts, the samplers' log-probs against the trainer's."""

import pytest
import torch

import cepo_kernels as ck
from cepo.contexts import build_contexts, render_prompt
from cepo.model import load_causal_lm
from cepo.packing import pack_sequences, response_gather_index
from cepo.policy import FusedHeadPolicy, apply_lora
from cepo.sampler import SamplingParams
from cepo.sampler.hf_engine import HFEngine
from cepo.step import Responses, context_hidden_states
from cepo.vision import (IMAGE_PAD, ImagePreparer, collapse_image_tokens, display_prompt,
                         encode_images, expand_placeholders, packed_hidden_states, vision_tower)
from vl_model import make_tiny_vl_dir, synthetic_image

ARCHS = ("qwen3_vl", "qwen2_5_vl")


@pytest.fixture(scope="module", params=ARCHS)
def vl(request, tmp_path_factory):
    from transformers import AutoTokenizer

    path = make_tiny_vl_dir(tmp_path_factory.mktemp(request.param) / "m", arch=request.param)
    model = load_causal_lm(str(path), dtype=torch.float32, attn_implementation="sdpa").eval()
    return dict(path=path, model=model, tok=AutoTokenizer.from_pretrained(path),
                prep=ImagePreparer(str(path)))


def _sequences(vl):
    """Four sequences: 1 image, 2 images of other sizes, text only, 1 image (square)."""
    prep, tok = vl["prep"], vl["tok"]
    seqs, images = [], []
    for i, sizes in enumerate([[(32, 48)], [(48, 32), (64, 16)], [], [(32, 32)]]):
        pil = [synthetic_image(w, h, seed=10 * i + j) for j, (w, h) in enumerate(sizes)]
        im = prep.image_inputs(f"row{i}", pil) if pil else None
        text = "what is " + " ".join(["<image>"] * len(pil)) + " 3+4?"
        if im is not None:
            text = expand_placeholders(text, im.token_counts(prep.merge_size))
        seqs.append(render_prompt(tok, text) + tok("the answer is 7", add_special_tokens=False)
                    .input_ids)
        images.append(im)
    return seqs, images


def _reference_hidden(model, seq, im):
    """The model's own forward of one sequence (processor-style inputs)."""
    ids = torch.tensor([seq])
    kw = {}
    if im is not None:
        kw = dict(pixel_values=im.pixel_values, image_grid_thw=im.grid_thw,
                  mm_token_type_ids=(ids == model.config.image_token_id).int())
    return model.model(input_ids=ids, **kw).last_hidden_state[0]


def test_packed_forward_equals_per_sequence(vl):
    """Hidden states and log-probs of a packed row of sequences with different image sizes
    (and a text-only one) equal the model's per-sequence forward, fp32, 1e-5."""
    model = vl["model"]
    seqs, images = _sequences(vl)
    assert len({tuple(im.grid_thw[0].tolist()) for im in images if im is not None}) >= 3
    with torch.no_grad():
        hidden = packed_hidden_states(model, pack_sequences(seqs), images,
                                      encode_images(model, [im for im in images if im]))
        ref = torch.cat([_reference_hidden(model, s, im) for s, im in zip(seqs, images)])
        assert hidden.shape == ref.shape
        torch.testing.assert_close(hidden, ref, rtol=1e-5, atol=1e-5)
        w = model.lm_head.weight
        ids = torch.tensor([t for s in seqs for t in s])
        starts = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
        last = torch.ones(len(ids), dtype=torch.bool)
        last[starts[1:] - 1] = False  # the last token of a sequence predicts nothing
        targets = torch.roll(ids, -1)[last]
        lp = ck.fused_logprobs(hidden[last], w, targets, temperature=1.0).logprobs
        ref_lp = (ref[last] @ w.T).log_softmax(-1).gather(1, targets[:, None])[:, 0]
        torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)


def test_contexts_share_images_and_tower_runs_once_per_pass(vl):
    """policy / pos / neg contexts hold the same image tokens; one pass over every
    (context, rollout) runs the vision tower once, and equals the per-sequence forward."""
    model, tok, prep = vl["model"], vl["tok"], vl["prep"]
    pil = [synthetic_image(32, 48, seed=1)]
    im = prep.image_inputs("p0", pil)
    prompt = expand_placeholders("<image> what is 3+4?", im.token_counts(prep.merge_size))
    policy_ids, pos_ids, neg_ids = (c[0] for c in build_contexts(tok, [prompt], ["7"], ["8"]))
    image_id = model.config.image_token_id
    spans = [[i for i, t in enumerate(c) if t == image_id] for c in (policy_ids, pos_ids, neg_ids)]
    assert spans[0] == spans[1] == spans[2] and len(spans[0]) == im.token_counts(2)[0]
    assert display_prompt(prompt) == "<image> what is 3+4?"
    responses = Responses.of([tok(r, add_special_tokens=False).input_ids
                              for r in ("7", "it is 8", "3+4=7")])
    policy = FusedHeadPolicy(model)
    calls = []
    hook = vision_tower(model).register_forward_hook(lambda *a: calls.append(1))
    try:
        h = context_hidden_states(policy, {"policy": [policy_ids] * 3, "pos": [pos_ids] * 3,
                                           "neg": [neg_ids] * 3}, responses,
                                  token_budget=64, pad_id=tok.pad_token_id,
                                  device=torch.device("cpu"), images=[im] * 3)
    finally:
        hook.remove()
    assert len(calls) == 1  # several micro-batches (budget 64), one tower run
    cache = {}  # a step's cache: its later passes reuse the first pass's embeddings
    for _ in range(2):
        hook = vision_tower(model).register_forward_hook(lambda *a: calls.append(1))
        try:
            again = context_hidden_states(policy, {"pos": [pos_ids] * 3}, responses,
                                          token_budget=64, pad_id=tok.pad_token_id,
                                          device=torch.device("cpu"), images=[im] * 3,
                                          image_cache=cache)
        finally:
            hook.remove()
        torch.testing.assert_close(again["pos"], h["pos"], rtol=1e-6, atol=1e-6)
    assert len(calls) == 2
    with torch.no_grad():
        for name, ctx in (("policy", policy_ids), ("pos", pos_ids), ("neg", neg_ids)):
            for r, resp in enumerate(responses.response_ids):
                ref = _reference_hidden(model, ctx + resp, im)[len(ctx) - 1:-1]
                first = responses.offsets[r]
                torch.testing.assert_close(h[name][first:first + len(resp)], ref,
                                           rtol=1e-5, atol=1e-5)


def test_lora_targets_language_model_only(vl):
    model = load_causal_lm(str(vl["path"]), dtype=torch.float32)
    lora = apply_lora(model, 4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"])
    adapted = [n for n, _ in lora.named_parameters() if "lora_A" in n]
    assert adapted and all("language_model" in n for n in adapted)
    assert not any("visual" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_hf_engine_logprobs_equal_trainer(vl):
    """The sync check: the HF engine's sampled log-probs (batched, left-padded, pixels)
    equal the trainer's packed log-probs of the same tokens."""
    model, tok, prep = vl["model"], vl["tok"], vl["prep"]
    prompts, images = [], []
    for i, (w, h) in enumerate([(32, 48), (48, 32)]):
        im = prep.image_inputs(f"p{i}", [synthetic_image(w, h, seed=i)])
        prompts.append(render_prompt(tok, expand_placeholders(
            f"<image> what is {i}+2?", im.token_counts(prep.merge_size))))
        images.append(im)
    engine = HFEngine(str(vl["path"]), tokenizer=tok, max_batch_size=3)
    out = engine.generate(prompts, 3, SamplingParams(max_new_tokens=6, return_logprobs=True),
                          seeds=[1, 2], images=images)
    comps = [(g, c) for g, group in enumerate(out) for c in group]
    seqs = [prompts[g] + c.trained_ids for g, c in comps]
    batch = pack_sequences(seqs)
    index, targets = response_gather_index(batch, [len(prompts[g]) for g, _ in comps],
                                           [len(c.trained_ids) for _, c in comps])
    with torch.no_grad():
        hidden = packed_hidden_states(model, batch, [images[g] for g, _ in comps],
                                      encode_images(model, images))
        lp = ck.fused_logprobs(hidden[index], model.lm_head.weight, targets,
                               temperature=1.0).logprobs
    sampled = torch.tensor([x for _, c in comps for x in c.logprobs])
    assert (lp - sampled).abs().max() < 1e-5
    engine.close()


def test_vllm_engine_sends_multimodal_requests(vl, monkeypatch):
    """One generate call; each request carries its images as multi_modal_data and ONE
    <|image_pad|> per image (vLLM expands them); the stand-in's own processing of those
    images reproduces the trainer's log-probs."""
    import fake_vllm

    fake_vllm.install(monkeypatch)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from cepo.sampler.vllm_engine import VLLMEngine

    model, tok, prep = vl["model"], vl["tok"], vl["prep"]
    im = prep.image_inputs("p0", [synthetic_image(40, 24, seed=3)])
    prompt = render_prompt(tok, expand_placeholders("<image> 1+1?",
                                                    im.token_counts(prep.merge_size)))
    text = render_prompt(tok, "2+2?")
    engine = VLLMEngine(str(vl["path"]), tokenizer=tok, dtype=torch.float32)
    try:
        out = engine.generate([prompt, text], 2, SamplingParams(max_new_tokens=5,
                                                                return_logprobs=True),
                              seeds=[5, 6], images=[im, None])
        sent = engine.llm.last_prompts
        assert [c for c in engine.llm.calls if c[0] == "generate"] == [("generate", 2, (2, 2))]
        image_id = model.config.image_token_id
        assert sent[0]["prompt_token_ids"] == collapse_image_tokens(prompt, image_id)
        assert sent[0]["prompt_token_ids"].count(image_id) == 1
        _, gh, gw = im.grid_thw[0].tolist()  # the image as resized to its patch grid
        assert [i.size for i in sent[0]["multi_modal_data"]["image"]] == [(8 * gw, 8 * gh)]
        assert "multi_modal_data" not in sent[1] and sent[1]["prompt_token_ids"] == text
        for c in out[0]:
            batch = pack_sequences([prompt + c.trained_ids])
            index, targets = response_gather_index(batch, [len(prompt)], [len(c.trained_ids)])
            with torch.no_grad():
                h = packed_hidden_states(model, batch, [im], encode_images(model, [im]))
                lp = ck.fused_logprobs(h[index], model.lm_head.weight, targets,
                                       temperature=1.0).logprobs
            assert (lp - torch.tensor(c.logprobs)).abs().max() < 1e-5
    finally:
        engine.close()


def test_generated_image_token_is_text(vl):
    """A response that samples <|image_pad|> keeps the prompt's image count: the extra id
    is embedded as a token, not matched to an image."""
    model, tok, prep = vl["model"], vl["tok"], vl["prep"]
    im = prep.image_inputs("p", [synthetic_image(32, 32, seed=4)])
    prompt = render_prompt(tok, expand_placeholders("<image>?", im.token_counts(2)))
    seq = prompt + [tok.convert_tokens_to_ids(IMAGE_PAD)] + tok("12").input_ids
    with torch.no_grad():
        h = packed_hidden_states(model, pack_sequences([seq, seq[:len(prompt)]]), [im, im],
                                 encode_images(model, [im]))
        # causal: the prompt's hidden states do not depend on what follows
        torch.testing.assert_close(h[:len(prompt)], h[len(seq):], rtol=1e-5, atol=1e-5)
