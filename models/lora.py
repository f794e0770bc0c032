"""LoRA adapters (peft) on every linear layer of a Qwen3 block, and merging them for saving."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from models.loading import load_model

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(model: Any, r: int = 16, alpha: int = 32, dropout: float = 0.05,
             gradient_checkpointing: bool = False) -> Any:
    """Wrap `model` with fresh LoRA adapters; a 4-bit model is first prepared for k-bit training."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        # peft casts every frozen non-quantized weight (embedding, tied head, norms) to fp32; on CUDA the
        # bf16 forward would then recast the 0.6 GB fp32 embedding/head at every decoded token, so they go
        # back to the dtype they were loaded in, as the plain LoRA path keeps its bf16 base. Checkpointing
        # non-reentrant, as on the other paths.
        loaded = {name: p.dtype for name, p in model.named_parameters()}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        for name, p in model.named_parameters():
            if not p.requires_grad and p.dtype != loaded[name] and p.dtype.is_floating_point:
                p.data = p.data.to(loaded[name])
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM", bias="none")
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing (a FutureWarning)
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def merged_copy_for_saving(peft_model: Any, base_name: str, adapter_dir: str, dtype: Any) -> Any:
    """A plain model with the adapter merged in, in `dtype`, leaving `peft_model` untouched.

    For a 4-bit base the unquantized base is reloaded and the saved adapter merged into it, so the
    saved model is full precision rather than a dequantize-requantize round trip.
    """
    from peft import PeftModel

    if getattr(peft_model, "is_loaded_in_4bit", False) or getattr(peft_model.base_model.model,
                                                                   "is_loaded_in_4bit", False):
        base = load_model(base_name, device="cpu", dtype=dtype)
        return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return copy.deepcopy(peft_model).merge_and_unload().to(dtype)
