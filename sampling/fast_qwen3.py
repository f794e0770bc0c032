"""A lean Qwen3 decode step on the model's own weights: one token per row, no module overhead.

Per layer the q/k/v and gate/up projections are fused into one matmul each; keys and values live in
preallocated [B, kv_heads, slots, head_dim] buffers filled in place; attention reads only the slots
written so far. Used for plain (full-precision, adapter-free) Qwen3 models; others take the
`transformers` forward. Weights are gathered once per rollout, so they follow training updates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def supports(model: Any) -> bool:
    """True for a plain Qwen3ForCausalLM whose linear layers are ordinary, bias-free torch Linears."""
    if type(model).__name__ != "Qwen3ForCausalLM" or getattr(model, "peft_config", None):
        return False
    cfg = model.config
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "attention_bias", False):
        return False
    if cfg.rope_parameters.get("rope_type", "default") != "default":
        return False
    layer = model.model.layers[0]
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
               layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    return all(type(m) is torch.nn.Linear for m in linears)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class FastQwen3:
    """Decode-step weights of `model` in `dtype` (fused copies) and the shapes they need."""

    def __init__(self, model: Any, dtype: torch.dtype):
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
                self.layers.append((
                    layer.input_layernorm.weight.to(dtype),
                    torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).to(dtype),
                    qk_norm.to(dtype), a.o_proj.weight.to(dtype),
                    layer.post_attention_layernorm.weight.to(dtype),
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]).to(dtype), m.down_proj.weight.to(dtype),
                ))
            self.embed = model.model.embed_tokens.weight.to(dtype)
            self.norm = model.model.norm.weight.to(dtype)
            self.lm_head = model.lm_head.weight.to(dtype)

    def step(self, token: torch.Tensor, position: torch.Tensor, keys: list[torch.Tensor],
             values: list[torch.Tensor], slot: int, slot_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for one new token per row, written into cache slot `slot`.

        position [B]: RoPE positions; slot_mask [B, slot + 1]: True where a row may attend."""
        B, H, KV, D = token.shape[0], self.n_heads, self.n_kv, self.head_dim
        freqs = position[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(self.dtype)[:, None, :]  # [B, 1, D]
        sin = (emb.sin() * self.scaling).to(self.dtype)[:, None, :]
        bias = torch.zeros(slot_mask.shape, dtype=torch.float32, device=token.device)
        bias = bias.masked_fill_(~slot_mask, float("-inf"))[:, None, None, :]  # [B, 1, 1, S]
        h = self.embed[token]  # [B, hidden]
        for i, (ln1, wqkv, qk_norm, wo, ln2, wgu, wdown) in enumerate(self.layers):
            qkv = _rms(h, ln1, self.eps) @ wqkv.T
            qk = _rotate(_rms(qkv[:, : (H + KV) * D].view(B, H + KV, D), qk_norm, self.eps), cos, sin)
            keys[i][:, :, slot] = qk[:, H:]
            values[i][:, :, slot] = qkv[:, (H + KV) * D:].view(B, KV, D)
            ks, vs = keys[i][:, :, : slot + 1], values[i][:, :, : slot + 1]  # [B, KV, S, D]
            # one query per row: grouped heads as a [B, KV, H/KV, D] x [B, KV, D, S] product
            scores = (qk[:, :H].reshape(B, KV, H // KV, D) @ ks.transpose(-1, -2)) * self.head_dim**-0.5
            probs = torch.softmax(scores.float() + bias, dim=-1).to(vs.dtype)
            h = h + (probs @ vs).reshape(B, H * D) @ wo.T
            gate, up = (_rms(h, ln2, self.eps) @ wgu.T).chunk(2, dim=-1)
            h = h + (F.silu(gate) * up) @ wdown.T
        return _rms(h, self.norm, self.eps) @ self.lm_head.T
