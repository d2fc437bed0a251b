"""One LoRA merge (cepo.weight_sync) for the sampler's weight sync and the export, compared
with peft's own merge_and_unload on every LoRA configuration the trainer can build, and
on the peft features around it (fan_in_fan_out, embeddings, modules_to_save, several or
disabled adapters); what it does not merge (DoRA, LoRA bias) is refused by both paths."""

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from cepo.export import export_hf, merged_state_dict
from cepo.policy import apply_lora
from cepo.weight_sync import iter_full_weights, iter_weight_buckets

COMMON = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _model(arch: str, dtype=torch.float32):
    torch.manual_seed(0)
    if arch == "qwen3":  # tied embeddings and head
        config = transformers.Qwen3Config(head_dim=8, tie_word_embeddings=True, **COMMON)
        lm = transformers.Qwen3ForCausalLM(config)
    elif arch == "llama":  # untied head
        config = transformers.LlamaConfig(tie_word_embeddings=False, **COMMON)
        lm = transformers.LlamaForCausalLM(config)
    elif arch == "gpt2":  # Conv1D layers: LoRA with fan_in_fan_out
        config = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4,
                                         n_positions=64)
        lm = transformers.GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    return lm.to(dtype)


def _randomise_adapters(peft_model, seed: int = 1):
    """peft starts B (or the embedding A) at zero, which would make every merge a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)
    return peft_model


def _reference(peft_model) -> dict[str, torch.Tensor]:
    return copy.deepcopy(peft_model).merge_and_unload().state_dict()


def _assert_matches_peft(peft_model, atol=1e-6):
    ref = _reference(peft_model)
    ours = dict(iter_full_weights(peft_model))
    params = {n for n, _ in copy.deepcopy(peft_model).merge_and_unload().named_parameters()}
    assert set(ours) == params  # every parameter once, HF names, no adapter left
    for name, t in ours.items():
        assert t.dtype == ref[name].dtype, name
        torch.testing.assert_close(t, ref[name], rtol=0, atol=atol, msg=name)
    bucketed = [x for b in iter_weight_buckets(peft_model, bucket_bytes=1 << 12) for x in b]
    assert [n for n, _ in bucketed] == list(ours)
    exported = merged_state_dict(peft_model)
    for name, t in ref.items():  # the export holds everything merge_and_unload does
        torch.testing.assert_close(exported[name], t, rtol=0, atol=atol, msg=name)
    return ours


# what the trainer builds: cepo.policy.apply_lora(lm, rank, alpha, target_modules)
TRAINER_CONFIGS = [
    ("qwen3", ["q_proj", "v_proj"]),
    ("qwen3", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("qwen3", ["embed_tokens", "q_proj"]),  # LoRA on the (tied) embedding
    ("llama", ["q_proj", "v_proj", "lm_head"]),  # LoRA on an untied head
    ("llama", ["embed_tokens", "down_proj"]),
    ("gpt2", ["c_attn", "c_proj"]),  # Conv1D: fan_in_fan_out set by peft
]


@pytest.mark.parametrize("arch,targets", TRAINER_CONFIGS,
                         ids=["-".join([a, *t]) for a, t in TRAINER_CONFIGS])
def test_trainer_lora_configs_merge_like_peft(arch, targets):
    peft_model = _randomise_adapters(apply_lora(_model(arch), 4, 8, targets))
    ours = _assert_matches_peft(peft_model)
    base = _model(arch).state_dict()
    moved = [n for n in ours if n in base and not torch.equal(ours[n], base[n])]
    assert moved  # the merge changed the targeted weights


def test_fan_in_fan_out_is_transposed():
    peft_model = _randomise_adapters(apply_lora(_model("gpt2"), 4, 8, ["c_attn"]))
    layer = peft_model.get_base_model().transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out
    w = dict(iter_full_weights(peft_model))["transformer.h.0.attn.c_attn.weight"]
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).T * 2
    torch.testing.assert_close(w, layer.base_layer.weight + delta, rtol=0, atol=1e-6)


def test_bf16_merges_in_fp32_and_casts_back():
    peft_model = _randomise_adapters(apply_lora(_model("llama", torch.bfloat16), 4, 8,
                                                ["q_proj", "v_proj"]))
    _assert_matches_peft(peft_model, atol=1e-2)  # peft merges in bf16; we round once


def test_rslora_modules_to_save_and_several_adapters():
    lm = _model("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        use_rslora=True, modules_to_save=["lm_head"], lora_dropout=0.0)
    peft_model = get_peft_model(lm, config)
    peft_model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]))
    peft_model.base_model.set_adapter(["default", "second"])
    _randomise_adapters(peft_model)
    ours = _assert_matches_peft(peft_model)
    head = peft_model.get_base_model().lm_head
    torch.testing.assert_close(ours["lm_head.weight"], head.modules_to_save["default"].weight)


def test_disabled_adapters_leave_the_base_weights():
    peft_model = _randomise_adapters(apply_lora(_model("llama"), 4, 8, ["q_proj"]))
    base = _model("llama").state_dict()
    with peft_model.disable_adapter():
        ours = dict(iter_full_weights(peft_model))
    for name, t in ours.items():
        assert torch.equal(t, base[name]), name


@pytest.mark.parametrize("extra", [dict(use_dora=True), dict(lora_bias=True)], ids=["dora", "bias"])
def test_unmergeable_adapters_are_refused_by_sync_and_export(extra, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0, **extra)
    peft_model = _randomise_adapters(get_peft_model(_model("llama"), config))
    with pytest.raises(NotImplementedError, match="q_proj"):
        list(iter_full_weights(peft_model))
    with pytest.raises(NotImplementedError, match="q_proj"):
        export_hf(peft_model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_exported_model_is_the_merged_model(arch, tmp_path):
    """export_hf writes what merge_and_unload gives: same logits after from_pretrained."""
    peft_model = _randomise_adapters(apply_lora(_model(arch), 4, 8, ["embed_tokens", "q_proj",
                                                                     "v_proj"]))
    out = export_hf(peft_model, None, tmp_path / "export")
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = copy.deepcopy(peft_model).merge_and_unload()(input_ids=ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
