"""The set-up and GPU-check scripts, driven as a user on a GPU machine would meet them."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def _fake_gpu_path(tmp_path) -> str:
    """A PATH whose nvidia-smi reports one GPU, as on a CUDA machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA A10G (UUID: GPU-fake)"\n')
    smi.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.mark.skipif(torch.version.cuda is not None, reason="this venv has a CUDA torch; the check is for a CPU one")
def test_setup_on_a_gpu_machine_refuses_a_venv_holding_a_cpu_torch(tmp_path):
    """A .venv made on a CPU machine, then used where nvidia-smi sees a GPU: one line naming the
    CPU-only build and the fix, before anything is installed or stamped."""
    venv = sys.prefix
    stamps = sorted(p for p in os.listdir(venv) if p.startswith(".installed-"))
    env = {**os.environ, "PATH": _fake_gpu_path(tmp_path), "VENV": venv}
    result = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "CPU-only build" in errors[0] and torch.__version__ in errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(p for p in os.listdir(venv) if p.startswith(".installed-")) == stamps  # nothing touched


def test_cuda_checks_fit_their_time_budget_by_construction():
    """scripts/cuda_checks.sh gives each part at most what is left of an 8-minute budget."""
    text = (ROOT / "scripts" / "cuda_checks.sh").read_text()
    assert "BUDGET_S=${BUDGET_S:-480}" in text and "timeout" in text
    result = subprocess.run(["bash", "-c", f"source <(sed -n '/^part_limit()/,/^}}/p' {ROOT}/scripts/cuda_checks.sh);"
                             " start=0; BUDGET_S=480; SECONDS=400; part_limit 300"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "80", result.stdout + result.stderr


def test_cuda_checks_step_parts_skip_the_floor_study():
    """On a GPU the floor (a second, op-counted run) would eat the step part's cap before the one figure
    the A10G plan needs, the 512-token step's peak memory, is printed."""
    text = (ROOT / "scripts" / "cuda_checks.sh").read_text().replace("\\\n", " ")
    steps = [line for line in text.splitlines() if "-m benchmarks.step" in line]
    assert len(steps) == 2 and all("--no_floor" in line for line in steps)
