"""TRL's GRPOTrainer at the settings `benchmarks.step` times ours at, for the side-by-side figure.

    python dev/trl_step.py --model random:qwen3-4x256 --max_new_tokens 128

TRL is not a dependency of this project: run this with a Python that has `trl` installed (e.g. a
separate venv with `pip install trl` and this repository on PYTHONPATH). Same model (any name
`benchmarks.step` takes; built-in ones are saved to a temporary folder, as TRL loads its reference
model from a folder), same prompts (synthetic), same reward, 16 completions per step (4 prompts x
G=4, micro-batches of 4 with 4 accumulation steps), T 0.7, beta 0.01, fp32 on the CPU. Prints the
median step time over --steps after --warmup steps, and one JSON line.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.common import StepsArgs
from common.errors import fail, run_cli


@dataclass
class TRLStepArgs(StepsArgs):
    """benchmarks.step's step settings: TRL takes no other."""


def main(argv: list[str] | None = None) -> None:
    from common.flags import parse_flags

    args, _ = parse_flags(TRLStepArgs, argv, __doc__, prog="python dev/trl_step.py")

    try:
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        fail("dev/trl_step.py needs TRL, which this project does not install: pip install trl "
             "(in a separate venv, with this repository on PYTHONPATH)")
    import os
    import statistics
    import tempfile
    import time
    from pathlib import Path

    from datasets import Dataset
    from transformers import TrainerCallback

    from benchmarks.common import print_json
    from data.prompt import build_messages
    from data.synthetic import make_synthetic
    from models.loading import default_device, load_model, load_tokenizer
    from rewards import numeric_reward

    device = args.device or default_device()
    records = make_synthetic("train", 200, seed=0)
    dataset = Dataset.from_list([{"prompt": build_messages(r["question"]), "answer": r["answer"]} for r in records])

    def reward(completions: list, answer: list, **_: object) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return numeric_reward(texts, answer)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *_: object, **__: object) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: object, **__: object) -> None:
            self.times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not Path(args.model).expanduser().is_dir():
            tokenizer = load_tokenizer(args.model)
            load_model(args.model, device="cpu", tokenizer=tokenizer).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            model_dir = tmp
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir, device=device, tokenizer=tokenizer)
        cfg = GRPOConfig(output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=4,
                         gradient_accumulation_steps=4, num_generations=4,
                         max_completion_length=args.max_new_tokens, temperature=0.7, beta=0.01,
                         learning_rate=1e-6, max_steps=args.warmup + args.steps, logging_steps=1, report_to=[],
                         use_cpu=device == "cpu", bf16=device != "cpu", save_strategy="no", disable_tqdm=True)
        timer = StepTimer()
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    timed = timer.times[args.warmup:]
    lengths = [x["completions/mean_length"] for x in trainer.state.log_history if "completions/mean_length" in x]
    record = {"benchmark": "trl_step", "trl": trl.__version__, "model": args.model, "device": device,
              "completions_per_step": 16, "max_new_tokens": args.max_new_tokens, "steps": len(timed),
              "completion_len_mean": round(statistics.mean(lengths[args.warmup:]), 1),
              "step_times_s": [round(t, 3) for t in timer.times],
              "median_time_per_step_s": round(statistics.median(timed), 4)}
    print(f"TRL {trl.__version__} GRPOTrainer, {args.model} on {device}: 16 completions/step, up to "
          f"{args.max_new_tokens} new tokens (mean {record['completion_len_mean']})")
    print(f"  total {record['median_time_per_step_s']:8.3f} s  (median of {len(timed)} after {args.warmup} warm-up)")
    print_json(record)


if __name__ == "__main__":
    run_cli(main)
