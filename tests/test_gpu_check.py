"""scripts/gpu_check.sh: its dry run lists every check, and on a machine without a GPU it refuses in one line.

The checks themselves need a CUDA GPU; here we prove the script is ready for the day one is lent: the
commands it would run are the real ones (configs that load, files that exist), and it never pretends to
pass without a GPU.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

from train.config import load_config

GPU_MARK = re.compile(r"^(@pytest\.mark\.gpu|pytestmark.*mark\.gpu)", re.M)
CHECKS = ("setup", "gpu-tests", "kernel", "curate", "sft", "dpo")


def run_script(repo_root, *args, path=None):
    env = {key: value for key, value in os.environ.items() if key != "GPU_CHECK_PYTHON"}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        ["bash", str(repo_root / "scripts" / "gpu_check.sh"), *args],
        capture_output=True, text=True, timeout=120, env=env, cwd=repo_root,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(repo_root) -> subprocess.CompletedProcess:
    result = run_script(repo_root, "--dry-run")
    assert result.returncode == 0, result.stderr
    return result


def dry_run_commands(dry_run) -> dict[str, str]:
    listed = {}
    for line in dry_run.stdout.splitlines()[1:]:
        name, _, rest = line.strip().partition(" ")
        listed[name] = rest.split(") ", 1)[1]  # drop "(timeout Ns)"
    return listed


def test_dry_run_lists_every_check_with_its_timeout(repo_root, dry_run):
    listed = dry_run_commands(dry_run)
    assert tuple(listed) == CHECKS
    # Every test file with a GPU-marked test, and only those.
    gpu_files = sorted(p.relative_to(repo_root).as_posix() for p in (repo_root / "tests").glob("test_*.py")
                       if GPU_MARK.search(p.read_text(encoding="utf-8")))  # fmt: skip
    assert gpu_files and shlex.split(listed["gpu-tests"])[5:-4] == gpu_files
    assert "bench/kernel_gpu.py --tokens 1000000" in listed["kernel"]
    assert "train.cli sft --config configs/gpu_check_sft.yaml" in listed["sft"]
    assert "train.cli dpo --config configs/gpu_check_dpo.yaml" in listed["dpo"]
    output = dry_run.stdout
    assert all("(timeout" in line for line in output.splitlines()[1:])
    # The timeouts of the checks (setup aside) keep the whole check under 8 minutes.
    timeouts = [int(line.split("(timeout", 1)[1].split("s)")[0]) for line in output.splitlines()[1:]]
    assert sum(timeouts[1:]) < 8 * 60


def test_dry_run_commands_point_at_real_files_and_valid_bf16_configs(repo_root, dry_run):
    listed = dry_run_commands(dry_run)
    for name in ("kernel", "curate", "sft", "dpo"):
        words = shlex.split(listed[name])
        paths = [w for w in words if w.endswith((".py", ".yaml"))]
        assert paths and all((repo_root / p).is_file() for p in paths), (name, paths)
    for mode, split in (("sft", "sft"), ("dpo", "pref")):
        config = load_config(repo_root / "configs" / f"gpu_check_{mode}.yaml")
        assert config.optim.precision == "bf16"
        # The training checks read the split the curate check writes.
        assert config.data.split_dir == f"runs/gpu-check/sample/{split}"
        assert "--run-dir runs/gpu-check/sample" in listed["curate"]


def test_without_a_gpu_it_exits_3_with_one_clear_line(repo_root):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: the no-GPU refusal cannot be observed here")
    result = run_script(repo_root)
    assert result.returncode == 3
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "nothing was run" in lines[0]


def test_a_gpu_without_a_cuda_torch_exits_4_and_says_how_to_get_one(repo_root, tmp_path):
    # nvidia-smi present, but no Python on PATH (or given) sees a CUDA device.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA torch is here: the refusal cannot be observed")
    result = run_script(repo_root, path=f"{fake_bin}:{os.environ['PATH']}")
    assert result.returncode == 4, result.stderr
    assert "no Python with a CUDA torch" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_unknown_option_is_a_usage_error(repo_root):
    result = run_script(repo_root, "--bogus")
    assert result.returncode == 2 and "unknown option --bogus" in result.stderr
