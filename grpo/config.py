"""GRPO's settings: each one a CLI flag of train_grpo.py, declared once here (default, help, range)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.flags import CUDA_GRAPHS, DEVICE, FINETUNE, FINETUNE_HELP, Rule, exclusive, flag
from common.schedule import LR_DECAYS
from data.flags import DATA as DATA_GROUP
from data.flags import TrainDataFlags
from data.prompt import MAX_PROMPT_LENGTH
from grpo.loss import IS_LEVELS, LOSS_TYPES, ROLLOUT_CORRECTIONS, SCALES
from rewards.functions import BUILTIN_HELP, OVERLONG_CACHE, REWARD_FORMATS
from sampling.cuda_graphs import graphs_without_cuda
from sampling.params import SamplingParams
from training.flags import WatchFlags

DATA, LENGTH, ROLLOUT, LOSS, MEMORY, RUN = ("model and output", "length of the run", "rollout", "loss and optimizer",
                                            "memory", "run")


@dataclass
class GRPOConfig(WatchFlags, TrainDataFlags):
    sft_output: str = flag("./qwen_gsm8k_sft", "SFT model folder to start from", group=DATA)
    model_name: str | None = flag(None, "start from this instead: hub id, folder, or `tiny`", group=DATA)
    grpo_output: str = flag("./qwen_gsm8k_grpo", "output folder: model, checkpoint, logs", group=DATA)
    max_samples: int | None = flag(None, "use only the first N training prompts", low=1, group=DATA_GROUP)
    max_steps: int | None = flag(None, "optimizer steps (rollouts); overrides --num_epochs", low=1, group=LENGTH,
                                 on_resume="may")
    num_epochs: float = flag(1.0, "passes over the prompts when --max_steps is unset", above=0, group=LENGTH)
    prompts_per_step: int = flag(4, "prompts per step, over all processes", low=1, group=ROLLOUT)
    num_generations: int = flag(4, "G: samples per prompt (a group; advantages compare them)", low=2,
                                group=ROLLOUT)
    max_prompt_length: int = flag(MAX_PROMPT_LENGTH, "longer prompts are skipped and counted (prompts_skipped "
                                                     "in the log, the eval summary)", low=1, group=ROLLOUT)
    max_completion_length: int = flag(512, "token limit per completion; untuned Qwen3-0.6B needs ~250 on GSM8K, "
                                           "so keep 512", low=1, group=ROLLOUT)
    temperature: float = flag(0.7, "sampling temperature (also used in the logprobs)", above=0, group=ROLLOUT)
    top_p: float = flag(1.0, "nucleus sampling threshold", above=0, high=1, group=ROLLOUT)
    top_k: int = flag(0, "sample only from the K most likely tokens (0: all). Any cut (top_p, top_k, min_p) makes "
                         "rollouts off-policy: the loss counts the whole softmax, the sampler the cut one "
                         "(the sampler_* log fields show by how much; docs/training.md)", low=0, group=ROLLOUT)
    min_p: float = flag(0.0, "sample only tokens at least this share of the most likely one's probability",
                        low=0, high=1, group=ROLLOUT)
    dynamic_sampling: bool = flag(False, "DAPO's dynamic sampling: roll out further prompts until every group of the "
                                         "step has rewards that differ (a signal); see --max_extra_rollouts",
                                  group=ROLLOUT)
    max_extra_rollouts: int = flag(4, "with --dynamic_sampling, at most this many further rollouts of "
                                      "--prompts_per_step prompts a step; groups without a signal fill what is "
                                      "still missing (logged as extra_rollouts)", low=1, group=ROLLOUT)
    cuda_graphs: str = flag("auto", "replay the decode step from CUDA graphs: auto (on CUDA), on (CUDA only; "
                                    "alone, --cuda_graphs is on) or off; the graphed state is freed before each "
                                    "backward until a step shows it fits (docs/performance.md)",
                            choices=CUDA_GRAPHS, bare="on", group=ROLLOUT, on_resume="may")
    micro_batch_size: int = flag(4, "completions per forward/backward pass", low=1, group=LOSS)
    no_grad_micro_batch_size: int | None = flag(None, "completions per pass of the reference and old log-probs "
                                                      "(no gradient, so no activations kept: default 4x "
                                                      "--micro_batch_size on CUDA, the same on the CPU)", low=1,
                                                group=LOSS)
    learning_rate: float = flag(1e-6, "AdamW learning rate", low=0, group=LOSS)
    lr_decay: str = flag("constant", "after warmup", choices=LR_DECAYS, group=LOSS)
    warmup_ratio: float = flag(0.0, "share of updates with linear LR warmup", low=0, high=1, group=LOSS)
    weight_decay: float = flag(0.0, "AdamW weight decay", low=0, group=LOSS)
    adam_beta2: float = flag(0.999, "AdamW's second-moment decay", above=0, high=1, group=LOSS)
    max_grad_norm: float = flag(1.0, "clip the gradient norm to this", above=0, group=LOSS)
    beta: float = flag(0.01, "KL coefficient; 0 skips the reference model", low=0, group=LOSS)
    epsilon: float = flag(0.2, "clip range: ratio in [1 - eps, 1 + eps_high]", above=0, high=1, group=LOSS)
    epsilon_high: float | None = flag(None, "upper clip (default: --epsilon)", above=0, group=LOSS)
    loss_type: str = flag("dapo", "token aggregation (docs/training.md)", choices=LOSS_TYPES, group=LOSS)
    scale_rewards: str = flag("group", "divide advantages by the group's std, the batch's, or not",
                              choices=SCALES, group=LOSS)
    top_entropy_quantile: float = flag(1.0, "train only on the highest-entropy share of each micro-batch's tokens "
                                            "(the \"80/20\" high-entropy-token rule; TRL's top_entropy_quantile): 0.2 "
                                            "keeps the top 20%%; 1.0 keeps all", above=0, high=1, group=LOSS)
    entropy_coef: float = flag(0.0, "entropy bonus: the loss subtracts this times the tokens' entropy (aggregated "
                                    "as --loss_type says); 0: none", low=0, group=LOSS)
    num_iterations: int = flag(1, "mu: updates per rollout (old logprobs kept)", low=1, group=LOSS)
    importance_sampling_level: str = flag("token", "token: one ratio per token (GRPO); sequence: one per completion, "
                                                   "the mean of its tokens' log-ratios (GSPO)", choices=IS_LEVELS,
                                          group=LOSS)
    rollout_correction: str = flag("none", "correct the gap between the rollout engine's log-probs and the "
                                           "trainer's: weigh each token's policy term by the ratio trainer / "
                                           "sampler, per token or per completion, capped (truncate) or dropped "
                                           "above the cap (mask); none: measure only (docs/training.md)",
                                   choices=ROLLOUT_CORRECTIONS, group=LOSS)
    rollout_correction_cap: float = flag(2.0, "the cap C of --rollout_correction: truncate weighs by min(ratio, C), "
                                              "mask drops tokens (or completions) whose ratio exceeds C", low=1,
                                         group=LOSS)
    skip_zero_advantage: bool = flag(True, "skip the forward/backward of rows whose advantage is 0 (with --beta 0 "
                                           "they carry exactly no gradient)",
                                     name="--no_skip_zero_advantage", group=LOSS)
    reward: tuple[str, ...] = flag(("numeric",), f"a reward: {BUILTIN_HELP} or module:function (called as TRL "
                                   "calls rewards); give it several times to sum several", group=LOSS)
    reward_weights: tuple[float, ...] | None = flag(None, "one weight per --reward, in order (default: 1 each)",
                                                    group=LOSS)
    reward_format: str = flag("text", "how rewards get prompts and completions: text, or messages (chat "
                                      "messages, as TRL hands conversational data: completions[i][0]['content'])",
                              choices=REWARD_FORMATS, group=LOSS)
    overlong_cache: int = flag(OVERLONG_CACHE, "the `overlong` reward's soft interval: completions longer than "
                                               "--max_completion_length minus this lose up to 1 (DAPO)", low=0,
                               group=LOSS)
    log_completions: str = flag("0", "append every completion of this many groups a step (or all) to "
                                     "completions.jsonl and the trackers: question, answer, completion, rewards, "
                                     "advantage, whether it trained", text=(r"all|[0-9]+", "a number of groups or all"),
                                group=RUN, on_resume="may")
    print_completions: int = flag(0, "print this many completions a step to the console, each with its rewards and "
                                     "advantage (as TRL's num_completions_to_print; 0: none)", low=0, group=RUN,
                                  on_resume="may")
    mask_truncated_completions: bool = flag(False, "completions cut at --max_completion_length leave the loss and "
                                                   "its normalizers (they keep their rewards in the group's "
                                                   "statistics; logged as masked_rows)", group=LOSS)
    finetune: str = flag("full", FINETUNE_HELP + "; with lora the reference is the model with its adapter off",
                         choices=FINETUNE, group=MEMORY)
    lora_r: int = flag(16, "LoRA rank", low=1, group=MEMORY)
    lora_alpha: int = flag(32, "LoRA alpha", low=1, group=MEMORY)
    use_4bit: bool = flag(False, "4-bit NF4 base (with --finetune lora), e.g. Qwen3-4B on 24 GB", group=MEMORY)
    fit_check: bool = flag(True, "skip the check, made on CUDA before the model loads, that the memory ledger's "
                                 "peak fits the GPU's free memory (it names the settings that would fit)",
                           name="--no_fit_check", group=MEMORY, on_resume="may")
    gradient_checkpointing: bool = flag(False, "recompute activations in backward", group=MEMORY, on_resume="may")
    seed: int = flag(42, "seed for prompt order and sampling", low=0, group=RUN)
    save_every: int = flag(50, "checkpoint every N steps (and at the end)", low=1, group=RUN, on_resume="may")
    eval_every: int = flag(0, "held-out greedy accuracy every N steps and before the first (0: never)", low=0,
                           group=RUN, on_resume="may")
    eval_samples: int = flag(100, "held-out problems (test split) per eval", low=1, group=RUN)
    eval_max_new_tokens: int | None = flag(None, "eval token limit (default: --max_completion_length)", low=1,
                                           group=RUN)
    eval_batch_size: int = flag(32, "prompts per eval batch", low=1, group=RUN, on_resume="may")
    resume: bool = flag(False, "continue the run in --grpo_output from its checkpoint with its own settings (its "
                               "run_config.json); flags that would change the run are refused (docs/training.md)",
                        group=RUN, on_resume="ignored")
    overwrite: bool = flag(False, "replace whatever --grpo_output holds", group=RUN, on_resume="ignored")
    device: str | None = flag(None, "cpu, cuda, cuda:1 ... (default: cuda when available)", group=RUN, text=DEVICE,
                              on_resume="may")
    show_progress: bool = flag(True, "a progress bar on a terminal, a line every tenth of the run elsewhere (the log "
                                     "is written either way)", name="--no_progress", group=RUN, on_resume="may")

    RENAMED_FLAGS: ClassVar[dict] = {"--lora": ("finetune", "lora")}
    RUN_FOLDER: ClassVar[str] = "grpo_output"  # the run's folder: --resume continues its run_config.json
    RULES: ClassVar[tuple[Rule, ...]] = (  # settings that contradict each other, checked with the ranges
        exclusive("resume", "overwrite", "--resume continues the run in --grpo_output, --overwrite replaces it; "
                                         "give one"),
        Rule(("reward", "overlong_cache", "max_completion_length"), lambda c: (
            "overlong" in c.reward and c.overlong_cache >= c.max_completion_length
            and f"--reward overlong with --overlong_cache {c.overlong_cache} >= --max_completion_length "
                f"{c.max_completion_length} punishes every completion (its interval starts at the limit minus "
                f"the cache); give --overlong_cache below --max_completion_length")),
        Rule(("use_4bit", "finetune"), lambda c: c.use_4bit and not c.lora and (
            "--use_4bit trains LoRA adapters on a frozen 4-bit base; add --finetune lora")),
        Rule(("cuda_graphs", "device"), graphs_without_cuda),
        Rule(("eval_dataset", "eval_every"), lambda c: c.eval_dataset and c.eval_every == 0 and (
            "--eval_dataset is scored at each --eval_every, and GRPO evaluates only then: give --eval_every N "
            "too")),
    )

    @property
    def lora(self) -> bool:
        return self.finetune == "lora"

    def sampling_params(self) -> SamplingParams:
        """What each rollout asks of the sampler: --num_generations completions per prompt of at most
        --max_completion_length tokens, at --temperature cut by --top_k, --top_p, --min_p."""
        return SamplingParams(num_samples=self.num_generations, max_new_tokens=self.max_completion_length,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p)
