"""The set-up and GPU-check scripts, driven as a user on a GPU machine would meet them."""

import os
import re
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
    """scripts/cuda_checks.sh gives each part at most what is left of its budget (510 s, inside a device
    lease), the parts' caps add up to it, and a part that ignores SIGTERM is killed."""
    text = (ROOT / "scripts" / "cuda_checks.sh").read_text()
    assert "BUDGET_S=${BUDGET_S:-510}" in text and "timeout -k 5" in text
    caps = [int(m) for m in re.findall(r"^\s*part \w+ (\d+) ", text, re.M)]
    assert len(caps) == 8 and sum(caps) <= 510, caps
    result = subprocess.run(["bash", "-c", f"source <(sed -n '/^part_limit()/,/^}}/p' {ROOT}/scripts/cuda_checks.sh);"
                             " start=0; BUDGET_S=480; SECONDS=400; part_limit 300"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "80", result.stdout + result.stderr


def test_cuda_checks_keep_the_image_plugins_out_and_measure_the_recipe_allocator():
    text = (ROOT / "scripts" / "cuda_checks.sh").read_text()
    assert "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1" in text and "-p no:cacheprovider" in text
    assert "PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}" in text
    assert "expandable_segments:True" in (ROOT / "run_training.sh").read_text()
    assert "--no-compile" in text and "--target \"$site\"" in text


def test_cuda_checks_step_parts_skip_the_floor_study():
    """On a GPU the floor (a second, op-counted run) would eat the step part's cap before the one figure
    the A10G plan needs, the 512-token step's peak memory, is printed."""
    text = (ROOT / "scripts" / "cuda_checks.sh").read_text().replace("\\\n", " ")
    steps = [line for line in text.splitlines() if "-m benchmarks.step" in line]
    assert len(steps) == 2 and all("--no_floor" in line for line in steps)


def test_cuda_checks_on_an_image_with_old_transformers_stop_in_one_line_naming_what_to_carry(tmp_path):
    """The GPU machine's Python (stubbed here: it claims a CUDA GPU and transformers 5.17) stops at the
    preflight in one line that names the package and the carry script, before any part runs and without
    calling pip (there is no .carry folder to install from)."""
    import sys

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import importlib.metadata as m\n_real = m.version\n"
        "m.version = lambda name: '5.17.0' if name == 'transformers' else _real(name)\n"
        "import torch\ntorch.cuda.is_available = lambda: True\n")
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nPYTHONPATH="{fake}" exec "{sys.executable}" "$@"\n')
    stub.chmod(0o755)
    env = {"PYTHON": str(stub), "PATH": "/usr/bin:/bin", "CARRY_DIR": str(tmp_path / "no_carry")}
    result = subprocess.run(["bash", "scripts/cuda_checks.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "transformers>=5.24 (found 5.17.0)" in result.stderr and "scripts/carry_wheels.sh" in result.stderr
    assert not (tmp_path / "out").exists() and "installing" not in result.stdout
    # carried wheels for another Python: pip --no-index refuses them, said in one line, nothing else runs
    carry = tmp_path / "carry"
    (carry / "wheels").mkdir(parents=True)
    (carry / "wheels" / "transformers-5.24.0-cp399-cp399-manylinux_2_28_x86_64.whl").write_bytes(b"")
    site = tmp_path / "site"
    result = subprocess.run(["bash", "scripts/cuda_checks.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                            text=True, env={**env, "CARRY_DIR": str(carry), "CARRY_SITE": str(site)})
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "do not install" in result.stderr and not site.exists() and not (tmp_path / "out").exists()


def test_preflight_names_each_package_below_its_floor():
    import importlib.util

    spec = importlib.util.spec_from_file_location("preflight", ROOT / "scripts" / "preflight.py")
    preflight = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preflight)
    ok = {p: "99.0" for p in preflight.NEEDED}
    assert preflight.missing(ok) == []
    assert preflight.missing({**ok, "transformers": "5.17.0", "pytest": None}) == [
        "transformers>=5.24 (found 5.17.0)", "pytest>=8 (not installed)"]


def test_cuda_checks_write_at_most_four_files():
    """The GPU machine returns at most 8 files: the script writes checks.log, results.jsonl, parts.tsv and
    summary.txt into OUT_DIR, and nothing per part."""
    text = (ROOT / "scripts" / "cuda_checks.sh").read_text()
    written = sorted(set(re.findall(r'"\$out/([A-Za-z_.]+)"', text)))
    assert written == ["checks.log", "parts.tsv", "results.jsonl", "summary.txt"]


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {n.lower().replace("_", "-"): v for n, v in (x.split("==") for x in lines if x and not x.startswith("#"))}


def test_constraints_pin_every_requirement_exactly():
    """Upstream releases change defaults under us (transformers 5.25 turned hub kernels on): every
    requirement has an exact pin, torch excepted (the CPU build or the GPU machine's own)."""
    pins = _pins()
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            m = re.match(r"\s*([A-Za-z0-9_.-]+)", line.split("#")[0])
            if m and not line.lstrip().startswith("-r") and m.group(1) != "torch":
                assert m.group(1).lower().replace("_", "-") in pins, f"{m.group(1)} ({name}) has no pin"
    assert "torch" not in pins and all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in pins.values())
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "pins=(-c constraints.txt)" in setup and 'PINS=${PINS:-exact}' in setup


def test_the_venv_runs_the_pinned_versions():
    """What the suite runs on is what constraints.txt says it passed with (skipped for PINS=loose)."""
    from importlib.metadata import PackageNotFoundError, version

    if any(p.endswith("-loose") for p in os.listdir(sys.prefix) if p.startswith(".installed-")):
        pytest.skip("this venv was set up with PINS=loose")
    wrong = {}
    for name, pinned in _pins().items():
        try:
            found = version(name)
        except PackageNotFoundError:
            found = None
        if found != pinned:
            wrong[name] = (pinned, found)
    assert wrong == {}
