"""Shared test fixtures. Server fixtures (Argilla) live in their own plugin modules."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Triton has no GPU here: its interpreter runs the kernels on the CPU. Set before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO_ROOT / "sample_data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory) -> Path:
    """The sample pipeline run once per test session (shared, read-only for tests)."""
    from curate.runner import run_pipeline

    run_dir = tmp_path_factory.mktemp("sample-run") / "run"
    run_pipeline(SAMPLE_DATA / "pipeline.yaml", run_dir=run_dir)
    return run_dir


@pytest.fixture
def copy_sample(tmp_path) -> Path:
    """A private copy of sample_data/ a test may modify."""
    target = tmp_path / "sample_data"
    shutil.copytree(SAMPLE_DATA, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target
