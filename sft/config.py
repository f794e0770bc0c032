"""SFT's settings: each one a CLI flag of train_sft.py, declared once here (default, help, range)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.flags import DEVICE, FINETUNE, FINETUNE_HELP, Rule, exclusive, flag
from common.schedule import LR_DECAYS
from data.flags import TrainDataFlags
from training.flags import WatchFlags


@dataclass
class SFTConfig(WatchFlags, TrainDataFlags):
    model_name: str = flag("Qwen/Qwen3-0.6B", "hub id, local folder, or `tiny` (built-in, offline)")
    sft_output: str = flag("./qwen_gsm8k_sft", "output folder: merged model + tokenizer, adapter/, logs")
    max_samples: int | None = flag(None, "use only the first N training examples", low=1)
    num_epochs: int = flag(3, "passes over the training set", low=1)
    max_steps: int | None = flag(None, "stop after N optimizer steps (overrides epochs when fewer)", low=1,
                                 on_resume="may")
    batch_size: int = flag(4, "examples per micro-batch", low=1)
    grad_accum: int = flag(1, "micro-batches per optimizer step", low=1)
    learning_rate: float = flag(2e-4, "peak AdamW learning rate", low=0)
    lr_decay: str = flag("cosine", "decay after warmup", choices=LR_DECAYS)
    warmup_ratio: float = flag(0.03, "share of steps with linear LR warmup", low=0, high=1)
    weight_decay: float = flag(0.0, "AdamW weight decay", low=0)
    max_grad_norm: float = flag(1.0, "clip the gradient norm to this", above=0)
    finetune: str = flag("lora", FINETUNE_HELP, choices=FINETUNE)
    lora_r: int = flag(16, "LoRA rank", low=1)
    lora_alpha: int = flag(32, "LoRA scaling alpha", low=1)
    lora_dropout: float = flag(0.05, "dropout on the LoRA input", low=0, high=0.99)
    max_length: int = flag(512, "longest prompt+target in tokens; longer examples are skipped and counted", low=2)
    keep_calculator: bool = flag(False, "keep GSM8K's <<a*b=c>> annotations in the target")
    use_4bit: bool = flag(False, "QLoRA: load the base model in 4-bit NF4 (bitsandbytes)")
    gradient_checkpointing: bool = flag(False, "recompute activations to save memory", on_resume="may")
    seed: int = flag(42, "seed for data order, dropout and sampling", low=0)
    eval_every: int = flag(0, "held-out eval every N steps and before training (0: end only)", low=0, on_resume="may")
    eval_samples: int = flag(100, "held-out problems (test split) for the eval", low=1)
    eval_max_new_tokens: int = flag(256, "token limit of eval completions", low=1)
    eval_batch_size: int = flag(32, "prompts per eval batch", low=1, on_resume="may")
    save_every: int = flag(100, "checkpoint every N optimizer steps (and at the end)", low=1, on_resume="may")
    resume: bool = flag(False, "continue the run in --sft_output from its checkpoint with its own settings (its "
                               "run_config.json); flags that would change the run are refused (docs/training.md)",
                        on_resume="ignored")
    overwrite: bool = flag(False, "replace whatever --sft_output holds", on_resume="ignored")
    device: str | None = flag(None, "cpu, cuda, cuda:1 ... (default: cuda when available)", text=DEVICE,
                              on_resume="may")
    show_progress: bool = flag(True, "a progress bar on a terminal, a line every tenth of the run elsewhere (the log "
                                     "is written either way)", name="--no_progress", on_resume="may")

    RENAMED_FLAGS: ClassVar[dict] = {"--full_finetune": ("finetune", "full")}
    RUN_FOLDER: ClassVar[str] = "sft_output"  # the run's folder: --resume continues its run_config.json
    RULES: ClassVar[tuple[Rule, ...]] = (  # settings that contradict each other, checked with the ranges
        exclusive("resume", "overwrite", "--resume continues the run in --sft_output, --overwrite replaces it; "
                                         "give one"),
        Rule(("use_4bit", "finetune"), lambda c: c.use_4bit and not c.lora and (
            "--use_4bit trains LoRA adapters on a frozen 4-bit base; use --finetune lora or drop --use_4bit")),
    )

    @property
    def lora(self) -> bool:
        return self.finetune == "lora"
