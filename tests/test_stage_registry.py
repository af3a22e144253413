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
    # In a fresh process: in the suite, other tests' plugin stages are registered too.
    code = "from curate.stage import get_stage\ntry:\n    get_stage('dedupe')\nexcept Exception as error:\n    print(type(error).__name__, error)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.stdout.startswith("ConfigError unknown stage type 'dedupe'; known types: ")
    known = out.stdout.strip().split("known types: ")[1].split(", ")
    assert set(known) == set(MODULES) and known == sorted(known)
