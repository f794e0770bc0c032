"""`python -m models [--model NAME]`: load a model, show its size and one prompt, sample one answer.

A quick offline check that data, prompt format, model loading and reward fit together.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import run_cli
from common.flags import flag, parse_flags
from data import DATASETS


@dataclass
class ModelCheckArgs:
    model: str = flag("tiny", "hub id, local folder, `tiny` or `random:<hub id>`")
    dataset: str = flag("synthetic", "where the one problem comes from", choices=DATASETS)
    data_dir: str | None = flag(None, "folder with GSM8K's {train,test}.jsonl")
    max_new_tokens: int = flag(64, "token limit of the sampled answer", low=1)


def main(argv: list[str] | None = None) -> None:
    args, _ = parse_flags(ModelCheckArgs, argv, __doc__, prog="python -m models")

    import torch

    from data import load_records
    from data.prompt import encode_prompt
    from models import load_model_and_tokenizer
    from rewards import extract_answer, numeric_reward

    record = load_records(args.dataset, "test", data_dir=args.data_dir, max_samples=1)[0]
    model, tokenizer = load_model_and_tokenizer(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({type(model).__name__}, {n_params / 1e6:.2f}M parameters, {model.dtype}, "
          f"{model.device}); vocab {len(tokenizer)}, eos {tokenizer.eos_token!r}, pad {tokenizer.pad_token!r}")
    prompt = encode_prompt(tokenizer, record["question"])
    torch.manual_seed(0)
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=args.max_new_tokens,
                         do_sample=True, temperature=0.7)
    completion = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    reward = numeric_reward([completion], [record["answer"]])[0]
    print(f"prompt ({len(prompt)} tokens):\n{tokenizer.decode(prompt)}")
    print(f"completion: {completion!r}")
    print(f"extracted: {extract_answer(completion)}  gold: {record['answer']}  reward: {reward}")


if __name__ == "__main__":
    run_cli(main)
