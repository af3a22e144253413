"""Engines execute one stage's work; the runner (curate/runner.py) does everything around it.

The runner decides *whether* a stage runs (fingerprints, resume), gives it a context, and afterwards
counts rows, checks the accounting and writes the stage record and the manifest, the same for every
engine. An engine decides *how* the rows get from the stage's input Parquet to its outputs:

    engine.execute(spec, config, ctx, input_path, kept_path, dropped_path) -> report dict

It must write `kept_path` and `dropped_path` (canonical columns; dropped rows add `stage` and
`reason`), atomically, and return the stage's JSON-able report. Row-local stages (`spec.kind ==
"row"`) are a per-batch `spec.transform`; global stages a whole-table `spec.run` (or, on a cluster,
their `spec.distributed` form when they have one).

`local` (curate.engines.local) runs on this machine; `ray` (curate.engines.ray, optional extra
`curate[ray]`) runs the same stages on a Ray cluster. Both must give identical outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from curate.stage import StageContext, StageSpec


class Engine(Protocol):
    name: str

    def execute(
        self, spec: StageSpec, config: Any, ctx: StageContext, input_path: Path, kept_path: Path, dropped_path: Path
    ) -> dict[str, Any]: ...

    def close(self) -> None: ...


def get_engine(name: str = "local", **options) -> Engine:
    """The engine called `name` (`local` or `ray`); options are the engine's own (e.g. `address`)."""
    from curate.errors import ConfigError

    if name == "local":
        from curate.engines.local import LocalEngine

        return LocalEngine(**options)
    if name == "ray":
        try:
            from curate.engines.ray import RayEngine
        except ImportError as error:
            raise ConfigError(f"--engine ray needs the optional extra: pip install 'curate[ray]' ({error})") from None
        return RayEngine(**options)
    raise ConfigError(f"unknown engine {name!r}; known engines: local, ray")
