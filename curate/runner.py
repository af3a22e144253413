"""The pipeline runner: executes a YAML pipeline into a run directory, with row accounting and resume.

    run_dir/
      ingest/data.parquet            canonical records read from the raw inputs
      quarantine.parquet             raw rows that could not become records (file, row, reason, raw)
      <stage>/data.parquet           rows that flow on after each stage
      <stage>/dropped.parquet        rows the stage removed, with `stage` and `reason`
      <stage>/_SUCCESS.json          fingerprint, counts, report and timing of the stage's last run
      manifest.json                  config hash, input fingerprints, versions, counts, timings
      .curate-owned.json             ownership marker: the outputs curate wrote here (safety/ownership.py)
      .curate.lock                   held by the run writing here (a second run is refused)

A stage whose config, code version and input are unchanged since its last successful run is skipped
(resume after a crash, a kill, or a threshold change further down). Every write is atomic, and the
same inputs and config give byte-identical data files. Outputs an earlier configuration wrote and
this one does not (a stage since removed or renamed) are removed, so a run dir describes one run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jsonschema
from pydantic import ValidationError
import polars as pl
import yaml

import curate
from curate.atomic import write_json
from curate.errors import ConfigError, RunStateError
from curate.manifest import IngestRecord, Manifest, PipelineInfo, StageRecord, accounting, parse_record
from curate.ingest import FileReport, IngestOptions, InputSpec, expand_inputs, input_spec_from_json, input_spec_json, path_sha256
from curate.engines import Engine
from curate.engines.local import LocalEngine
from curate.stage import StageContext, StageSpec, get_stage, importable_stage_type, parse_stage_config
from curate.stages.ingest import stored_size
from safety.locking import exclusive_lock
from safety.ownership import claim_dir, new_generation, remove_all_recorded, remove_leftover_temps, remove_stale
from safety.redact import redact_value
from schemas import CANONICAL_SCHEMA, QUARANTINE_SCHEMA, load_schema

INGEST_STAGE = "ingest"
SUCCESS_FILE = "_SUCCESS.json"
MANIFEST_FILE = "manifest.json"
QUARANTINE_FILE = "quarantine.parquet"
REPORT_FILE = "report.html"


# ---------------------------------------------------------------------------------------------------
# Pipeline config


@dataclass(frozen=True)
class StageEntry:
    name: str
    type: str
    spec: StageSpec
    config: Any  # the stage's validated pydantic config


@dataclass(frozen=True)
class Pipeline:
    name: str
    run_dir: Path
    base_dir: Path
    seed: int
    inputs: list[InputSpec]
    ingest: IngestOptions
    stages: list[StageEntry]
    source: dict  # the config as written (after defaults), for the manifest and config hash
    path: Path | None = None
    # `engine:` options (batch_rows): how stages execute, never what they output, so not in `source`.
    engine_options: dict = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        return _sha256_text(_canonical_json(self.source))


def _left_to_stage_model(error) -> bool:
    """An error inside a built-in stage's config: its model reports it (a config that is not a mapping
    at all stays the schema's to report)."""
    path = list(error.absolute_path)
    inside = len(path) >= 3 and path[0] == "stages" and path[2] == "config"
    return inside and not (len(path) == 3 and error.validator == "type")


def read_pipeline_yaml(pipeline: str | Path):
    """A pipeline file's YAML as written (not validated); errors are one line naming the file."""
    path = Path(pipeline).resolve()
    if not path.is_file():
        raise ConfigError(f"{pipeline}: no such pipeline file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{pipeline}: {where}not valid YAML ({getattr(error, 'problem', error)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{pipeline}: not UTF-8 text") from None


def load_pipeline(pipeline: str | Path | dict, run_dir: str | Path | None = None, base_dir: Path | None = None) -> Pipeline:
    """Read and validate a pipeline YAML (or an equivalent dict). Errors are one line naming the field."""
    path: Path | None = None
    if isinstance(pipeline, (str, Path)):
        path = Path(pipeline).resolve()
        raw = read_pipeline_yaml(pipeline)
        base = path.parent
        label = str(pipeline)
    else:
        raw = pipeline
        base = Path(base_dir) if base_dir else Path.cwd()
        label = "pipeline"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping with `inputs:` and `stages:`")
    validator = jsonschema.Draft202012Validator(load_schema("pipeline"))
    # Stage configs are the models' to check (parse_stage_config below): one validator, one message.
    errors = sorted(
        (error for error in validator.iter_errors(raw) if not _left_to_stage_model(error)),
        key=lambda e: list(e.absolute_path),
    )
    if errors:
        first = errors[0]
        where = ".".join(str(part) for part in first.absolute_path) or "(top level)"
        raise ConfigError(f"{label}: {where}: {first.message}")

    name = raw.get("name") or (path.stem if path else "pipeline")
    if run_dir is not None:
        resolved_run_dir = Path(run_dir).resolve()
    else:
        resolved_run_dir = (base / raw.get("run_dir", f"runs/{name}")).resolve()
    ingest_raw = raw.get("ingest", {})
    options = IngestOptions(**ingest_raw)
    inputs = [input_spec_from_json(item, f"{label}: inputs.{index}") for index, item in enumerate(raw["inputs"])]
    stages: list[StageEntry] = []
    seen: set[str] = {INGEST_STAGE}
    for index, item in enumerate(raw.get("stages", [])):
        if not item.get("enabled", True):
            continue
        stage_name = item.get("name", item["type"])
        if stage_name in seen:
            raise ConfigError(f"{label}: stages.{index}.name: {stage_name!r} is used twice (or is reserved); give each stage a unique name")
        seen.add(stage_name)
        spec = get_stage(item["type"])
        if spec.kind == "source":
            raise ConfigError(f"{label}: stages.{index}.type: {item['type']!r} always runs first; configure it under `ingest:`")
        config = parse_stage_config(spec, item.get("config"), f"{label}: stages.{index} ({stage_name})")
        stages.append(StageEntry(name=stage_name, type=item["type"], spec=spec, config=config))
    source = {
        "name": name,
        "seed": raw.get("seed", 0),
        "inputs": [input_spec_json(i) for i in inputs],
        "ingest": options.model_dump(),
        "stages": [
            {"name": s.name, "type": s.type, "version": s.spec.version, "config": s.config.model_dump(mode="json")}
            for s in stages
        ],
    }
    return Pipeline(
        name=name,
        run_dir=resolved_run_dir,
        base_dir=base,
        seed=int(raw.get("seed", 0)),
        inputs=inputs,
        ingest=options,
        stages=stages,
        source=source,
        path=path,
        engine_options=dict(raw.get("engine") or {}),
    )


# ---------------------------------------------------------------------------------------------------
# Fingerprints


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    return path_sha256(path)  # one definition: ingest compares it with the bytes it read


# ---------------------------------------------------------------------------------------------------
# Progress reporting: the CLI plugs a rich display in; the library default is silent.


@dataclass
class RunEvents:
    stage_started: Callable[[str, str], None] = lambda name, type_name: None
    stage_progress: Callable[[str, str], None] = lambda name, message: None
    # (stage, phase, done, total or None, unit): counted phases (StageContext.phase), for bars with ETA.
    phase_progress: Callable[[str, str, int, int | None, str], None] = lambda name, phase, done, total, unit: None
    stage_finished: Callable[[str, dict], None] = lambda name, record: None


# ---------------------------------------------------------------------------------------------------
# Running


@dataclass
class RunResult:
    run_dir: Path
    manifest: dict = field(default_factory=dict)
    removed_stale: list[str] = field(default_factory=list)  # outputs of an earlier config, removed


def _parquet_rows(path: Path) -> int:
    return pl.scan_parquet(path, glob=False).select(pl.len()).collect().item()


def _load_success(stage_dir: Path, fingerprint: str) -> StageRecord | None:
    marker = stage_dir / SUCCESS_FILE
    if not marker.is_file() or not (stage_dir / "data.parquet").is_file():
        return None
    try:
        record = parse_record(json.loads(marker.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, OSError, ValidationError):
        return None  # damaged or from an older layout: recompute
    if record.fingerprint != fingerprint:
        return None
    if record.output_fingerprint != file_sha256(stage_dir / "data.parquet"):
        return None  # the output was touched since: recompute rather than trust it
    return record


def _finished(events: RunEvents, record: StageRecord, skipped: bool) -> StageRecord:
    """The record as this run sees it (cached or not), announced to the display."""
    record = record.model_copy(update={"skipped": skipped})
    events.stage_finished(record.name, record.as_dict())
    return record


def _store(stage_dir: Path, record: StageRecord) -> None:
    write_json(stage_dir / SUCCESS_FILE, redact_value(record.as_dict()))  # credentials in configs/reports never persist


def _run_ingest(pipeline: Pipeline, events: RunEvents, force: bool, engine: Engine) -> dict:
    stage_dir = pipeline.run_dir / INGEST_STAGE
    files = expand_inputs(pipeline.inputs, pipeline.base_dir)
    input_records = []
    for path, display, spec in files:
        input_records.append(
            {"file": display, "format": spec.format, "sha256": file_sha256(path), "bytes": stored_size(path)}
        )
    fingerprint = _sha256_text(
        _canonical_json({"version": get_stage(INGEST_STAGE).version, "inputs": pipeline.source["inputs"], "ingest": pipeline.source["ingest"], "files": input_records})
    )
    events.stage_started(INGEST_STAGE, INGEST_STAGE)
    cached = None if force else _load_success(stage_dir, fingerprint)
    if cached is not None and (pipeline.run_dir / QUARANTINE_FILE).is_file():
        return _finished(events, cached, skipped=True)

    started = time.perf_counter()
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        name=INGEST_STAGE,
        run_dir=pipeline.run_dir,
        stage_dir=stage_dir,
        pipeline_dir=pipeline.base_dir,
        seed=pipeline.seed,
        progress=lambda message: events.stage_progress(INGEST_STAGE, message),
        phase_progress=lambda phase, done, total, unit: events.phase_progress(INGEST_STAGE, phase, done, total, unit),
    )
    expected_sha256 = [record["sha256"] for record in input_records]
    input_bytes = sum(record["bytes"] for record in input_records)
    if _isolated(engine, INGEST_STAGE, input_bytes // APPROX_BYTES_PER_ROW):
        arguments = {
            "files": [[str(path), display, input_spec_json(spec)] for path, display, spec in files],
            "options": pipeline.ingest.model_dump(mode="json", exclude_unset=True), "expected_sha256": expected_sha256,
        }  # fmt: skip
        reports = [FileReport.from_dict(values) for values in _in_child("ingest", ctx, arguments)]
    else:
        reports = _ingest_work(ctx, files, pipeline.ingest, expected_sha256)

    record = _ingest_record(pipeline, fingerprint, input_records, reports, time.perf_counter() - started)
    _store(stage_dir, record)
    return _finished(events, record, skipped=False)


def _ingest_record(pipeline: Pipeline, fingerprint: str, input_records: list[dict], reports: list[FileReport], seconds: float) -> IngestRecord:
    stage_dir = pipeline.run_dir / INGEST_STAGE
    rows_in = sum(r.rows for r in reports)
    rows_added = sum(r.rows_added for r in reports)
    kept = _parquet_rows(stage_dir / "data.parquet")
    quarantined = _parquet_rows(pipeline.run_dir / QUARANTINE_FILE)
    if kept + quarantined != rows_in + rows_added:
        raise AssertionError(f"ingest lost rows: read {rows_in} (+{rows_added} exploded), kept {kept}, quarantined {quarantined}")
    repairs: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for report in reports:
        for name, count in report.repairs.as_dict().items():
            repairs[name] = repairs.get(name, 0) + count
        for reason, count in report.quarantine_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
    return IngestRecord(
        name=INGEST_STAGE,
        type=INGEST_STAGE,
        version=get_stage(INGEST_STAGE).version,
        fingerprint=fingerprint,
        output_fingerprint=file_sha256(stage_dir / "data.parquet"),
        rows_in=rows_in,
        rows_out=kept,
        rows_quarantined=quarantined,
        quarantined_by_reason=dict(sorted(reasons.items())),
        # Present only when a mapping changed rows, so manifests of plain inputs read as before.
        rows_added=rows_added or None,
        repairs=dict(sorted(repairs.items())) or None,
        seconds=round(seconds, 3),
        files=[
            {**inp, **{"rows": r.rows, "kept": r.kept, "quarantined": r.quarantined, "blank_lines": r.blank_lines, "format": r.format},
             **({"repairs": r.repairs.as_dict()} if r.repairs.as_dict() else {}), **({"rows_added": r.rows_added} if r.rows_added else {})}
            for inp, r in zip(input_records, reports)
        ],
        report=dict(sorted(repairs.items())),  # the mapping's repairs: shown in the summary and report
    )


# Rough bytes of raw input per record: what `engine.isolates` weighs for ingest, which knows bytes, not rows.
APPROX_BYTES_PER_ROW = 1_000


def _isolated(engine: Engine, stage_type: str, rows: int) -> bool:
    """Whether this stage's work runs in a process of its own: the engine isolates a stage of this size
    (a fresh heap per stage: curate/engines/isolation.py) and a new process can find the stage by name."""
    isolates = getattr(engine, "isolates", None)
    return isolates is not None and isolates(rows) and importable_stage_type(stage_type)


def _in_child(task: str, ctx: StageContext, arguments: dict):
    from curate.engines.isolation import run_in_child

    return run_in_child(task, ctx, arguments)


def _ingest_work(ctx: StageContext, files: list, options: IngestOptions, expected_sha256: list[str]) -> list[FileReport]:
    records_path, quarantine_path = ctx.stage_dir / "data.parquet", ctx.run_dir / QUARANTINE_FILE
    return get_stage(INGEST_STAGE).run(files, options, ctx, records_path, quarantine_path, expected_sha256=expected_sha256)


def ingest_task(ctx: StageContext, arguments: dict) -> list[dict]:
    """`_ingest_work` in a stage's own process (curate.engines.isolation): JSON in, JSON out."""
    files = [(Path(path), display, input_spec_from_json(spec, display)) for path, display, spec in arguments["files"]]
    reports = _ingest_work(ctx, files, IngestOptions.model_validate(arguments["options"]), arguments["expected_sha256"])
    return [dataclasses.asdict(report) for report in reports]


def _stage_work(ctx: StageContext, engine: Engine, spec: StageSpec, config: Any, input_path: Path, execute: bool) -> dict:
    """The stage's rows from its input to its outputs through the engine (if `execute`), then its exports
    (split datasets), which a cached stage rewrites too: they live outside the stage folder."""
    report: dict = {}
    if execute:
        report = engine.execute(spec, config, ctx, input_path, ctx.stage_dir / "data.parquet", ctx.stage_dir / "dropped.parquet")
    if spec.export is not None:
        report.update(spec.export(pl.scan_parquet(ctx.stage_dir / "data.parquet", glob=False), config, ctx) or {})
    return report


def stage_task(ctx: StageContext, arguments: dict) -> dict:
    """`_stage_work` in a stage's own process (curate.engines.isolation): JSON in, JSON out."""
    spec = get_stage(arguments["stage_type"])
    config = spec.config_model.model_validate(arguments["config"])
    engine = LocalEngine(**arguments["engine"])
    return _stage_work(ctx, engine, spec, config, Path(arguments["input_path"]), arguments["execute"])


def _run_stage_work(engine: Engine, ctx: StageContext, entry: StageEntry, rows: int, input_path: Path, execute: bool) -> dict:
    if not _isolated(engine, entry.type, rows):
        return _stage_work(ctx, engine, entry.spec, entry.config, input_path, execute)
    arguments = {
        "stage_type": entry.type, "config": entry.config.model_dump(mode="json", exclude_unset=True), "engine": engine.options(),
        "input_path": str(input_path), "execute": execute,
    }  # fmt: skip
    return _in_child("stage", ctx, arguments)


def _run_stage(pipeline: Pipeline, entry: StageEntry, previous: StageRecord, events: RunEvents, force: bool, engine: Engine) -> StageRecord:
    stage_dir = pipeline.run_dir / entry.name
    input_path = pipeline.run_dir / previous.name / "data.parquet"
    ctx = StageContext(
        name=entry.name,
        run_dir=pipeline.run_dir,
        stage_dir=stage_dir,
        pipeline_dir=pipeline.base_dir,
        seed=pipeline.seed,
        progress=lambda message: events.stage_progress(entry.name, message),
        phase_progress=lambda phase, done, total, unit: events.phase_progress(entry.name, phase, done, total, unit),
        input_schema=dict(pl.scan_parquet(input_path, glob=False).collect_schema()),
        input_path=input_path,
    )
    extra_files = entry.spec.extra_inputs(entry.config, ctx) if entry.spec.extra_inputs else []
    extra_fingerprints = {str(p): (file_sha256(p) if Path(p).exists() else "missing") for p in extra_files}
    fingerprint = _sha256_text(
        _canonical_json(
            {
                "type": entry.type,
                "version": entry.spec.version,
                "config": entry.config.model_dump(mode="json"),
                "input": previous.output_fingerprint,
                "extra_inputs": extra_fingerprints,
                "seed": pipeline.seed,
            }
        )
    )
    events.stage_started(entry.name, entry.type)
    cached = None if (force or entry.spec.volatile) else _load_success(stage_dir, fingerprint)
    if cached is not None:
        if entry.spec.export is not None:
            # Exports (split datasets) live outside the stage folder and may have been deleted or
            # edited; rewriting them from the cached data is cheap and gives the same bytes.
            _run_stage_work(engine, ctx, entry, cached.rows_out, input_path, execute=False)
        return _finished(events, cached, skipped=True)

    started = time.perf_counter()
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / SUCCESS_FILE).unlink(missing_ok=True)
    rows_in = previous.rows_out
    report = _run_stage_work(engine, ctx, entry, rows_in, input_path, execute=True)
    rows_out = _parquet_rows(stage_dir / "data.parquet")
    dropped_frame = pl.scan_parquet(stage_dir / "dropped.parquet", glob=False)
    rows_dropped = dropped_frame.select(pl.len()).collect().item()
    rows_added = rows_out + rows_dropped - rows_in
    if rows_added < 0:
        raise AssertionError(
            f"stage {entry.name!r} ({entry.type}) lost {-rows_added} rows: in {rows_in}, out {rows_out}, dropped {rows_dropped}"
        )
    if rows_added > 0 and not entry.spec.may_add_rows:
        raise AssertionError(f"stage {entry.name!r} ({entry.type}) created {rows_added} rows but is not declared may_add_rows")
    by_reason = (
        dropped_frame.group_by("reason").len().sort("reason").collect().iter_rows() if rows_dropped else []
    )
    record = StageRecord(
        name=entry.name,
        type=entry.type,
        version=entry.spec.version,
        fingerprint=fingerprint,
        output_fingerprint=file_sha256(stage_dir / "data.parquet"),
        rows_in=rows_in,
        rows_out=rows_out,
        rows_dropped=rows_dropped,
        rows_added=rows_added,
        dropped_by_reason={reason: count for reason, count in by_reason},
        seconds=round(time.perf_counter() - started, 3),
        report=report,
    )
    _store(stage_dir, record)
    return _finished(events, record, skipped=False)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "curate": curate.__version__}
    for package in ("polars", "pyarrow", "datasketch", "tokenizers", "argilla"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


def run_pipeline(
    pipeline: str | Path | dict | Pipeline,
    run_dir: str | Path | None = None,
    force: bool = False,
    events: RunEvents | None = None,
    base_dir: Path | None = None,
    report: bool = True,
    clean: bool = False,
    engine: Engine | None = None,
) -> RunResult:
    """Execute a pipeline; returns the run directory and its manifest (and writes report.html unless
    `report` is False). `clean` first removes every output an earlier run recorded in the run dir.

    The run dir must be new, empty or one of ours (it carries the ownership marker), and never a folder
    holding the inputs, the pipeline file or the working folder; the run holds its lock throughout."""
    if not isinstance(pipeline, Pipeline):
        pipeline = load_pipeline(pipeline, run_dir=run_dir, base_dir=base_dir)
    events = events or RunEvents()
    claim_dir(pipeline.run_dir, "curate", "run", _protected_paths(pipeline), option="the run directory (run_dir / --run-dir / --out)")
    with exclusive_lock(pipeline.run_dir, "curate run"):
        remove_leftover_temps(pipeline.run_dir)
        if clean:
            remove_all_recorded(pipeline.run_dir)
        return _run_locked(pipeline, force, events, report, engine or LocalEngine(**pipeline.engine_options))


def _protected_paths(pipeline: Pipeline) -> list[Path]:
    """The files this run reads: no folder holding one of them may become its run dir."""
    files = [path for path, _, _ in expand_inputs(pipeline.inputs, pipeline.base_dir)]
    return files + ([pipeline.path] if pipeline.path else [])


def _run_locked(pipeline: Pipeline, force: bool, events: RunEvents, report: bool, engine: Engine) -> RunResult:
    run_dir = pipeline.run_dir
    # Recorded before anything is written; outputs an earlier config recorded and this one does not
    # (a stage since removed, its exports) are removed at the end, so nothing stale reads as this run's.
    outputs = [INGEST_STAGE, QUARANTINE_FILE, *(entry.name for entry in pipeline.stages), MANIFEST_FILE]
    new_generation(run_dir, *outputs, *([REPORT_FILE] if report else []))
    started = time.perf_counter()
    records = [_run_ingest(pipeline, events, force, engine)]
    for entry in pipeline.stages:
        records.append(_run_stage(pipeline, entry, records[-1], events, force or False, engine))
    removed = remove_stale(run_dir)
    manifest = build_manifest(pipeline, records, time.perf_counter() - started)
    write_json(run_dir / MANIFEST_FILE, manifest)
    if report:
        _write_report(run_dir)
    return RunResult(run_dir=run_dir, manifest=manifest, removed_stale=removed)


def _write_report(run_dir: Path) -> None:
    try:
        from curate.report import write_report
    except ImportError:  # the report module is optional for library users stripping plots
        return
    write_report(run_dir)


def build_manifest(pipeline: Pipeline, records: list[StageRecord], seconds: float) -> dict:
    manifest = Manifest(
        pipeline=PipelineInfo(
            name=pipeline.name,
            path=str(pipeline.path) if pipeline.path else None,
            config_hash=pipeline.config_hash,
            config=pipeline.source,
        ),
        run_dir=str(pipeline.run_dir),
        versions=_versions(),
        inputs=records[0].files if isinstance(records[0], IngestRecord) else [],
        stages=[{key: value for key, value in record.as_dict().items() if key != "files"} for record in records],
        accounting=accounting(records),
        final_stage=records[-1].name,
        seconds=round(seconds, 3),
    )
    # Shown and persisted, so credentials (a URL with user:pass@) go; the config hash is of the real config.
    return redact_value(manifest.as_dict())


def load_manifest(run_dir: str | Path) -> dict:
    """A run's manifest.json, checked against schemas/manifest.schema.json: a damaged or foreign file is
    a one-line RunStateError naming the first field that is wrong, never a KeyError later on."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        raise RunStateError(f"{run_dir}: no {MANIFEST_FILE}; is this a run directory written by `curate run`?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunStateError(f"{path}: not valid JSON (line {error.lineno}); rerun `curate run` to rewrite it") from None
    except (UnicodeDecodeError, RecursionError):
        raise RunStateError(f"{path}: not a manifest written by `curate run`; rerun `curate run` to rewrite it") from None
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(load_schema("manifest")).iter_errors(manifest))
    if error is not None:
        where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        raise RunStateError(f"{path}: {where}: {error.message[:200]}; rerun `curate run` to rewrite it")
    return manifest


def run_stages(
    stages: list[tuple[str, dict | None]],
    inputs: list[str | Path],
    out_dir: str | Path,
    input_format: str = "auto",
    columns: dict[str, str] | None = None,
    force: bool = False,
    events: RunEvents | None = None,
    seed: int = 0,
    base_dir: Path | None = None,
) -> RunResult:
    """Ingest `inputs` (raw files, or a stage's canonical data.parquet) and run the given (type, config)
    stages on them into `out_dir`: what the standalone verbs (`curate dedup`, `curate filter`, ...) do.

    Relative paths inside the stage configs resolve against `base_dir` (default: the working folder);
    input paths are taken relative to the working folder either way."""
    base = Path(base_dir).resolve() if base_dir else Path.cwd()
    if base != Path.cwd():
        inputs = [Path(p).resolve() for p in inputs]
    pipeline = {
        "name": stages[-1][0].replace(":", "_").replace(".", "_") if stages else "ingest",
        "seed": seed,
        "inputs": [{"path": str(p), "format": input_format, "columns": dict(columns or {})} for p in inputs],
        "stages": [
            {"name": stage_type.split(":")[-1].replace(".", "_"), "type": stage_type, "config": config or {}}
            for stage_type, config in stages
        ],
    }
    return run_pipeline(pipeline, run_dir=out_dir, force=force, events=events, base_dir=base)


def run_single_stage(
    stage_type: str, config: dict | None, inputs: list[str | Path], out_dir: str | Path, **options
) -> RunResult:
    """`run_stages` with one stage."""
    return run_stages([(stage_type, config)], inputs, out_dir, **options)
