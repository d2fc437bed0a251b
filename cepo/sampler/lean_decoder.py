"""A lean decoding step for Llama-family models (Llama, Qwen2, Qwen3), for the Hugging Face
engine's compact loop.

After the prompt's forward, every decoding step feeds one token per row. At that size a
Hugging Face forward is dominated by per-operation overhead, not arithmetic: module calls,
a causal mask rebuilt every step, a cache concatenated every step, an attention
dispatcher; ~1300 small operations a step for the shipped 4-layer model. This module runs
the same computation from the model's own weights in ~25 operations a layer: the q / k / v
and the gate / up projections each one product (``LeanWeights`` makes the modules'
weights views of one tensor, so nothing is copied and weight updates reach both), the q /
k norms and the rotary embedding of q and k applied together, a preallocated KV cache
written one slot a step, and the padding bias built once.

The arithmetic is the model's: the same weights, the Hugging Face RMSNorm formula (fp32),
the model's own rotary module and activation, the eager attention's fp32 softmax; its
logits agree with ``model(...)`` to rounding, and the engine's tests compare the
completions token for token with ``model.generate``. Models outside the allowlist,
sliding-window layers and quantised weights keep the Hugging Face forward
(``lean_decoder_unsupported`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def lean_decoder_unsupported(model) -> str | None:
    """Why ``LeanDecoder`` cannot serve ``model`` (a Hugging Face causal LM), or None when
    it can: a Llama / Qwen2 / Qwen3 text model with full attention in every layer,
    unquantised weights and the standard module layout."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(model, "hf_quantizer", None) is not None:
        return "quantised weights"
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in layer_types) or getattr(
            config, "use_sliding_window", False):
        return "a layer is not full attention (sliding window)"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    body = getattr(model, "model", None)
    if body is None or not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm",
                                                           "rotary_emb")):
        return "no model.embed_tokens / layers / norm / rotary_emb"
    if not hasattr(model, "lm_head"):
        return "no lm_head"
    for layer in body.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(
                hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            return "a layer without the q / k / v / o projections"
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "a layer without the gated MLP"
        if (attn.q_proj.bias is None) != (attn.k_proj.bias is None) or (
                attn.q_proj.bias is None) != (attn.v_proj.bias is None):
            return "q / k / v projections with and without bias"
        if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None:
            return "a gated MLP with bias"
    return None


@dataclass
class _Layer:
    """One decoder layer's tensors, read once instead of through module attributes."""
    norm1: torch.Tensor
    eps1: float
    qkv: torch.Tensor              # [(heads + 2 kv_heads) d, H]: q, k, v rows
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None    # [d] (Qwen3), the module's weight
    k_norm: torch.Tensor | None
    qk_norm: torch.Tensor | None   # [heads + kv_heads, d]: q_norm / k_norm per head
    qk_eps: float
    out: torch.Tensor
    out_bias: torch.Tensor | None
    scaling: float
    norm2: torch.Tensor
    eps2: float
    gate_up: torch.Tensor          # [2 I, H]: gate rows, then up rows
    act: torch.nn.Module
    down: torch.Tensor
    down_bias: torch.Tensor | None


def _fuse(modules: list[torch.nn.Linear], name: str) -> torch.Tensor | None:
    """Concatenate the modules' ``name`` tensors (weight or bias) along dim 0 and make each
    module's a view of the result: nothing is duplicated, and a copy into a module's
    tensor (a weight update) lands in the fused one."""
    parts = [getattr(m, name) for m in modules]
    if parts[0] is None:
        return None
    fused = torch.cat([p.detach() for p in parts])
    start = 0
    for module, part in zip(modules, parts):
        view = fused[start:start + part.shape[0]]
        setattr(module, name, torch.nn.Parameter(view, requires_grad=part.requires_grad))
        start += part.shape[0]
    return fused


def _norm_eps(norm: torch.nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or norm.eps


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Hugging Face Llama-family RMSNorm, operation for operation (fp32 inside)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class LeanWeights:
    """A model's weights in the layout ``LeanDecoder`` reads, built once per engine.

    Fuses each layer's q / k / v and gate / up projections in place (``_fuse``): the
    modules keep working, as views of the fused tensors. Only for a model the caller
    owns (the engine's own copy).
    """

    def __init__(self, model):
        reason = lean_decoder_unsupported(model)
        if reason is not None:
            raise ValueError(f"LeanWeights: unsupported model: {reason}")
        config = model.config
        body = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.layers: list[_Layer] = []
        for layer in body.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            projections = [attn.q_proj, attn.k_proj, attn.v_proj]
            q_norm = k_norm = qk_norm = None
            qk_eps = 0.0
            if hasattr(attn, "q_norm"):
                q_norm, k_norm = attn.q_norm.weight, attn.k_norm.weight
                qk_norm = q_norm.new_empty((self.heads + self.kv_heads, q_norm.shape[0]))
                qk_eps = _norm_eps(attn.q_norm)
            self.layers.append(_Layer(
                norm1=layer.input_layernorm.weight, eps1=_norm_eps(layer.input_layernorm),
                qkv=_fuse(projections, "weight"), qkv_bias=_fuse(projections, "bias"),
                q_norm=q_norm, k_norm=k_norm, qk_norm=qk_norm, qk_eps=qk_eps,
                out=attn.o_proj.weight, out_bias=attn.o_proj.bias, scaling=attn.scaling,
                norm2=layer.post_attention_layernorm.weight,
                eps2=_norm_eps(layer.post_attention_layernorm),
                gate_up=_fuse([mlp.gate_proj, mlp.up_proj], "weight"), act=mlp.act_fn,
                down=mlp.down_proj.weight, down_bias=mlp.down_proj.bias))
        self.embed = body.embed_tokens.weight
        self.rotary = body.rotary_emb
        self.norm, self.norm_eps = body.norm.weight, _norm_eps(body.norm)
        self.head = model.lm_head.weight
        self.head_bias = getattr(model.lm_head, "bias", None)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the one input a weight update does not write through a view: the q / k
        norm weights, repeated per head (call after updating the model's weights)."""
        with torch.no_grad():
            for layer in self.layers:
                if layer.qk_norm is not None:
                    layer.qk_norm[: self.heads] = layer.q_norm
                    layer.qk_norm[self.heads:] = layer.k_norm


class LeanDecoder:
    """Decoding steps of one left-padded batch after its prompt forward.

    weights: the engine's ``LeanWeights``. cache: the ``DynamicCache`` the prompt forward
    filled ([B, kv_heads, W, d] keys and values per layer, rotary applied). mask: [B, W]
    attention mask of the prompt (1 = token, 0 = left padding). max_new_tokens: steps the
    batch may run; the cache holds W + max_new_tokens positions.
    """

    def __init__(self, weights: LeanWeights, cache, mask: torch.Tensor, max_new_tokens: int):
        self.w = weights
        count = len(weights.layers)
        keys = [cache.layers[i].keys for i in range(count)]
        values = [cache.layers[i].values for i in range(count)]
        batch, kv_heads, width, head_dim = keys[0].shape
        capacity = width + max_new_tokens
        self.k = [k.new_empty((batch, kv_heads, capacity, head_dim)) for k in keys]
        self.v = [v.new_empty((batch, kv_heads, capacity, head_dim)) for v in values]
        for buf, src in zip(self.k + self.v, keys + values):
            buf[:, :, :width] = src
        # additive attention bias: -inf at the prompt's left padding, 0 everywhere else
        self.bias = torch.zeros((batch, capacity), dtype=torch.float32, device=keys[0].device)
        self.bias[:, :width].masked_fill_(mask.to(self.bias.device) == 0, float("-inf"))
        self.length = width
        self.head_dim = head_dim

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` ([B'] long indices, on the cache's device); copies only
        the cache positions written so far (one buffer per layer and kind: a gather over
        one [layers, 2, B, ...] buffer measured slower)."""
        n = self.length

        def rows(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty((keep.shape[0],) + t.shape[1:])
            out[:, :, :n] = t[:, :, :n].index_select(0, keep)
            return out

        self.k = [rows(k) for k in self.k]
        self.v = [rows(v) for v in self.v]
        self.bias = self.bias.index_select(0, keep)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the next token after ``tokens`` [B] at ``positions`` [B, 1]."""
        w = self.w
        batch, slot = tokens.shape[0], self.length
        length = slot + 1
        heads, kv_heads, d = w.heads, w.kv_heads, self.head_dim
        half = d // 2
        x = F.embedding(tokens, w.embed)                                  # [B, H]
        cos, sin = w.rotary(x, positions)                                 # [B, 1, d]
        bias = self.bias[:, None, None, :length]                          # [B, 1, 1, L]
        for layer, k_cache, v_cache in zip(w.layers, self.k, self.v):
            h = _rms_norm(x, layer.norm1, layer.eps1)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias).view(batch, heads + 2 * kv_heads, d)
            qk = qkv[:, : heads + kv_heads]
            if layer.qk_norm is not None:
                qk = _rms_norm(qk, layer.qk_norm, layer.qk_eps)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            k_cache[:, :, slot] = qk[:, heads:]
            v_cache[:, :, slot] = qkv[:, heads + kv_heads:]
            q = qk[:, :heads].view(batch, kv_heads, heads // kv_heads, d)
            scores = torch.matmul(q, k_cache[:, :, :length].transpose(-1, -2))  # [B, kv, g, L]
            probs = torch.softmax(scores.mul_(layer.scaling).add_(bias), -1,
                                  dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v_cache[:, :, :length]).reshape(batch, heads * d)
            x = x + F.linear(out, layer.out, layer.out_bias)
            h = _rms_norm(x, layer.norm2, layer.eps2)
            gate, up = F.linear(h, layer.gate_up).chunk(2, -1)
            x = x + F.linear(layer.act(gate) * up, layer.down, layer.down_bias)
        self.length = length
        x = _rms_norm(x, w.norm, w.norm_eps)
        return F.linear(x, w.head, w.head_bias)
