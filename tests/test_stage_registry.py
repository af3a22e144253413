"""The stage registry imports only the module a looked-up built-in type lives in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from curate.stage import registered_stages
from curate.stages import MODULES

REPO = Path(__file__).resolve().parent.parent


def test_module_map_names_every_builtin_stage_and_its_module():
    builtin = {
        name: spec for name, spec in registered_stages().items() if (spec.transform or spec.run).__module__.startswith("curate.stages.")
    }
    assert set(MODULES) == set(builtin)
    for name, spec in builtin.items():
        function = spec.transform or spec.run
        # A row stage's `run` is a wrapper made in curate.stage; its transform says where it lives.
        assert function.__module__ == f"curate.stages.{MODULES[name]}", name


def test_looking_up_dedup_imports_no_other_stage_module():
    code = (
        "import sys; from curate.stage import get_stage; get_stage('dedup'); "
        "print(sorted(m for m in sys.modules if m.startswith('curate.stages.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.stdout.strip() == "['curate.stages.dedup']"


def test_unknown_type_still_lists_every_stage():
    import pytest

    from curate.errors import ConfigError
    from curate.stage import get_stage

    with pytest.raises(ConfigError, match="known types: decontaminate, dedup, filter"):
        get_stage("dedupe")
