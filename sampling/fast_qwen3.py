"""A lean Qwen3 decode step on the model's own weights: one token per row, no module overhead.

Per layer the q/k/v and gate/up projections are fused into one matmul each; keys and values live in
preallocated [B, kv_heads, slots, head_dim] buffers filled in place; attention reads only the slots
written so far. Used for full-precision Qwen3 models, with or without LoRA adapters; 4-bit and other
models take the `transformers` forward. Weights are gathered once per rollout, so they follow training
updates. LoRA adapters are merged into these rollout copies (W + scale * B @ A), never into the model's
own weights: no merge/unmerge round trip that would drift bf16 weights, and no per-token adapter cost.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _base(model: Any) -> Any:
    """The Qwen3ForCausalLM inside a peft model, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linear_supported(m: Any) -> bool:
    """A plain torch Linear, or a peft LoRA layer (no DoRA) over a plain torch Linear (not 4-bit)."""
    if type(m) is torch.nn.Linear:
        return True
    if type(getattr(m, "base_layer", None)) is not torch.nn.Linear or getattr(m, "fan_in_fan_out", False):
        return False
    return not any(m.use_dora.get(a, False) for a in getattr(m, "active_adapters", []))


def effective_weight(m: Any) -> torch.Tensor:
    """The weight a Linear (or a peft LoRA Linear) applies: base + scaling * B @ A of each active adapter."""
    if type(m) is torch.nn.Linear:
        return m.weight
    w = m.base_layer.weight
    if m.merged or m.disable_adapters:
        return w
    w = w.float()
    for a in m.active_adapters:
        if a in m.lora_A:
            w = w + m.scaling[a] * (m.lora_B[a].weight.float() @ m.lora_A[a].weight.float())
    return w


def supports(model: Any) -> bool:
    """True for a Qwen3ForCausalLM (bare or under LoRA) whose linear layers are bias-free, full-precision
    torch Linears."""
    model = _base(model)
    if type(model).__name__ != "Qwen3ForCausalLM":
        return False
    cfg = model.config
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "attention_bias", False):
        return False
    if cfg.rope_parameters.get("rope_type", "default") != "default":
        return False
    layer = model.model.layers[0]
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
               layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    return all(_linear_supported(m) for m in linears)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class FastQwen3:
    """Decode-step weights of `model` in `dtype` (fused copies) and the shapes they need."""

    def __init__(self, model: Any, dtype: torch.dtype):
        model = _base(model)
        cfg = model.config
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.dtype = dtype
        self.inv_freq = model.model.rotary_emb.inv_freq.float()
        self.scaling = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))
        with torch.no_grad():
            self.layers = []
            for layer in model.model.layers:
                a, m = layer.self_attn, layer.mlp
                # q_norm and k_norm as one [H + KV, D] weight, so q and k are normed and rotated together
                qk_norm = torch.cat([a.q_norm.weight.expand(self.n_heads, -1), a.k_norm.weight.expand(self.n_kv, -1)])
                w = effective_weight
                self.layers.append((
                    layer.input_layernorm.weight.to(dtype),
                    torch.cat([w(a.q_proj), w(a.k_proj), w(a.v_proj)]).to(dtype),
                    qk_norm.to(dtype), w(a.o_proj).to(dtype),
                    layer.post_attention_layernorm.weight.to(dtype),
                    torch.cat([w(m.gate_proj), w(m.up_proj)]).to(dtype), w(m.down_proj).to(dtype),
                ))
            self.embed = model.model.embed_tokens.weight.to(dtype)
            self.norm = model.model.norm.weight.to(dtype)
            self.lm_head = model.lm_head.weight.to(dtype)

    def step(self, token: torch.Tensor, position: torch.Tensor, keys: list[torch.Tensor],
             values: list[torch.Tensor], slot: torch.Tensor, width: int, slot_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for one new token per row, written into cache slot `slot` ([1] long tensor).

        position [B]: RoPE positions; slot_mask [B, slots]: True where a row may attend. Attention reads
        the first `width` slots (> slot) and masks those after `slot`, so with a fixed width every shape
        is fixed and nothing reads a tensor's value on the host: the step can be captured as a CUDA graph."""
        B, H, KV, D = token.shape[0], self.n_heads, self.n_kv, self.head_dim
        freqs = position[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(self.dtype)[:, None, :]  # [B, 1, D]
        sin = (emb.sin() * self.scaling).to(self.dtype)[:, None, :]
        allowed = slot_mask[:, :width] & (torch.arange(width, device=token.device) <= slot)
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=token.device)
        bias = bias.masked_fill_(~allowed, float("-inf"))[:, None, None, :]  # [B, 1, 1, width]
        h = self.embed[token]  # [B, hidden]
        for i, (ln1, wqkv, qk_norm, wo, ln2, wgu, wdown) in enumerate(self.layers):
            qkv = _rms(h, ln1, self.eps) @ wqkv.T
            qk = _rotate(_rms(qkv[:, : (H + KV) * D].view(B, H + KV, D), qk_norm, self.eps), cos, sin)
            keys[i].index_copy_(2, slot, qk[:, H:, None])
            values[i].index_copy_(2, slot, qkv[:, (H + KV) * D:].view(B, KV, 1, D))
            ks, vs = keys[i][:, :, :width], values[i][:, :, :width]  # [B, KV, width, D]
            # one query per row: grouped heads as a [B, KV, H/KV, D] x [B, KV, D, width] product
            scores = (qk[:, :H].reshape(B, KV, H // KV, D) @ ks.transpose(-1, -2)) * self.head_dim**-0.5
            probs = torch.softmax(scores.float() + bias, dim=-1).to(vs.dtype)
            h = h + (probs @ vs).reshape(B, H * D) @ wo.T
            gate, up = (_rms(h, ln2, self.eps) @ wgu.T).chunk(2, dim=-1)
            h = h + (F.silu(gate) * up) @ wdown.T
        return _rms(h, self.norm, self.eps) @ self.lm_head.T
