"""The run manifest as typed models: the one place stage records and manifest.json are built.

`StageRecord` is what a stage's `_SUCCESS.json` holds and what the manifest lists per stage;
`IngestRecord` adds the quarantine and the per-file figures. `Manifest` is manifest.json.
schemas/manifest.schema.json stays the reading contract (lenient: extra keys allowed, so older and
newer manifests load); tests/test_manifest.py checks that these models and that schema agree.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Count = Annotated[int, Field(ge=0)]
Counts = dict[str, Count]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def as_dict(self) -> dict[str, Any]:
        """JSON-able dict; optional figures left unset (None) are absent, so files read as before."""
        return {key: value for key, value in self.model_dump().items() if value is not None}


class StageRecord(Record):
    name: str = Field(min_length=1)
    type: str
    version: str
    fingerprint: str  # of the stage's config, code version, input and extra inputs: the resume key
    output_fingerprint: str  # sha256 of data.parquet, checked before trusting a cached stage
    rows_in: Count
    rows_out: Count
    rows_dropped: Count = 0
    rows_added: int | None = 0  # rows beyond its input a stage made (mixing, exploded answers)
    dropped_by_reason: Counts = Field(default_factory=dict)
    seconds: float = Field(ge=0)
    report: dict[str, Any] | None = Field(default_factory=dict)
    skipped: bool | None = None  # set in the run's view (cached or not), never in _SUCCESS.json


class IngestRecord(StageRecord):
    rows_quarantined: Count
    quarantined_by_reason: Counts
    rows_added: int | None = None  # present only when a mapping exploded answers into extra rows
    repairs: Counts | None = None  # present only when a mapping repaired rows
    files: list[dict[str, Any]] = Field(default_factory=list)  # one per input file; the manifest's `inputs`


class Accounting(Record):
    rows_in: Count
    rows_added: int
    kept: Count
    dropped: Count
    quarantined: Count
    dropped_by_stage_reason: dict[str, Counts]
    quarantined_by_reason: Counts
    reconciled: bool


class PipelineInfo(Record):
    name: str
    path: str | None
    config_hash: str
    config: dict[str, Any]


class Manifest(Record):
    pipeline: PipelineInfo
    run_dir: str
    versions: dict[str, str]
    inputs: list[dict[str, Any]]
    stages: list[dict[str, Any]]  # StageRecord.as_dict() each (the ingest one without `files`)
    accounting: Accounting
    final_stage: str
    seconds: float = Field(ge=0)

    def as_dict(self) -> dict[str, Any]:
        manifest = super().as_dict()
        manifest["pipeline"] = self.pipeline.model_dump()  # `path: null` stays, as before
        return manifest


def parse_record(raw: dict[str, Any]) -> StageRecord:
    """A stored stage record (a _SUCCESS.json) as its model; ValidationError when it is not one."""
    model = IngestRecord if "rows_quarantined" in raw else StageRecord
    return model.model_validate(raw)


def accounting(records: list[StageRecord]) -> Accounting:
    """Every input row ends kept, dropped (by a stage, for a reason) or quarantined: the sums."""
    ingest, final = records[0], records[-1]
    assert isinstance(ingest, IngestRecord)
    dropped = sum(record.rows_dropped for record in records[1:])
    added = sum(record.rows_added or 0 for record in records)  # ingest adds rows when answers explode
    reconciled = ingest.rows_in + added == final.rows_out + dropped + ingest.rows_quarantined
    if not reconciled:
        raise AssertionError(
            f"row accounting does not reconcile: in {ingest.rows_in} + added {added} != kept {final.rows_out} + "
            f"dropped {dropped} + quarantined {ingest.rows_quarantined}"
        )
    return Accounting(
        rows_in=ingest.rows_in,
        rows_added=added,
        kept=final.rows_out,
        dropped=dropped,
        quarantined=ingest.rows_quarantined,
        dropped_by_stage_reason={record.name: record.dropped_by_reason for record in records[1:] if record.rows_dropped},
        quarantined_by_reason=ingest.quarantined_by_reason,
        reconciled=reconciled,
    )
