"""The stage interface every pipeline step implements, and the registry the runner resolves types in.

A stage is a pure function over the canonical LazyFrame with a typed (pydantic) config:

    @register_stage("dedup", config=DedupConfig, version="1")
    def dedup_stage(frame: pl.LazyFrame, config: DedupConfig, ctx: StageContext) -> StageOutput: ...

It returns the rows that flow on (`kept`), the rows it removed (`dropped`, the canonical columns plus
`stage` and `reason`, optionally `reasons` and detail columns), and a JSON-able `report` for the
manifest. Stages do not print and do not read the pipeline's files: the runner does I/O, progress,
timing, accounting and caching around them. A stage that needs persistent artifacts (a dedup index)
or exports (split datasets) gets its own folder in `ctx.stage_dir`.

Registration is discovery-based: looking up a built-in type imports only the module that registers
it (`curate.stages.MODULES`); listing the stages, or a type not in that map, imports every module in
the `curate.stages` package, so a new stage plugs into the same YAML without touching the runner. A YAML `type` of the form
`some.module:name` imports `some.module` first, for plugins that live outside this package.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Protocol

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from curate.errors import ConfigError


class StageConfig(BaseModel):
    """Base for stage configs: unknown keys are an error (a typo must not silently do nothing), and no
    number is NaN or infinite (a threshold of nan compares false with everything: it silently keeps or
    drops every row). Every numeric field also declares its range (tests/test_safety_cli.py checks)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Shared numeric ranges of stage config fields.
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]  # a share of rows, words, lines, ...
NonNegativeFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what every seed consumer (datasketch, Polars, hashes) takes


@dataclass
class StageContext:
    name: str  # the stage's unique name in the pipeline
    run_dir: Path
    stage_dir: Path  # run_dir / name; the stage may keep artifacts here
    pipeline_dir: Path  # relative paths in a stage config resolve against this
    seed: int = 0
    progress: Callable[[str], None] = lambda message: None  # short status lines for the live display
    # Counted progress of a long phase: (phase, done, total or None, unit). The CLI turns it into a
    # bar with count, percentage and ETA; the library default is silent. Use `ctx.phase(...)`.
    phase_progress: Callable[[str, int, int | None, str], None] = lambda phase, done, total, unit: None
    # The input's columns and dtypes (set by the runner): what a row stage's `summarize` compares its
    # outputs with (e.g. which score columns it added), since it never sees the input itself.
    input_schema: dict[str, pl.DataType] | None = None
    # The input Parquet (set by the runner): for a row stage's per-file statistics that must not depend
    # on where batches are cut (read once via `cached`). None when a transform is called directly.
    input_path: Path | None = None
    _cache: dict = field(default_factory=dict, repr=False)
    _cache_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """`build()` once per stage run, shared by every batch and thread (eval sets, tokenizers): a
        row-local transform must not reload them per batch."""
        with self._cache_lock:
            if key not in self._cache:
                self._cache[key] = build()
            return self._cache[key]

    def __getstate__(self) -> dict:
        # Shipped to other processes (Ray workers) without the lock and the cache: each process builds
        # its own cached resources once.
        return {key: value for key, value in self.__dict__.items() if key not in ("_cache", "_cache_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _cache={}, _cache_lock=threading.Lock())

    def phase(self, name: str, total: int | None = None, unit: str = "rows") -> "Phase":
        """A counted phase (`with ctx.phase("verifying candidate pairs", total=n) as p: p.advance(k)`)."""
        return Phase(name, total, unit, self.phase_progress)

    def resolve(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self.pipeline_dir / path)


class Phase:
    """Counts work done in one phase of a stage and reports it (throttled: at most ~10 reports a second,
    plus the first and the last), so a hot loop can call `advance` per batch without cost."""

    def __init__(self, name: str, total: int | None, unit: str, report: Callable[[str, int, int | None, str], None]):
        self.name, self.total, self.unit, self._report = name, total, unit, report
        self.done = 0
        self._last = 0.0

    def advance(self, count: int = 1) -> None:
        import time

        self.done += count
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self._report(self.name, self.done, self.total, self.unit)

    def __enter__(self) -> "Phase":
        self._report(self.name, 0, self.total, self.unit)
        return self

    def __exit__(self, *exc) -> None:
        self._report(self.name, self.done, self.total, self.unit)


@dataclass
class StageOutput:
    kept: pl.LazyFrame
    dropped: pl.LazyFrame | None = None
    report: dict[str, Any] = field(default_factory=dict)
    # A global stage whose outputs are its input rows, each with a decision held in memory in input order
    # (dedup), may also say how to split one batch of input rows starting at a row offset: the local engine
    # then writes both outputs batch by batch from the input file, as it writes a row stage's, instead of
    # one streaming sink per output (Polars' streaming sink holds ~0.5 GB of 1 KB rows whatever their count).
    # It must give the same rows as `kept` and `dropped`.
    split_batch: Callable[[pl.DataFrame, int], "BatchOutput"] | None = None


def decisions_for_batch(decisions: pl.DataFrame, offset: int, height: int, stage: str) -> pl.DataFrame:
    """The rows of `decisions` (one per input row, in input order) for the input batch of `height` rows
    at `offset`, for a `split_batch`: a batch they do not cover is a bug, never a horizontal concat that
    pads its rows with null decisions."""
    part = decisions.slice(offset, height)
    if part.height != height:
        raise AssertionError(f"{stage}: {decisions.height} decisions for input rows {offset}..{offset + height}")
    return part


class StageFunction(Protocol):
    def __call__(self, frame: pl.LazyFrame, config: Any, ctx: StageContext) -> StageOutput: ...


@dataclass
class BatchOutput:
    """What a row-local stage returns for one batch: the rows that flow on and the rows it removed."""

    kept: pl.DataFrame
    dropped: pl.DataFrame | None = None


class BatchFunction(Protocol):
    """A row-local stage: sees one bounded batch, never the whole table, and must give each row the
    same result whatever batch it arrives in (so any engine may cut the table anywhere)."""

    def __call__(self, batch: pl.DataFrame, config: Any, ctx: StageContext) -> BatchOutput: ...


class SummaryFunction(Protocol):
    """A row-local stage's report, computed afterwards from what was written (lazily, streaming)."""

    def __call__(self, kept: pl.LazyFrame, dropped: pl.LazyFrame, config: Any, ctx: StageContext) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StageSpec:
    type_name: str
    run: StageFunction
    config_model: type[StageConfig]
    version: str = "1"  # bump when the stage's logic changes, so cached outputs are recomputed
    # Files (beyond the input frame) whose contents change the output, e.g. evaluation sets.
    extra_inputs: Callable[[Any, StageContext], list[Path]] | None = None
    # Runs after the stage's data is written (e.g. split datasets into sft/ and pref/): receives the
    # kept rows as written, returns a JSON-able dict merged into the stage's report.
    export: Callable[[pl.LazyFrame, Any, StageContext], dict[str, Any]] | None = None
    # Stages whose result depends on outside state (an annotation server) rerun every time.
    volatile: bool = False
    # Stages that may emit more rows than they receive (mixing with upsampling, annotator pairs).
    may_add_rows: bool = False
    description: str = ""
    # "row": `transform` runs per batch (engines stream it: bounded memory, any number of workers) and
    # `run` is derived from it; "global": `run` sees the whole table and says itself what it collects;
    # "source": `run` reads the raw inputs (ingest, register_source_stage), always first, always local.
    kind: str = "global"
    transform: BatchFunction | None = None
    summarize: SummaryFunction | None = None
    # A global stage's distributed implementation for the Ray engine, if it has one:
    # (ray.data.Dataset, config, ctx) -> (kept Dataset, dropped Dataset | None, report dict).
    distributed: Callable[..., Any] | None = None


_REGISTRY: dict[str, StageSpec] = {}
_DISCOVERED = False


def register_stage(
    type_name: str,
    *,
    config: type[StageConfig],
    version: str = "1",
    extra_inputs=None,
    export=None,
    volatile: bool = False,
    may_add_rows: bool = False,
    distributed=None,
):
    """Decorator registering a stage function under `type_name` (the YAML `type`); `distributed` is its
    Ray Data form, if it has one (see `StageSpec.distributed`)."""

    def decorate(function: StageFunction) -> StageFunction:
        spec = StageSpec(
            type_name=type_name, run=function, config_model=config, version=version, extra_inputs=extra_inputs,
            export=export, volatile=volatile, may_add_rows=may_add_rows, distributed=distributed,
            description=_summary_line(function),
        )  # fmt: skip
        _add_to_registry(spec, function)
        return function

    return decorate


def _add_to_registry(spec: StageSpec, function: Callable[..., Any]) -> None:
    """Store a spec; a second, different function under the same type name is a programming error
    (re-importing the same module registers the same function again, which is fine)."""
    existing = _REGISTRY.get(spec.type_name)
    if existing is not None and (existing.transform or existing.run) is not function:
        raise RuntimeError(f"stage type {spec.type_name!r} registered twice")
    _REGISTRY[spec.type_name] = spec


def _summary_line(function: Callable[..., Any]) -> str:
    return (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""


def register_row_stage(
    type_name: str,
    *,
    config: type[StageConfig],
    version: str = "1",
    summarize: SummaryFunction | None = None,
    extra_inputs=None,
):
    """Decorator registering a row-local stage: `transform(batch, config, ctx) -> BatchOutput`.

    Its `run` (the whole-table form, for callers holding a LazyFrame) applies the transform to one
    batch of everything; the runner instead streams it batch by batch."""

    def decorate(transform: BatchFunction) -> BatchFunction:
        def run_whole(frame: pl.LazyFrame, stage_config: Any, ctx: StageContext) -> StageOutput:
            if ctx.input_schema is None:
                ctx.input_schema = dict(frame.collect_schema())
            output = transform(frame.collect(), stage_config, ctx)
            kept = output.kept.lazy()
            dropped = output.dropped.lazy() if output.dropped is not None else None
            report = summarize(kept, dropped if dropped is not None else kept.head(0), stage_config, ctx) if summarize else {}
            return StageOutput(kept=kept, dropped=dropped, report=report)

        spec = StageSpec(
            type_name=type_name, run=run_whole, config_model=config, version=version, extra_inputs=extra_inputs,
            kind="row", transform=transform, summarize=summarize, description=_summary_line(transform),
        )  # fmt: skip
        _add_to_registry(spec, transform)
        return transform

    return decorate


def register_source_stage(type_name: str, *, config: type[StageConfig], version: str = "1"):
    """Decorator registering a source stage: it reads the pipeline's raw inputs (not an earlier stage's
    rows) and the runner starts every run with it (`ingest`). Its function is
    `read(files, config, ctx, records_path, quarantine_path, expected_sha256) -> per-file reports`;
    it writes both Parquet files atomically and reports bytes read through `ctx.phase`."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        spec = StageSpec(type_name=type_name, run=function, config_model=config, version=version, kind="source",
                         description=_summary_line(function))  # fmt: skip
        _add_to_registry(spec, function)
        return function

    return decorate


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import curate.stages as package

    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{module.name}")
    _DISCOVERED = True


def _import_builtin(type_name: str) -> None:
    """Import the one module that registers a built-in type (or every module, for a type not in the map)."""
    if type_name in _REGISTRY:
        return
    from curate.stages import MODULES

    if type_name in MODULES:
        importlib.import_module(f"curate.stages.{MODULES[type_name]}")
    if type_name not in _REGISTRY:
        _discover()


def get_stage(type_name: str) -> StageSpec:
    lookup = type_name
    if ":" not in type_name:
        _import_builtin(type_name)
    else:
        _discover()
        module_name, lookup = type_name.split(":", 1)
        try:
            importlib.import_module(module_name)
        except ImportError as error:
            raise ConfigError(f"stage type {type_name!r}: cannot import {module_name!r} ({error})") from None
    try:
        return _REGISTRY[lookup]
    except KeyError:
        raise ConfigError(
            f"unknown stage type {type_name!r}; known types: {', '.join(sorted(_REGISTRY))}"
        ) from None


def importable_stage_type(type_name: str) -> bool:
    """Whether a fresh process finds this stage by its YAML type: a built-in, or a `module:name` plugin
    (its module imports there too). A stage registered at run time by the caller's own code is not."""
    from curate.stages import MODULES

    return ":" in type_name or type_name in MODULES


def registered_stages() -> dict[str, StageSpec]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def parse_stage_config(spec: StageSpec, raw: dict | None, where: str) -> StageConfig:
    """Validate a stage's YAML config into its typed model; errors become one line naming the field."""
    from pydantic import ValidationError

    try:
        return spec.config_model.model_validate(raw or {})
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"]) or "(config)"
        raise ConfigError(f"{where}: config.{location}: {first['msg']}") from None


def drop_rows(frame: pl.LazyFrame, stage: str, reason: str | pl.Expr, **details: pl.Expr) -> pl.LazyFrame:
    """Label removed rows with the stage and reason columns every dropped table carries."""
    reason_expr = reason if isinstance(reason, pl.Expr) else pl.lit(reason)
    return frame.with_columns(
        pl.lit(stage).alias("stage"), reason_expr.cast(pl.String).alias("reason"), **details
    )
