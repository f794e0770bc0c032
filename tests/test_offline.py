"""Offline by construction (models/offline.py): no hub kernels, no connection once a model is on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_sft_grpo_eval_from_a_folder_open_no_connection_with_cuda_kernel_lookup(tmp_path):
    """transformers 5.25 + kernels fetch RMSNorm/RoPE kernels for a CUDA model at load and at train();
    the worker fakes that device and blocks every socket: all three stages must run without one."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    result = subprocess.run([sys.executable, "tests/offline_worker.py", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    connections = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("CONNECTIONS ")]
    assert result.returncode == 0 and "DONE" in lines, result.stderr[-3000:]
    assert connections == [[]], connections
    assert (tmp_path / "eval" / "eval_summary.json").is_file()


def _transformers_or_torch(module) -> bool:
    return type(module).__module__.startswith(("transformers.", "torch.nn."))


@pytest.mark.parametrize("source", ["tiny", "folder"])
def test_loaded_model_keeps_the_modules_transformers_defines(source, tmp_path, monkeypatch):
    """Every path that loads (here `tiny` and a saved folder): use_kernels off, every module the class
    transformers or torch defines, no forward replaced on an instance, through train() and eval()."""
    import torch
    import transformers.integrations.hub_kernels as hub_kernels

    from models import load_model, load_tokenizer
    from models.tiny import tiny_dir

    monkeypatch.setattr(hub_kernels, "get_device_type", lambda device: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 6))
    name = "tiny"
    if source == "folder":
        import shutil

        shutil.copytree(tiny_dir(), tmp_path / "m")
        name = str(tmp_path / "m")
    model = load_model(name, device="cpu", tokenizer=load_tokenizer(name))
    for mode in (True, False):
        model.train(mode)
        assert model.use_kernels is False
        foreign = [n for n, m in model.named_modules() if not _transformers_or_torch(m) or "forward" in vars(m)]
        assert foreign == []


def test_hub_kernels_off_refuses_kernel_fetches_and_sets_the_switch(monkeypatch):
    """bitsandbytes' import-time fetch (kernels.get_kernel) is refused; transformers' switch is off."""
    import kernels

    from models.offline import HubKernelsOff, hub_kernels_off

    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    monkeypatch.setattr(kernels, "get_kernel", lambda *a, **k: pytest.fail("fetched"))
    hub_kernels_off()
    assert os.environ["USE_HUB_KERNELS"] == "NO"
    with pytest.raises(HubKernelsOff):
        kernels.get_kernel("kernels-community/quantization-bitsandbytes", version=1)


def test_cached_first_asks_the_hub_only_when_the_cache_lacks_the_model(tmp_path):
    from models.offline import cached_first

    calls = []

    def load(source, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only") and source == "org/absent":
            raise OSError("not cached")
        return source

    assert cached_first(load, "org/cached") == "org/cached" and calls == [{"local_files_only": True}]
    calls.clear()
    assert cached_first(load, "org/absent") == "org/absent" and calls == [{"local_files_only": True}, {}]
    calls.clear()
    assert cached_first(load, str(tmp_path)) == str(tmp_path) and calls == [{}]
