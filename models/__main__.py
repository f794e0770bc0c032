"""`python -m models [--model NAME] [--save_to DIR]`: load a model, show its size and one prompt,
sample one answer; with --save_to, first save it (and its tokenizer) as a model folder.

A quick offline check that data, prompt format, model loading and reward fit together. `--model
random:Qwen/Qwen3-0.6B --save_to DIR` writes a real shape with random weights as a folder that every
stage then loads through `from_pretrained`, as it loads a downloaded hub model (the rehearsal, the GPU
checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import run_cli
from common.flags import flag, parse_flags
from data import DATASETS


@dataclass
class ModelCheckArgs:
    model: str = flag("tiny", "hub id, local folder, `tiny` or `random:<hub id>`")
    dataset: str = flag("synthetic", "where the one problem comes from", choices=DATASETS)
    data_dir: str | None = flag(None, "folder with GSM8K's {train,test}.jsonl")
    max_new_tokens: int = flag(64, "token limit of the sampled answer", low=1)
    save_to: str | None = flag(None, "save the loaded model (bf16) and tokenizer to this new folder first")


def main(argv: list[str] | None = None) -> None:
    args, _ = parse_flags(ModelCheckArgs, argv, __doc__, prog="python -m models")

    import torch

    from data import load_records
    from data.prompt import encode_prompt
    from models import load_model_and_tokenizer
    from rewards import extract_answer, numeric_reward

    record = load_records(args.dataset, "test", data_dir=args.data_dir, max_samples=1)[0]
    if args.save_to:
        from common.errors import fail
        from common.run_files import atomic_dir

        if Path(args.save_to).exists():
            fail(f"--save_to {args.save_to} already exists; name a new folder (it is never overwritten)")
        model, tokenizer = load_model_and_tokenizer(args.model, device="cpu", dtype=torch.bfloat16)

        def write(tmp):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        atomic_dir(Path(args.save_to), write)
        print(f"saved {args.model} (bf16) and its tokenizer in {args.save_to}")
    model, tokenizer = load_model_and_tokenizer(args.save_to or args.model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.save_to or args.model} ({type(model).__name__}, {n_params / 1e6:.2f}M parameters, "
          f"{model.dtype}, "
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
