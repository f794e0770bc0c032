"""A lean decode step on the model's own weights: one token per row, no module overhead.

Three families share it: Qwen3 (q/k RMS norm), Qwen2/Qwen2.5 (q/k/v biases) and Llama (Llama-2/3,
SmolLM2; Llama-3's rope scaling is in the rotary inv_freq the model built). On CUDA, per layer the
q/k/v and gate/up projections are fused into one matmul each (fewer launches); on the CPU they stay
apart and the step reads the model's own weights where the dtype matches (no copy: the products read
the same bytes either way, and a 1B model's 4 GB of layer copies cost time and memory every rollout).
Keys and values live in preallocated [B, kv_heads, slots, head_dim] buffers filled in place; attention
reads only the slots written so far. Used for full-precision models of those families, with or without
LoRA adapters; 4-bit and other models take the `transformers` forward. Weights are gathered once per
rollout, so they follow training updates. LoRA adapters are merged into these rollout copies
(W + scale * B @ A), never into the model's own weights: no merge/unmerge round trip that would drift
bf16 weights, and no per-token adapter cost. A tied embedding (Qwen3-0.6B's) is copied once and serves
as the output head too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
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


@dataclass(frozen=True)
class Family:
    """What the step does differently for one family of decoder (its transformers class name is the key)."""

    qk_norm: bool  # an RMS norm over each head's q and k before RoPE (`self_attn.q_norm`, `k_norm`)
    note: str


# The families the lean step runs. Each is a stack of pre-norm layers (RMSNorm -> attention with RoPE
# and grouped KV heads -> residual; RMSNorm -> SiLU-gated MLP -> residual) read as `LayerWeights`;
# q/k/v biases are taken wherever the model has them (Qwen2 always, Llama with attention_bias).
# To add a family of that shape (e.g. Mistral without sliding window): one entry here, a `random:`
# shape in models/tiny.py and its case in tests/test_families.py (greedy equal to `generate`, sampled
# logprobs equal to a forward). A family whose layer reads differently (Gemma's (1 + w) norms and
# scaled embedding, a sliding window) also needs its difference in `_layer_weights` and `step`.
FAMILIES = {
    "Qwen3ForCausalLM": Family(qk_norm=True, note="Qwen3: q/k norms"),
    "Qwen2ForCausalLM": Family(qk_norm=False, note="Qwen2, Qwen2.5: q/k/v biases"),
    "LlamaForCausalLM": Family(qk_norm=False, note="Llama-2/3, SmolLM2: Llama-3's rope scaling in inv_freq"),
}
STATIC_ROPE = ("default", "linear", "llama3")  # inv_freq fixed when the model is built (not dynamic NTK)


def _bias(m: Any) -> torch.Tensor | None:
    return getattr(m, "base_layer", m).bias


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def supports(model: Any) -> bool:
    """True for a causal LM of a family in FAMILIES (bare or under LoRA) whose linear layers are
    full-precision torch Linears, biased at most on q/k/v, with a static rope and full attention."""
    model = _base(model)
    if type(model).__name__ not in FAMILIES:
        return False
    cfg = model.config
    sliding = getattr(cfg, "use_sliding_window", False)
    if sliding or any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in STATIC_ROPE:
        return False
    layer = model.model.layers[0]
    a, m = layer.self_attn, layer.mlp
    if hasattr(a, "q_norm") != FAMILIES[type(model).__name__].qk_norm:
        return False  # not the layer the table describes
    if any(_bias(x) is not None for x in (a.o_proj, m.gate_proj, m.up_proj, m.down_proj)):
        return False
    return all(_linear_supported(x) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj,
                                              m.down_proj))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) as the model's RMSNorm rounds it: normed in float32, cast back, then scaled.
    One fused op and a product (on CUDA `rms_norm` is one kernel, float32 inside, instead of six)."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


Weight = torch.Tensor | tuple[torch.Tensor, ...]  # one weight, or the pieces of a fused one, kept apart


def _pieces(item: Weight) -> tuple[torch.Tensor, ...]:
    return item if isinstance(item, tuple) else (item,)


FEW_ROWS = 32  # up to this many rows, the CPU's products go as (w @ x.T).T
COPY_COLUMNS = 4096  # columns per piece of that product's transposing copy


def _linear(x: torch.Tensor, w: Weight, cuda_layout: bool) -> torch.Tensor:
    """x @ w.T for rows x [B, in] and a weight w [out, in]: one product in the CUDA layout; on the CPU,
    for up to FEW_ROWS rows, as (w @ x.T).T, the [out, B] product copied to [B, out] a few thousand
    columns at a time. A tuple of weights (unfused q/k/v or gate/up) gives their outputs side by side,
    as the fused one would."""
    # for a few rows MKL's sgemm runs x @ w.T well below the rate of reading the weight and w @ x.T near
    # it; with more rows x @ w.T is as fast or faster. A transposing copy of a vocabulary's logits in one
    # piece costs many plain copies; in cache-sized pieces much less
    if isinstance(w, tuple):
        return torch.cat([_linear(x, piece, cuda_layout) for piece in w], dim=-1)
    if cuda_layout or x.shape[0] > FEW_ROWS:
        return x @ w.T
    product = torch.mm(w, x.T)  # [out, B]
    out = torch.empty((x.shape[0], w.shape[0]), dtype=product.dtype, device=product.device)
    for start in range(0, w.shape[0], COPY_COLUMNS):
        out[:, start: start + COPY_COLUMNS].copy_(product[start: start + COPY_COLUMNS].T)
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, swap: torch.Tensor) -> torch.Tensor:
    """RoPE, x * cos + rotate_half(x) * sin, in four ops instead of six: rotate_half(x) = (-x2, x1) is
    x's halves swapped (`swap`, an index) times the sign that `sin_signed` (-sin, sin) already carries.
    The same values to the bit (negation is exact); `addcmul` would save one more op but round once
    where the model rounds twice."""
    return x * cos + x[..., swap] * sin_signed


def _tied(model: Any) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@dataclass
class LayerWeights:
    """One decoder layer's weights as the step reads them, in the dtype of the step. On CUDA `qkv` and
    `gate_up` are fused copies (one product each); on the CPU, tuples of the model's own weights. None
    where the family has no such weight."""

    input_norm: torch.Tensor  # RMSNorm before attention
    qkv: Weight  # q, k, v projections ([(H + 2 KV) * D, hidden] when fused)
    qkv_bias: torch.Tensor | None  # their biases, side by side (zeros for a projection without one)
    qk_norm: torch.Tensor | None  # q_norm and k_norm as one [H + KV, D] weight: q and k normed together
    o: torch.Tensor  # attention output projection
    post_attention_norm: torch.Tensor  # RMSNorm before the MLP
    gate_up: Weight  # the MLP's gate and up projections
    down: torch.Tensor  # the MLP's down projection

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in field order (the pieces of an unfused weight one by one)."""
        return [t for f in fields(self) if (item := getattr(self, f.name)) is not None for t in _pieces(item)]

    def to(self, dtype: torch.dtype) -> LayerWeights:
        return LayerWeights(*(None if x is None else tuple(t.to(dtype) for t in x) if isinstance(x, tuple)
                              else x.to(dtype) for x in (getattr(self, f.name) for f in fields(self))))


def _layer_weights(layer: Any, cfg: Any, fuse: bool) -> LayerWeights:
    """`layer`'s weights as the model holds them (adapters merged); a fused weight is built only when asked."""
    a, m, w = layer.self_attn, layer.mlp, effective_weight
    qkv = (w(a.q_proj), w(a.k_proj), w(a.v_proj))
    biases = [_bias(x) for x in (a.q_proj, a.k_proj, a.v_proj)]
    device = layer.input_layernorm.weight.device
    qkv_bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(x.out_features, device=device)
         for b, x in zip(biases, (a.q_proj, a.k_proj, a.v_proj))])
    qk_norm = None if not hasattr(a, "q_norm") else torch.cat(
        [a.q_norm.weight.expand(cfg.num_attention_heads, -1), a.k_norm.weight.expand(cfg.num_key_value_heads, -1)])
    gate_up = (w(m.gate_proj), w(m.up_proj))
    return LayerWeights(layer.input_layernorm.weight, torch.cat(qkv) if fuse else qkv, qkv_bias, qk_norm, w(a.o_proj),
                        layer.post_attention_layernorm.weight, torch.cat(gate_up) if fuse else gate_up,
                        w(m.down_proj))


def _sources(model: Any, fuse: bool) -> Iterator[LayerWeights | torch.Tensor]:
    """The decode step's weights in a fixed order, one layer at a time: each layer's `LayerWeights`,
    then the embedding, the final norm and (untied models only) the head."""
    for layer in model.model.layers:
        yield _layer_weights(layer, model.config, fuse)
    yield model.model.embed_tokens.weight
    yield model.model.norm.weight
    if not _tied(model):
        yield model.lm_head.weight


def _flat(item: LayerWeights | torch.Tensor) -> list[torch.Tensor]:
    return item.tensors() if isinstance(item, LayerWeights) else [item]


class DecodeWeights:
    """Decode-step weights of `model` in `dtype` and the shapes they need. `cuda_layout` (default: on
    CUDA) fuses q/k/v and gate/up into copies and runs every product as one matmul; the CPU tests force
    it to count the ops a CUDA step launches (tests/test_sampling.py)."""

    def __init__(self, model: Any, dtype: torch.dtype, cuda_layout: bool | None = None):
        model = _base(model)
        cfg = model.config
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
        self.dtype = dtype
        self.inv_freq = model.model.rotary_emb.inv_freq.float()
        self.scaling = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))
        self.cuda_layout = model.model.embed_tokens.weight.is_cuda if cuda_layout is None else cuda_layout
        D, device = self.head_dim, self.inv_freq.device
        self.rope_swap = torch.cat((torch.arange(D // 2, D), torch.arange(D // 2))).to(device)  # (x2, x1)
        self.rope_sign = torch.cat((-torch.ones(D // 2), torch.ones(D // 2))).to(device)  # rotate_half's signs
        with torch.no_grad():
            items = [item.to(dtype) for item in _sources(model, self.cuda_layout)]
        n = len(model.model.layers)
        self.layers: list[LayerWeights] = items[:n]
        self.embed, self.norm = items[n], items[n + 1]
        self.lm_head = items[n + 2] if len(items) > n + 2 else self.embed  # tied: one copy serves both

    def tensors(self) -> list[torch.Tensor]:
        """Every weight the step reads, each once, in `_sources`' order."""
        out = [t for layer in self.layers for t in layer.tensors()] + [self.embed, self.norm]
        return out if self.lm_head is self.embed else out + [self.lm_head]

    @torch.no_grad()
    def load(self, model: Any) -> None:
        """Copy `model`'s current weights (adapters merged) into these tensors in place: the same
        addresses, so CUDA graphs captured on them stay valid, and no second set is ever held."""
        sources = (t for item in _sources(_base(model), self.cuda_layout) for t in _flat(item))
        for dst, src in zip(self.tensors(), sources, strict=True):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)

    def step(self, token: torch.Tensor, position: torch.Tensor, keys: list[torch.Tensor],
             values: list[torch.Tensor], slot: torch.Tensor, width: int, slot_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for one new token per row, written into cache slot `slot`: a [1] long tensor (one
        slot for every row) or [B] (each row its own slot: continuous batching).

        position [B]: RoPE positions; slot_mask [B, slots]: True where a row may attend. Attention reads
        the first `width` slots (> every slot) and masks those after a row's slot, so with a fixed width
        every shape is fixed and nothing reads a tensor's value on the host: the step can be captured as a
        CUDA graph."""
        B, H, KV, D = token.shape[0], self.n_heads, self.n_kv, self.head_dim
        freqs = position[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(self.dtype)[:, None, :]  # [B, 1, D]
        sin = (emb.sin() * (self.scaling * self.rope_sign)).to(self.dtype)[:, None, :]  # (-sin, sin)
        allowed = slot_mask[:, :width] & (torch.arange(width, device=token.device)[None, :] <= slot[:, None])
        per_row = slot.shape[0] > 1
        if per_row:  # each row's slot as an index into the cache viewed as [B * KV * slots, D]
            S = keys[0].shape[2]
            flat = ((torch.arange(B, device=token.device)[:, None] * KV + torch.arange(KV, device=token.device))
                    * S + slot[:, None]).reshape(-1)
        # the mask as an additive bias in the step's dtype (0 or -inf: adding it rounds nothing), one row
        # per (row, KV head): attention runs as [B * KV] products of a KV head's H/KV queries
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=token.device).masked_fill_(~allowed, float("-inf"))
        bias = bias.repeat_interleave(KV, dim=0)[:, None, :]  # [B * KV, 1, width]
        h, cuda = self.embed[token], self.cuda_layout  # [B, hidden]; products as CUDA runs them
        for i, layer in enumerate(self.layers):
            qkv = _linear(_rms(h, layer.input_norm, self.eps), layer.qkv, cuda)
            if layer.qkv_bias is not None:  # Qwen2
                qkv = qkv + layer.qkv_bias
            qk = qkv[:, : (H + KV) * D].view(B, H + KV, D)
            if layer.qk_norm is not None:  # Qwen3
                qk = _rms(qk, layer.qk_norm, self.eps)
            qk = _rotate(qk, cos, sin, self.rope_swap)
            if per_row:
                keys[i].view(-1, D).index_copy_(0, flat, qk[:, H:].reshape(B * KV, D))
                values[i].view(-1, D).index_copy_(0, flat, qkv[:, (H + KV) * D:].reshape(B * KV, D))
            else:
                keys[i].index_copy_(2, slot, qk[:, H:, None])
                values[i].index_copy_(2, slot, qkv[:, (H + KV) * D:].view(B, KV, 1, D))
            ks, vs = keys[i][:, :, :width].flatten(0, 1), values[i][:, :, :width].flatten(0, 1)  # [B * KV, width, D]
            q = qk[:, :H].reshape(B * KV, H // KV, D)  # a copy (q sits beside k in qk): a KV head's queries
            # scores scaled and masked in one product, softmax in float32, weights back in the step's dtype
            scores = torch.baddbmm(bias, q, ks.transpose(1, 2), alpha=D**-0.5)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(self.dtype)
            h = h + _linear(torch.bmm(probs, vs).view(B, H * D), layer.o, cuda)
            gate, up = _linear(_rms(h, layer.post_attention_norm, self.eps), layer.gate_up, cuda).chunk(2, dim=-1)
            h = h + _linear(F.silu(gate) * up, layer.down, cuda)
        return _linear(_rms(h, self.norm, self.eps), self.lm_head, cuda)


class DecodeState:
    """Everything the fast decode step reads: the weights (`DecodeWeights`), the KV cache (per layer a
    [rows, kv_heads, slots, head_dim] buffer) and which slots each row may attend. `load` refills it
    for a new rollout in place, so a state kept across rollouts (CUDA graphs read by address) keeps
    every tensor where it was."""

    def __init__(self, model: Any, dtype: torch.dtype, rows: int, slots: int, device: torch.device,
                 cuda_layout: bool | None = None):
        self.weights = DecodeWeights(model, dtype, cuda_layout)
        cfg = _base(model).config
        shape = (rows, cfg.num_key_value_heads, slots, head_dim(cfg))
        n = cfg.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.slot_mask = torch.zeros((rows, slots), dtype=torch.bool, device=device)
        self.rows, self.slots, self.dtype = rows, slots, dtype

    @torch.no_grad()
    def load(self, prefix_keys: list[torch.Tensor], prefix_values: list[torch.Tensor], mask: torch.Tensor,
             G: int) -> None:
        """Each prompt's prefilled keys/values ([P, KV, L, D] per layer) into slots [0, L) of its G rows,
        every later slot zeroed (a stale value, even a NaN, must not meet a zero attention weight);
        slot_mask: the prompt's real tokens, then every generated slot."""
        L = mask.shape[1]
        for store, prefix in ((self.keys, prefix_keys), (self.values, prefix_values)):
            for buf, p in zip(store, prefix, strict=True):
                buf[:, :, :L].copy_(p.repeat_interleave(G, dim=0))
                buf[:, :, L:].zero_()
        self.slot_mask[:, :L].copy_(mask.bool().repeat_interleave(G, dim=0))
        self.slot_mask[:, L:] = True

    def nbytes(self) -> int:
        """Bytes of what the step reads: the weights (copies on CUDA), the KV cache and the slot mask."""
        return sum(t.nbytes for t in (*self.weights.tensors(), *self.keys, *self.values, self.slot_mask))

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (new, smaller buffers: for eager decoding, never under CUDA graphs)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.slot_mask = self.slot_mask[rows]
        self.rows = rows.numel()

    def step(self, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor, width: int) -> torch.Tensor:
        return self.weights.step(token, position, self.keys, self.values, slot, width, self.slot_mask)
