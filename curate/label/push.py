"""`curate label push`: create or update Argilla datasets from canonical rows.

Records are upserted by id (see `schema.py`), so a re-push updates and never duplicates. Batches are
sent one by one with retries (connection errors, 5xx); after each batch its record ids and payload
hashes are appended to a state file, so an interrupted push resumes where it stopped and an unchanged
record is not sent again. The state belongs to one server dataset (its UUID heads the file): when the
dataset was deleted and recreated, everything is sent again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from curate.errors import ConfigError, ExternalServiceError
from curate.label import schema
from curate.label.client import Connection, RestApi, connect, quiet_sdk, with_retries

ProgressCallback = Callable[[str, int, int], None]  # (dataset name, records done, records total)


@dataclass(frozen=True)
class PushOptions:
    dataset: str
    workspace: str = "curate"
    min_submitted: int = 2
    preference_question: str = "label"  # "Which answer is better? A / B / Tie"; or "ranking"
    guidelines: str | None = None  # Markdown text (read from the user's file); None: a short default
    suggestions: dict[str, str] | None = None  # question name -> column
    metadata_columns: list[str] | None = None  # None: schema.DEFAULT_METADATA_COLUMNS present in the input
    batch_size: int = 100
    max_retries: int = 5


def _payload_hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class PushState:
    """Append-only record of what reached one server dataset: `#dataset <uuid>`, then `<id>\\t<hash>`."""

    def __init__(self, path: Path | None, dataset_id: str):
        self.path = path
        self.sent: dict[str, str] = {}
        if path is None:
            return
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            if lines and lines[0] == f"#dataset {dataset_id}":
                for line in lines[1:]:
                    key, _, digest = line.partition("\t")
                    if digest:
                        self.sent[key] = digest
        if not self.sent:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"#dataset {dataset_id}\n", encoding="utf-8")

    def record(self, entries: list[tuple[str, str]]) -> None:
        for key, digest in entries:
            self.sent[key] = digest
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(f"{key}\t{digest}\n" for key, digest in entries))
            handle.flush()
            os.fsync(handle.fileno())


def _validate(options: PushOptions) -> None:
    schema.check_dataset_name(options.dataset)
    if options.preference_question not in schema.PREFERENCE_QUESTIONS:
        choices = " or ".join(repr(choice) for choice in schema.PREFERENCE_QUESTIONS)
        raise ConfigError(f"label push: preference_question must be {choices}, not {options.preference_question!r}")
    for question in (options.suggestions or {}):
        if question not in schema.SUGGESTABLE_QUESTIONS:
            raise ConfigError(
                f"label push: suggestions.{question}: only {', '.join(schema.SUGGESTABLE_QUESTIONS)} take suggestions"
            )
    if options.min_submitted < 1:
        raise ConfigError("label push: min_submitted must be at least 1")


def ensure_workspace(client, name: str, connection: Connection, max_retries: int):
    import argilla as rg

    def find_or_create():
        with quiet_sdk():
            workspace = client.workspaces(name)
            if workspace is None:
                workspace = rg.Workspace(name=name, client=client).create()
            return workspace

    return with_retries(find_or_create, f"workspace {name!r}", connection, max_retries)


def ensure_dataset(client, name: str, workspace, settings, connection: Connection, max_retries: int):
    """The dataset `name` in `workspace`, created (and published) with `settings` when missing."""
    import argilla as rg

    def find_or_create():
        with quiet_sdk():
            dataset = client.datasets(name=name, workspace=workspace)
            if dataset is None:
                dataset = rg.Dataset(name=name, workspace=workspace, settings=settings, client=client).create()
            return dataset

    return with_retries(find_or_create, f"dataset {name!r}", connection, max_retries)


def push_frame(
    frame: pl.DataFrame,
    connection: Connection,
    options: PushOptions,
    state_dir: Path | None = None,
    progress: ProgressCallback = lambda name, done, total: None,
    on_retry: Callable[[str], None] = lambda message: None,
) -> dict:
    """Push the rows of `frame` (canonical columns + scores); returns a JSON-able report."""
    _validate(options)
    missing = [column for column in (options.suggestions or {}).values() if column not in frame.columns]
    if missing:
        raise ConfigError(f"label push: suggestion column {missing[0]!r} is not in the input")
    columns = schema.metadata_columns(frame.schema, options.metadata_columns)  # a wrong name fails before the network
    client = connect(connection)
    workspace = ensure_workspace(client, options.workspace, connection, options.max_retries)
    frame = schema.with_record_keys(frame)
    duplicated_ids = frame.height - frame["id"].n_unique()
    report: dict = {
        "workspace": options.workspace,
        "datasets": {},
        "rows": frame.height,
        "rows_sharing_an_id": duplicated_ids,
        "record_id": "row id" if duplicated_ids == 0 else "row id; rows sharing one get id + hash of source",
    }
    for kind in ("sft", "preference"):
        rows = frame.filter(pl.col("kind") == kind)
        if rows.height == 0:
            continue
        name = schema.dataset_name(options.dataset, kind)
        settings = schema.settings(kind, columns, options.min_submitted, options.preference_question, options.guidelines)
        dataset = ensure_dataset(client, name, workspace, settings, connection, options.max_retries)
        _check_questions(dataset, kind)
        if options.guidelines is not None and dataset.settings.guidelines != options.guidelines:
            _update_guidelines(dataset, options.guidelines, connection, options.max_retries)
        payloads = schema.record_payloads(rows, kind, columns, options.suggestions or {})
        state = PushState(state_dir / f"{name}.pushed.tsv" if state_dir else None, str(dataset.id))
        digests = [_payload_hash(payload) for payload in payloads]
        todo = [(p, d) for p, d in zip(payloads, digests) if state.sent.get(p["id"]) != d]
        skipped = len(payloads) - len(todo)
        done = skipped
        progress(name, done, len(payloads))
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start : start + options.batch_size]
            _send_batch(dataset, [p for p, _ in batch], connection, options.max_retries, on_retry)
            state.record([(p["id"], d) for p, d in batch])
            done += len(batch)
            progress(name, done, len(payloads))
        report["datasets"][name] = {
            "dataset_id": str(dataset.id),
            "kind": kind,
            "records": len(payloads),
            "sent": len(todo),
            "unchanged_skipped": skipped,
            "metadata": list(columns),
            "guidelines": "default" if options.guidelines is None else "given",
        }
    return report


def _check_questions(dataset, kind: str) -> None:
    names = {question.name for question in dataset.settings.questions}
    expected = set(schema.QUESTIONS_BY_KIND[kind])
    if not expected <= names:
        raise ExternalServiceError(
            f"Argilla dataset {dataset.name!r} exists with other questions ({', '.join(sorted(names))}); "
            "push to a new dataset name"
        )


def _update_guidelines(dataset, guidelines: str, connection: Connection, max_retries: int) -> None:
    """New guidelines for a dataset pushed before: only the guidelines change (no settings round trip)."""
    RestApi(connection, max_retries).call(
        "PATCH", f"/api/v1/datasets/{dataset.id}", f"updating the guidelines of {dataset.name!r}", json={"guidelines": guidelines}
    )


def _send_batch(dataset, payloads: list[dict], connection: Connection, max_retries: int, on_retry) -> None:
    import argilla as rg

    def records():
        return [
            rg.Record(
                id=payload["id"],
                fields=payload["fields"],
                metadata=payload["metadata"],
                suggestions=[
                    rg.Suggestion(question_name=item["question_name"], value=item["value"], agent="curate")
                    for item in payload["suggestions"]
                ],
            )
            for payload in payloads
        ]

    def send():
        with quiet_sdk():
            dataset.records.log(records(), batch_size=len(payloads))

    with_retries(send, f"sending {len(payloads)} records to {dataset.name!r}", connection, max_retries, on_retry=on_retry)
