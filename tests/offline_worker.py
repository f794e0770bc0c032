"""SFT -> GRPO -> eval on a model loaded from a folder, with every socket blocked and transformers'
kernel look-up told the model sits on a CUDA GPU (an A10G, capability 8.6): what a real GPU run meets
with `kernels` installed. Run by tests/test_offline.py in a fresh process without HF_HUB_OFFLINE, so
that any attempt to reach the hub is a connection (refused and recorded), not an offline-mode error.

    python tests/offline_worker.py OUT

Prints `CONNECTIONS <json list>` (every connection attempted) and `DONE` when all three stages ran.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

os.environ.pop("HF_HUB_OFFLINE", None)
attempts: list[str] = []


def _blocked(*args, **kwargs):
    attempts.append(repr(args[1:] if args and isinstance(args[0], socket.socket) else args)[:200])
    raise OSError("network blocked by tests/offline_worker.py")


socket.socket.connect = _blocked
socket.socket.connect_ex = _blocked
socket.create_connection = _blocked
socket.getaddrinfo = _blocked

import torch  # noqa: E402
import transformers.integrations.hub_kernels as hub_kernels  # noqa: E402

# the device kernels are chosen for: CUDA, as on the GPU (on the CPU there is no CUDA kernel to fetch)
hub_kernels.get_device_type = lambda device: "cuda"
torch.cuda.get_device_capability = lambda *args, **kwargs: (8, 6)


def main(out: Path) -> None:
    import train_grpo
    import train_sft
    from eval.__main__ import main as eval_main
    from models.tiny import tiny_dir

    base = out / "base"  # a model folder, as a downloaded hub model is one
    import shutil

    shutil.copytree(tiny_dir(), base)
    try:
        train_sft.main(["--model_name", str(base), "--dataset", "synthetic", "--sft_output", str(out / "sft"),
                        "--max_steps", "2", "--max_samples", "16", "--batch_size", "8", "--eval_samples", "4",
                        "--eval_max_new_tokens", "8", "--device", "cpu", "--no_progress"])
        train_grpo.main(["--sft_output", str(out / "sft"), "--dataset", "synthetic", "--grpo_output",
                         str(out / "grpo"), "--max_steps", "2", "--prompts_per_step", "2", "--num_generations", "2",
                         "--max_completion_length", "8", "--eval_every", "2", "--eval_samples", "4",
                         "--device", "cpu", "--no_progress"])
        eval_main(["--model", str(out / "grpo"), "--dataset", "synthetic", "--max_samples", "4",
                   "--max_new_tokens", "8", "--output", str(out / "eval"), "--device", "cpu", "--no_progress"])
    finally:
        print("CONNECTIONS " + json.dumps(attempts), flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
