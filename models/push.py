"""Publishing a trained model to the Hugging Face hub, with its model card.

    python -m models.push runs/tiny/grpo your-name/qwen3-gsm8k-grpo
    train_grpo.py ... --push_to_hub your-name/qwen3-gsm8k-grpo   (checked before training, pushed at the end)

The folder's model, tokenizer, adapter, prompt format, run_config.json, logs and final evals go up; the
checkpoint (optimizer state), snapshots and tracker files stay. A token comes from HF_TOKEN or
`hf auth login`. Every precondition of the push is checked before anything runs, one line each: a
repo name that is not NAMESPACE/NAME, no token, the hub client in offline mode (HF_HUB_OFFLINE), the
hub out of reach or the token refused (one `whoami` call).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from common.errors import fail, run_cli
from common.flags import OneLineParser
from models.card import CARD, write_model_card

KEEP_HOME = ["checkpoint/**", "snapshots/**", "tracker/**", "eval/step_*/**", ".*", "**/.*"]  # not uploaded


def check_push(repo: str | None) -> None:
    """Every precondition of the push, one line now rather than a traceback at the end of a long run: the
    repo name, a token, the hub client not in offline mode, and the hub reached with the token accepted."""
    if repo is None:
        return
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo):
        fail(f"--push_to_hub {repo!r}: give the repository as NAMESPACE/NAME, e.g. your-name/qwen3-gsm8k-grpo")
    from huggingface_hub import HfApi, constants, get_token

    later = f"(or leave --push_to_hub out and publish later: python -m models.push OUTPUT_FOLDER {repo})"
    if not get_token():
        fail(f"--push_to_hub {repo}: no Hugging Face token; set HF_TOKEN or run `hf auth login` first {later}")
    # the hub client reads these once, at import: the environment now and its own reading both count
    set_now = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")]
    if set_now or constants.is_offline_mode():
        name = set_now[0] if set_now else "HF_HUB_OFFLINE"
        fail(f"--push_to_hub {repo}: the hub client is in offline mode ({name} is set); unset {name} to "
             f"publish {later}")
    try:
        HfApi().whoami()
    except Exception as exc:  # noqa: BLE001 - no network, a refused token, a hub error: the same remedy
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            fail(f"--push_to_hub {repo}: the hub refused the Hugging Face token (401); run `hf auth login` again "
                 f"or set HF_TOKEN to a token with write access {later}")
        fail(f"--push_to_hub {repo}: cannot reach the Hugging Face hub ({type(exc).__name__}: "
             f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); check the network {later}")


def push(folder: Path, repo: str, private: bool = False) -> str:
    """Upload `folder` (its model card made if missing) to `repo`, created when new; the repo's URL."""
    from huggingface_hub import HfApi

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
    p = OneLineParser(prog="python -m models.push", description=__doc__)
    p.add_argument("folder", help="a saved model folder (an SFT or GRPO output)")
    p.add_argument("repo", help="NAMESPACE/NAME on the hub")
    p.add_argument("--private", action="store_true", help="create the repository private")
    args = p.parse_args(argv)
    check_push(args.repo)
    print(f"pushed {args.folder} to {push(Path(args.folder), args.repo, args.private)}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
