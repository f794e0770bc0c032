"""Publishing a trained model to the Hugging Face hub, with its model card.

    python -m models.push runs/tiny/grpo your-name/qwen3-gsm8k-grpo
    train_grpo.py ... --push_to_hub your-name/qwen3-gsm8k-grpo   (checked before training, pushed at the end)

The folder's model, tokenizer, adapter, prompt format, run_config.json, logs and final evals go up; the
checkpoint (optimizer state), snapshots and tracker files stay. A token comes from HF_TOKEN or
`huggingface-cli login`; without one, or with a repo name that is not NAMESPACE/NAME, the push is
refused in one line before anything runs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from common.errors import fail, run_cli

KEEP_HOME = ["checkpoint/**", "snapshots/**", "tracker/**", "eval/step_*/**", ".*", "**/.*"]  # not uploaded


def check_push(repo: str | None) -> None:
    """One line now, not at the end of a long run: a bad repo name or no token."""
    if repo is None:
        return
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo):
        fail(f"--push_to_hub {repo!r}: give the repository as NAMESPACE/NAME, e.g. your-name/qwen3-gsm8k-grpo")
    from huggingface_hub import get_token

    if not get_token():
        fail(f"--push_to_hub {repo}: no Hugging Face token; set HF_TOKEN or run `huggingface-cli login` first "
             f"(or leave --push_to_hub out)")


def push(folder: Path, repo: str, private: bool = False) -> str:
    """Upload `folder` (its model card made if missing) to `repo`, created when new; the repo's URL."""
    from huggingface_hub import HfApi

    from models.card import CARD, write_model_card

    if not (folder / "config.json").is_file():
        fail(f"{folder} holds no saved model (no config.json); train it first")
    if not (folder / CARD).is_file():
        write_model_card(folder)
    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), ignore_patterns=KEEP_HOME,
                      commit_message=f"Upload {folder.resolve().name} (qwen-gsm8k-grpo)")
    return str(url)


def main(argv: list[str] | None = None) -> None:
    from common.flags import OneLineParser

    p = OneLineParser(prog="python -m models.push", description=__doc__)
    p.add_argument("folder", help="a saved model folder (an SFT or GRPO output)")
    p.add_argument("repo", help="NAMESPACE/NAME on the hub")
    p.add_argument("--private", action="store_true", help="create the repository private")
    args = p.parse_args(argv)
    check_push(args.repo)
    print(f"pushed {args.folder} to {push(Path(args.folder), args.repo, args.private)}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
