"""Every pipeline YAML in docs/formats.md is a valid `inputs:` block (schema and mapping checks)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from curate.runner import load_pipeline

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"
BLOCKS = [block for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)]


def test_the_doc_has_a_block_per_shape():
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_yaml_block_is_a_valid_pipeline(index, tmp_path):
    config = yaml.safe_load(BLOCKS[index])
    pipeline = load_pipeline({"name": "doc", **config}, base_dir=tmp_path)
    assert pipeline.inputs
