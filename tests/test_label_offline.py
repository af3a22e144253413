"""Labeling without a server: aggregation policies, Krippendorff's alpha, applying labels to rows,
record ids, and the label stages skipping when no Argilla is configured."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from curate.cli import main
from curate.label.aggregate import aggregate_answers, agreement, krippendorff_alpha
from curate.label.pull import apply_labels
from curate.label.schema import a_is_chosen_expr, metadata_columns, record_payloads, with_record_keys
from curate.records import canonical_frame
from curate.runner import run_single_stage


def answers_frame(rows):
    return pl.DataFrame(rows, schema={"record_id": pl.String, "user": pl.String, "question": pl.String, "value": pl.String}, orient="row")


def rankings_frame(rows):
    return pl.DataFrame(rows, schema={"record_id": pl.String, "user": pl.String, "slot": pl.String, "rank": pl.Int64}, orient="row")


def long_units(data: np.ndarray) -> pl.DataFrame:
    rows = [(str(u), str(int(data[c, u]))) for c in range(data.shape[0]) for u in range(data.shape[1]) if not np.isnan(data[c, u])]
    return pl.DataFrame(rows, schema=["unit", "value"], orient="row")


@pytest.mark.parametrize("metric", ["nominal", "ordinal", "interval"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_krippendorff_alpha_matches_reference_package(metric, seed):
    krippendorff = pytest.importorskip("krippendorff", reason="reference implementation (pip install krippendorff)")
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 6, size=(4, 60)).astype(float)
    data[1:] = np.where(rng.random((3, 60)) < 0.5, data[0], data[1:])  # some agreement
    data[rng.random(data.shape) < 0.25] = np.nan
    expected = krippendorff.alpha(reliability_data=data, level_of_measurement=metric)
    assert krippendorff_alpha(long_units(data), metric) == pytest.approx(expected, abs=1e-6)


def test_krippendorff_alpha_known_values():
    # Perfect agreement with variation → 1; no pairable unit or no variation → undefined (None).
    perfect = pl.DataFrame({"unit": ["a", "a", "b", "b"], "value": ["x", "x", "y", "y"]})
    assert krippendorff_alpha(perfect) == 1.0
    assert krippendorff_alpha(pl.DataFrame({"unit": ["a", "b"], "value": ["x", "y"]})) is None
    assert krippendorff_alpha(pl.DataFrame({"unit": ["a", "a"], "value": ["x", "x"]})) is None
    # Systematic disagreement is worse than chance.
    opposite = pl.DataFrame({"unit": ["a", "a", "b", "b"], "value": ["x", "y", "x", "y"]})
    assert krippendorff_alpha(opposite) < 0


def test_majority_median_and_correction_policies():
    answers = answers_frame(
        [
            ("r1", "ann", "decision", "discard"), ("r1", "bob", "decision", "discard"), ("r1", "cat", "decision", "keep"),
            ("r2", "ann", "decision", "discard"), ("r2", "bob", "decision", "keep"),  # tie → keep
            ("r1", "ann", "quality", "1"), ("r1", "bob", "quality", "2"), ("r1", "cat", "quality", "5"),
            ("r2", "ann", "quality", "3"), ("r2", "bob", "quality", "4"),
            ("r2", "bob", "corrected_response", "  B fix "), ("r2", "ann", "corrected_response", "A fix"),
            ("r2", "cat", "corrected_response", "B fix"), ("r2", "dan", "corrected_response", ""),
        ]
    )  # fmt: skip
    result = aggregate_answers(answers, rankings_frame([]), "ranking").sort("record_id")
    r1, r2 = result.to_dicts()
    assert (r1["label_decision"], r1["label_discard_votes"], r1["label_quality"]) == ("discard", 2, 2.0)
    assert (r2["label_decision"], r2["label_quality"]) == ("keep", 3.5)
    assert r2["label_n_responses"] == 4
    # "B fix" twice beats "A fix" once (whitespace trimmed); the earliest username among its authors.
    assert (r2["label_correction"], r2["label_corrected_by"]) == ("B fix", "bob")


def test_correction_tie_breaks_by_username():
    answers = answers_frame([("r", "zed", "corrected_response", "Z"), ("r", "amy", "corrected_response", "A")])
    row = aggregate_answers(answers, rankings_frame([]), "ranking").row(0, named=True)
    assert (row["label_correction"], row["label_corrected_by"]) == ("A", "amy")


def test_borda_count_over_rankings_with_tied_ranks():
    rankings = rankings_frame(
        [
            ("p1", "ann", "response_a", 1), ("p1", "ann", "response_b", 2),
            ("p1", "bob", "response_a", 2), ("p1", "bob", "response_b", 1),
            ("p1", "cat", "response_a", 1), ("p1", "cat", "response_b", 1),  # a tie inside one ranking
            ("p2", "ann", "response_a", 2), ("p2", "ann", "response_b", 1),
            ("p2", "bob", "response_a", 2), ("p2", "bob", "response_b", 1),
            ("p2", "cat", "response_a", 1), ("p2", "cat", "response_b", 2),
        ]
    )  # fmt: skip
    answers = answers_frame([(r, u, "preference", "[]") for r in ("p1", "p2") for u in ("ann", "bob", "cat")])
    result = {row["record_id"]: row for row in aggregate_answers(answers, rankings, "ranking").to_dicts()}
    assert (result["p1"]["label_borda_a"], result["p1"]["label_borda_b"], result["p1"]["label_preference"]) == (2.0, 2.0, "tie")
    assert (result["p2"]["label_borda_a"], result["p2"]["label_borda_b"], result["p2"]["label_preference"]) == (1.0, 2.0, "b")
    alphas = agreement(answers, rankings, "ranking")
    assert set(alphas) == {"quality", "decision", "preference"}
    assert alphas["preference"] is not None and -1 <= alphas["preference"] <= 1


def test_preference_label_votes():
    answers = answers_frame(
        [("p", "ann", "preference", "response_a"), ("p", "bob", "preference", "tie"), ("p", "cat", "preference", "response_b"),
         ("q", "ann", "preference", "response_b"), ("q", "bob", "preference", "tie")]
    )  # fmt: skip
    result = {row["record_id"]: row for row in aggregate_answers(answers, rankings_frame([]), "label").to_dicts()}
    assert result["p"]["label_preference"] == "tie"
    assert (result["q"]["label_borda_a"], result["q"]["label_borda_b"], result["q"]["label_preference"]) == (0.5, 1.5, "b")


def sample_rows():
    sft = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
         "quality_score": float(i)}
        for i in range(4)
    ]  # fmt: skip
    pref = [{"prompt": f"prompt {i}", "chosen": f"chosen {i}", "rejected": f"rejected {i}", "quality_score": 1.0} for i in range(3)]
    return canonical_frame(sft + pref)


def aggregates_for(frame: pl.DataFrame, per_row: dict[int, dict]) -> pl.DataFrame:
    """An aggregate table as aggregate_answers would return it, for chosen row positions."""
    keys = with_record_keys(frame)["label_record_id"].to_list()
    rows = [{"record_id": keys[position], **values} for position, values in per_row.items()]
    return pl.DataFrame(rows, infer_schema_length=None)


def test_apply_labels_discard_correction_pairs_and_nothing_lost():
    frame = sample_rows()
    chosen_is_a = frame.select(a_is_chosen_expr()).to_series().to_list()
    prefer_rejected = "b" if chosen_is_a[5] else "a"
    prefer_chosen = "a" if chosen_is_a[4] else "b"
    aggregates = aggregates_for(
        frame,
        {
            0: {"label_n_responses": 3, "label_decision": "discard", "label_quality": 1.0},
            1: {"label_n_responses": 3, "label_decision": "keep", "label_quality": 4.0, "label_correction": "a better answer",
                "label_corrected_by": "ann"},
            2: {"label_n_responses": 1, "label_decision": "keep"},  # below min_responses
            4: {"label_n_responses": 2, "label_preference": prefer_chosen},
            5: {"label_n_responses": 2, "label_preference": prefer_rejected},
            6: {"label_n_responses": 2, "label_preference": "tie"},
        },
    )  # fmt: skip
    kept, dropped, counts = apply_labels(frame, aggregates, "label_pull", min_responses=2, insufficient="hold_back", preference_tie="drop")
    # Nothing lost: every input row is kept or dropped; the one added row is the correction pair.
    assert kept.height + dropped.height == frame.height + counts["pairs_from_corrections"]
    assert counts["pairs_from_corrections"] == 1
    reasons = dict(zip(dropped["label_record_id"], dropped["reason"]))
    keys = with_record_keys(frame)["label_record_id"].to_list()
    assert reasons == {
        keys[0]: "annotator_discard",
        keys[2]: "label_held_back",
        keys[3]: "label_held_back",  # no responses at all
        keys[6]: "label_preference_tie",
    }
    assert set(dropped["stage"]) == {"label_pull"}
    corrected = kept.filter(pl.col("label_corrected")).row(0, named=True)
    assert corrected["messages"][-1] == {"role": "assistant", "content": "a better answer", "tool_calls": None, "tool_call_id": None}
    assert corrected["label_original_response"] == "answer 1"
    assert corrected["label_source_id"] == frame["id"][1] != corrected["id"]
    pair = kept.filter(pl.col("label_origin") == "correction").row(0, named=True)
    assert pair["kind"] == "preference" and pair["messages"] is None
    assert pair["prompt"] == [{"role": "user", "content": "question 1", "tool_calls": None, "tool_call_id": None}]
    assert pair["chosen"][0]["content"] == "a better answer" and pair["rejected"][0]["content"] == "answer 1"
    swapped = kept.filter(pl.col("label_swapped")).row(0, named=True)
    assert (swapped["chosen"][0]["content"], swapped["rejected"][0]["content"]) == ("rejected 1", "chosen 1")
    unchanged = kept.filter(pl.col("label_source_id").is_null() & (pl.col("kind") == "preference")).row(0, named=True)
    assert unchanged["chosen"][0]["content"] == "chosen 0" and unchanged["id"] == frame["id"][4]
    assert counts["annotator_discard"] == 1 and counts["insufficient_responses"] == 2 and counts["swapped_preferences"] == 1
    # Original columns come first and keep their order; label columns follow.
    assert kept.columns[: len(frame.columns)] == frame.columns


@pytest.mark.parametrize("policy,kept_rows,dropped_reason", [("keep", 2, None), ("drop", 0, "label_insufficient_responses")])
def test_insufficient_policies(policy, kept_rows, dropped_reason):
    frame = sample_rows().head(2)
    kept, dropped, counts = apply_labels(frame, aggregates_for(frame, {}), "lp", min_responses=1, insufficient=policy)
    assert kept.height == kept_rows and counts["insufficient_responses"] == 2
    assert kept.height + dropped.height == 2
    if dropped_reason:
        assert set(dropped["reason"]) == {dropped_reason}
    else:
        assert kept.select("id", "messages").equals(frame.select("id", "messages"))


def test_duplicate_ids_get_distinct_record_ids_and_stable_payloads():
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    frame = canonical_frame([row, row, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    keys = with_record_keys(frame)["label_record_id"].to_list()
    assert len(set(keys)) == 3
    assert keys[0].startswith(frame["id"][0] + "-") and keys[2] == frame["id"][2]
    assert keys == with_record_keys(frame)["label_record_id"].to_list()  # deterministic
    payloads = record_payloads(with_record_keys(frame), "sft", metadata_columns(frame.schema, None), {})
    assert payloads[0]["fields"]["conversation"][1] == {"role": "assistant", "content": "hello"}
    assert payloads[0]["metadata"]["source_row"] == 1


def test_label_stages_skip_without_server(tmp_path, monkeypatch):
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    source = tmp_path / "rows.parquet"
    sample_rows().write_parquet(source)
    for stage in ("label_push", "label_pull"):
        result = run_single_stage(stage, {"dataset": "support"}, [source], tmp_path / stage)
        record = result.manifest["stages"][-1]
        assert record["report"]["skipped"] is True
        assert "ARGILLA_API_URL is not set" in record["report"]["message"]
        out = pl.read_parquet(result.run_dir / stage / "data.parquet")
        assert out.select("id", "kind").equals(sample_rows().select("id", "kind"))


def test_cli_without_server_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    source = tmp_path / "rows.parquet"
    sample_rows().write_parquet(source)
    assert main(["label", "push", str(source), "--dataset", "support"]) != 0
    assert "ARGILLA_API_URL" in capsys.readouterr().err
    monkeypatch.setenv("ARGILLA_API_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("ARGILLA_API_KEY", "some-key")
    assert main(["label", "status", "--dataset", "support"]) != 0
    err = capsys.readouterr().err
    assert "cannot reach Argilla at http://127.0.0.1:9" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_stage_config_is_validated(tmp_path, monkeypatch):
    from curate.errors import ConfigError

    source = tmp_path / "rows.parquet"
    sample_rows().write_parquet(source)
    with pytest.raises(ConfigError, match="insufficient"):
        run_single_stage("label_pull", {"dataset": "x", "insufficient": "maybe"}, [source], tmp_path / "bad")
    with pytest.raises(ConfigError, match="api_key"):
        run_single_stage("label_push", {"dataset": "x", "api_key": "secret"}, [source], tmp_path / "bad2")


def test_push_state_resumes_only_for_the_same_dataset(tmp_path):
    from curate.label.push import PushState

    path = tmp_path / "state.tsv"
    state = PushState(path, "dataset-1")
    state.record([("a", "h1"), ("b", "h2")])
    assert PushState(path, "dataset-1").sent == {"a": "h1", "b": "h2"}
    assert PushState(path, "dataset-2").sent == {}  # recreated dataset: send everything again
    assert json.loads(json.dumps(PushState(path, "dataset-2").sent)) == {}


def test_retries_back_off_on_connection_errors_and_5xx_only():
    import httpx
    from argilla._exceptions import InternalServerError, UnprocessableEntityError

    from curate.errors import ExternalServiceError
    from curate.label.client import Connection, with_retries

    connection = Connection("http://argilla.invalid", "key")
    failures = [httpx.ConnectError("refused"), InternalServerError("boom", status_code=500)]
    calls, retries = [], []

    def flaky():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "ok"

    assert with_retries(flaky, "sending", connection, max_retries=3, base_delay=0.001, on_retry=retries.append) == "ok"
    assert len(calls) == 3 and len(retries) == 2 and "retry 1/3" in retries[0]

    def refused():
        raise UnprocessableEntityError("bad value", status_code=422)

    calls.clear()
    with pytest.raises(ExternalServiceError, match="sending failed"):
        with_retries(lambda: calls.append(1) or refused(), "sending", connection, max_retries=3, base_delay=0.001)
    assert len(calls) == 1  # a 4xx is not retried

    def down():
        raise httpx.ConnectError("refused")

    with pytest.raises(ExternalServiceError, match="after 2 retries"):
        with_retries(down, "sending", connection, max_retries=2, base_delay=0.001)


# The launcher's start-up checks (curate/label/server.py), on plain Python processes: no Argilla needed.


def test_a_service_still_in_exec_is_not_taken_for_one_that_exited(tmp_path):
    """Popen returns before the kernel has finished exec (the child's /proc cmdline is still empty):
    the start-up check once read that as 'the Argilla server exited during start-up'."""
    import sys

    from curate.errors import ExternalServiceError
    from curate.label.server import free_port, spawn_service, wait_ready

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: never ready
    for _ in range(10):
        started = spawn_service([sys.executable, "-c", "import time; time.sleep(60)", "server_main.py"], tmp_path / "s.log")
        try:
            with pytest.raises(ExternalServiceError, match="was not ready within"):
                wait_ready(url, "key", timeout=0.2, started=started)
        finally:
            started.process.kill()
            started.process.wait()


@pytest.mark.parametrize(
    ("script", "cause"),
    [
        (
            (
                "import sys; print('INFO migrating'); print('sys:1: SAWarning: not in session', file=sys.stderr); "
                "raise RuntimeError('database is locked')"
            ),
            "exit code 1: RuntimeError: database is locked",
        ),
        ("import socket; s = socket.socket(); s.bind(('127.0.0.1', PORT))", "exit code 1: OSError: [Errno 98] Address already in use"),
        ("import sys; print('ERROR: bind failed'); print('shutting down'); sys.exit(3)", "exit code 3: ERROR: bind failed"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL: it wrote nothing to its log"),
    ],
    ids=["traceback", "port-in-use", "error-line", "killed"],
)
def test_a_service_that_exits_during_start_up_is_reported_with_its_cause(tmp_path, script, cause):
    import socket
    import sys

    from curate.errors import ExternalServiceError
    from curate.label.server import free_port, spawn_service, wait_ready

    log = tmp_path / "service.log"
    log.write_text("Traceback (most recent call last):\n  File 'x'\nValueError: an earlier run\nINFO an earlier run's last line\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        started = spawn_service([sys.executable, "-c", script.replace("PORT", str(busy.getsockname()[1]))], log)
        with pytest.raises(ExternalServiceError) as caught:
            wait_ready(f"http://127.0.0.1:{free_port()}", "key", timeout=60, started=started)
    message = str(caught.value)
    assert message == f"the Argilla server exited during start-up ({cause} (log: {log}))"
