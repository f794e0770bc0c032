"""Log-probabilities of chosen tokens under a model, the kernels both trainers' losses stand on
(SFT's cross-entropy, GRPO's ratio and KL): log softmax(z / T) at the chosen ids, worked through the
vocabulary a chunk at a time with hand-written backwards, so neither the [B, T, V] logits' fp32 copy
nor their gradient is held; and `projected_logprobs`, which does the head's projection itself so the
logits are never held at all. `logprobs_at` picks the path a model allows (`head_weight`).

Shapes: B rows, T positions, V vocabulary, H hidden size.
"""

from __future__ import annotations

import torch

# Logits worked through per chunk of positions: on the CPU ~2M elements (8 MB in fp32), which stays in
# cache across the passes; on GPUs 32M (128 MB), few enough chunks that kernel launches do not add up.
CPU_CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS = 1 << 21, 1 << 25


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays fp64


class _SelectedLogSoftmax(torch.autograd.Function):
    """log softmax(z / T) at the chosen ids, and (no grad) the softmax's entropy, with a hand-written
    backward: d logp / dz = (onehot(id) - softmax(z / T)) / T.

    Autograd through log_softmax + gather would keep and re-create several [N, V] tensors (the scaled
    copy, the softmax, a zero-filled gather gradient); this keeps only the logits and one fp32 scalar
    per position, and works through the vocabulary a chunk of positions at a time.
    """

    @staticmethod
    def forward(ctx, logits, ids, temperature, chunk, with_entropy, entropy_grad=False):  # noqa: ANN001, ANN205
        V = logits.shape[-1]
        z, idx = logits.reshape(-1, V), ids.reshape(-1, 1)
        dtype = _compute_dtype(logits.dtype)
        logp = torch.empty(z.shape[0], dtype=dtype, device=z.device)
        lse, entropy = torch.empty_like(logp), torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        for s in range(0, z.shape[0], chunk):
            zt = z[s: s + chunk].to(dtype) / temperature
            top = zt.amax(-1, keepdim=True)
            d = zt - top  # shifted so exp cannot overflow; softmax = e / total
            e = d.exp()
            total = e.sum(-1)
            log_total = total.log()
            lse[s: s + chunk] = top.squeeze(-1) + log_total
            logp[s: s + chunk] = d.gather(-1, idx[s: s + chunk]).squeeze(-1) - log_total
            if with_entropy:  # H = -sum p log p = log_total - sum e * d / total
                entropy[s: s + chunk] = log_total - e.mul_(d).sum(-1) / total
        ctx.save_for_backward(logits, ids, lse, entropy if entropy_grad else entropy.new_empty(0))
        ctx.temperature, ctx.chunk, ctx.entropy_grad = temperature, chunk, entropy_grad and with_entropy
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp.view(ids.shape), entropy.view(ids.shape) if with_entropy else entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):  # noqa: ANN001, ANN205
        logits, ids, lse, entropy = ctx.saved_tensors
        T, chunk, V = ctx.temperature, ctx.chunk, logits.shape[-1]
        z, idx = logits.reshape(-1, V), ids.reshape(-1, 1)
        g = (grad_logp.reshape(-1, 1) / T).to(lse.dtype)
        ge = _entropy_grad(ctx, grad_entropy, T, lse)
        grad = torch.empty_like(z)
        for s in range(0, z.shape[0], chunk):
            if ge is not None:
                log_p = (z[s: s + chunk].to(lse.dtype) / T).sub_(lse[s: s + chunk, None])
                p = _entropy_dz(log_p, g[s: s + chunk], ge[s: s + chunk], entropy[s: s + chunk])
                p.scatter_add_(-1, idx[s: s + chunk], g[s: s + chunk])
            else:
                p = (z[s: s + chunk].to(lse.dtype) / T).sub_(lse[s: s + chunk, None]).exp_()  # softmax(z / T)
                p.mul_(-g[s: s + chunk]).scatter_add_(-1, idx[s: s + chunk], g[s: s + chunk])
            grad[s: s + chunk] = p
        return grad.view_as(logits), None, None, None, None, None


def _entropy_grad(ctx, grad_entropy, T, lse):  # noqa: ANN001, ANN202
    """The entropy's incoming gradient over T ([N, 1]), or None when the entropy is a metric only."""
    if not ctx.entropy_grad or grad_entropy is None:
        return None
    return (grad_entropy.reshape(-1, 1) / T).to(lse.dtype)


def _entropy_dz(log_p, g, ge, entropy):  # noqa: ANN001, ANN202
    """A chunk's gradient in z (before the chosen ids' +g) when the entropy takes a gradient too: -p g for
    the log-probs, and dH/dz = -p (log p + H) / T times the entropy's incoming gradient (`ge`, over T)."""
    p = log_p.exp()
    return -p * (g + ge * (log_p + entropy[:, None]))


class _ProjectedLogSoftmax(torch.autograd.Function):
    """log softmax(hidden @ weight.T / T) at the chosen ids (and, no grad, the entropy), projecting onto
    a chunk of the vocabulary at a time and projecting again in the backward: neither the [N, V]
    logits nor their gradient is ever held, only the hidden states and one fp32 scalar per position.

    Chunks of the vocabulary, not of positions: every product has all N positions as rows, and each
    chunk of the head's gradient is written once (chunks of positions would each add a whole [V, H]
    product into it). The forward keeps a running maximum, sum of exp and (for the entropy) sum of
    exp * z per position; the backward needs only their logsumexp: softmax = exp(z / T - lse). The
    products run in `dtype` (autocast's, or the weight's), as the model's own head would; the softmax
    in fp32. dz = (onehot(id) - softmax) * g / T; d hidden = dz @ weight, d weight = dz.T @ hidden."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, chunk, with_entropy, dtype,  # noqa: ANN001, ANN205
                entropy_grad=False):
        N, V, cdtype = hidden.shape[0], weight.shape[0], _compute_dtype(dtype)
        top = torch.full((N,), float("-inf"), dtype=cdtype, device=hidden.device)
        total, weighted, target = (torch.zeros_like(top) for _ in range(3))
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            for v in range(0, V, chunk):
                z = (h @ weight[v: v + chunk].to(dtype).T).to(cdtype) / temperature  # [N, chunk]
                new_top = torch.maximum(top, z.amax(-1))
                rescale = (top - new_top).exp()  # the sums so far, relative to the new maximum
                e = (z - new_top[:, None]).exp_()
                total = total * rescale + e.sum(-1)
                if with_entropy:
                    weighted = weighted * rescale + torch.linalg.vecdot(e, z)  # sum e * z, no [N, chunk] product
                top = new_top
                inside = (ids >= v) & (ids < v + z.shape[1])
                target = torch.where(inside, z.gather(-1, (ids - v).clamp(0, z.shape[1] - 1)[:, None]).squeeze(-1),
                                     target)
        lse = top + total.log()
        logp = target - lse
        entropy = lse - weighted / total if with_entropy else logp.new_empty(0)  # -sum p (z - lse)
        ctx.save_for_backward(hidden, weight, ids, lse, entropy if entropy_grad else entropy.new_empty(0))
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        ctx.entropy_grad = entropy_grad and with_entropy
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):  # noqa: ANN001, ANN205
        hidden, weight, ids, lse, entropy = ctx.saved_tensors
        T, chunk, dtype = ctx.temperature, ctx.chunk, ctx.dtype
        g = (grad_logp / T).to(lse.dtype)[:, None]
        ge = _entropy_grad(ctx, grad_entropy, T, lse)
        grad_hidden = (torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device) if ctx.needs_input_grad[0]
                       else None)
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            for v in range(0, weight.shape[0], chunk):
                w = weight[v: v + chunk].to(dtype)
                if ge is not None:  # the entropy's gradient too (--entropy_coef)
                    dz = _entropy_dz((h @ w.T).to(lse.dtype).div_(T).sub_(lse[:, None]), g, ge, entropy)
                else:
                    p = (h @ w.T).to(lse.dtype).div_(T).sub_(lse[:, None]).exp_()  # softmax(z / T) [N, chunk]
                    dz = p.mul_(-g)
                # + g at each position's chosen id when it falls in this chunk (+0 elsewhere): a scatter over
                # every position, so nothing is read back to the host (a nonzero would sync per chunk)
                inside = (ids >= v) & (ids < v + w.shape[0])
                dz.scatter_add_(1, (ids - v).clamp(0, w.shape[0] - 1)[:, None], g * inside[:, None])
                dz = dz.to(dtype)
                if grad_hidden is not None:
                    grad_hidden += dz @ w
                if grad_weight is not None:
                    grad_weight[v: v + chunk] = dz.T @ h
        grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def projected_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                       with_entropy: bool = False, chunk_columns: int | None = None, entropy_grad: bool = False,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(hidden @ weight.T / temperature) at `ids`, its entropy or an empty tensor):
    [B, T, H], [V, H], [B, T] -> [B, T] in fp32, differentiable in hidden and weight. What
    `token_logprobs_and_entropy` gives on the head's logits, without ever holding them: the projection
    is made `chunk_columns` vocabulary entries at a time (default: the chunk budget of `token_logprobs`,
    at least 1,024 entries) and made again in the backward. Under autocast the products run in
    autocast's dtype. `entropy_grad`: the entropy is differentiable too (an entropy bonus in the loss);
    otherwise it is a metric, and the backward is the log-probs' alone."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    H, N = hidden.shape[-1], ids.numel()
    # a chunk small enough that on the CPU it stays in cache through its elementwise passes
    chunk = chunk_columns or max(1024, _chunk_elements(hidden) // max(N, 1))
    logp, entropy = _ProjectedLogSoftmax.apply(hidden.reshape(-1, H), weight, ids.reshape(-1), temperature, chunk,
                                               with_entropy, dtype, entropy_grad)
    return logp.view(ids.shape), entropy.view(ids.shape) if with_entropy else entropy


def _chunk_elements(x: torch.Tensor) -> int:
    """How many logits one chunk may hold on `x`'s device."""
    return CPU_CHUNK_ELEMENTS if x.device.type == "cpu" else GPU_CHUNK_ELEMENTS


def _chunk(logits: torch.Tensor, chunk_positions: int | None) -> int:
    return chunk_positions or max(1, _chunk_elements(logits) // logits.shape[-1])


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                   chunk_positions: int | None = None) -> torch.Tensor:
    """log softmax(logits / temperature) at `ids`: [B, T, V], [B, T] -> [B, T] in fp32 (differentiable).

    Worked through `chunk_positions` positions at a time (default: ~8 MB of fp32 logits on the CPU,
    128 MB on GPUs), so the fp32 [B, T, V] log-softmax (B*T*151,936*4 bytes for Qwen3) is never held."""
    return _SelectedLogSoftmax.apply(logits, ids, temperature, _chunk(logits, chunk_positions), False)[0]


def token_logprobs_and_entropy(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                               chunk_positions: int | None = None,
                               entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` and, in the same pass over the vocabulary, the entropy of softmax(logits /
    temperature) per position ([B, T]; a metric, not differentiable, unless `entropy_grad`)."""
    return _SelectedLogSoftmax.apply(logits, ids, temperature, _chunk(logits, chunk_positions), True, entropy_grad)


class HeadOptional(torch.nn.Module):
    """The model as DDP wraps it for the projected loss: its forward gives the decoder's hidden states
    (`hidden`) or the model's logits (`head_input`). Under DDP every forward must go through the
    wrapper (it prepares the gradients' all-reduce there); wrapped as DDP(HeadOptional(model)), the
    hidden states do, and the loss still projects them itself (no [B, C, V] logits: ~1.3 GB less for
    Qwen3-0.6B at the recipe's micro-batch). The head's gradient reaches DDP's hooks like any other."""

    def __init__(self, model):
        super().__init__()
        self.module = model  # the name DDP uses too: code that looks for .config walks .module

    def forward(self, hidden: bool, keep: torch.Tensor | int | None = None, **inputs) -> torch.Tensor:
        return head_input(self.module, hidden, keep, **inputs)


def _through_ddp(model) -> bool:
    """DDP(HeadOptional(model)): the forward that can give hidden states, through DDP's wrapper."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel) and isinstance(model.module, HeadOptional)


def head_weight(model) -> torch.Tensor | None:
    """The vocabulary head's weight when the loss can project onto the vocabulary itself
    (`projected_logprobs`, no [B, C, V] logits held): a plain bias-free Linear, on a model called
    directly or as DDP(HeadOptional(model)). A model under a bare DDP wrapper (its forward gives
    logits only) and a LoRA or quantized head (its own forward): None, the loss takes the logits."""
    if _through_ddp(model):
        return head_weight(model.module.module)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    head = model.get_output_embeddings()
    return head.weight if type(head) is torch.nn.Linear and head.bias is None else None


def head_input(model, hidden: bool, keep: torch.Tensor | int | None = None, **inputs) -> torch.Tensor:
    """The model's logits at columns `keep` (all when None; an int: the last `keep`) or, with `hidden`,
    its decoder's last hidden states there (what the head would project)."""
    if _through_ddp(model):
        return model(hidden, keep, **inputs)
    if hidden:
        out = model.get_decoder()(**inputs).last_hidden_state
        return out if keep is None else out[:, -keep:] if isinstance(keep, int) else out[:, keep]
    return model(**inputs, **({} if keep is None else {"logits_to_keep": keep})).logits


def logprobs_of(out: torch.Tensor, weight: torch.Tensor | None, ids: torch.Tensor, temperature: float,
                with_entropy: bool, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of `ids`, entropy or empty) from `head_input`'s output: hidden states projected here
    when `weight` (the head's) is given, else logits. `entropy_grad`: the entropy is differentiable."""
    if weight is not None:
        return projected_logprobs(out, weight, ids, temperature, with_entropy, entropy_grad=entropy_grad)
    if with_entropy:
        return token_logprobs_and_entropy(out, ids, temperature, entropy_grad=entropy_grad)
    return token_logprobs(out, ids, temperature), out.new_empty(0)


def logprobs_at(model, ids: torch.Tensor, columns: torch.Tensor, temperature: float = 1.0,
                with_entropy: bool = False, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, K] of `ids` as predicted at `columns` of a forward on `inputs`, their entropy or
    an empty tensor): through the decoder and `projected_logprobs` where `head_weight` allows, else
    through the model's logits at those columns and the chunked log-softmax."""
    weight = head_weight(model)
    return logprobs_of(head_input(model, weight is not None, columns, **inputs), weight, ids, temperature, with_entropy)
