"""Labeling against a real Argilla server (marked `argilla`): push → three annotators answer over HTTP
as the UI does → pull → aggregate → preference pairs; status; failure cases (server down, wrong key,
server restarted in the middle of a push); `curate label serve/stop` with a rebuilt search index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import requests

from curate.cli import main
from curate.records import canonical_frame
from curate.runner import run_single_stage
from argilla_fixtures import ArgillaTestServer, argilla_env, argilla_server, create_annotators  # noqa: F401 (fixtures)

pytestmark = pytest.mark.argilla

REPO = Path(__file__).resolve().parents[1]


def conversation(tag: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": f"[{tag}] my router keeps rebooting, what can I do?"},
                         {"role": "assistant", "content": reply}], "quality_score": 0.5, "lang": "en"}  # fmt: skip


def pair(tag: str, chosen: str, rejected: str) -> dict:
    return {"prompt": f"[{tag}] how do I reset my password?", "chosen": chosen, "rejected": rejected, "quality_score": 0.7, "lang": "en"}


def labeling_rows() -> pl.DataFrame:
    return canonical_frame(
        [
            conversation("sft-good", "Unplug it for 30 seconds, then update the firmware."),
            conversation("sft-bad", "idk lol"),
            conversation("sft-split", "Try turning it off and on."),
            conversation("sft-tie", "Check the power supply."),
            conversation("sft-fix", "Buy a new one."),
            conversation("sft-lonely", "Call support."),
            pair("pref-agree", "PREFERRED: use the 'forgot password' link.", "no idea"),
            pair("pref-swap", "just guess it", "PREFERRED: open settings, then security, then reset."),
            pair("pref-tie", "PREFERRED-ish: ask your admin.", "PREFERRED-ish: use the reset link."),
            pair("pref-junk", "asdf", "qwerty"),
        ]
    )


def tag_of(record: dict) -> str:
    fields = record["fields"]
    text = (fields.get("conversation") or fields.get("prompt"))[0]["content"]
    return text[1 : text.index("]")]


def ranking(first: str, second: str, tie: bool = False) -> list[dict]:
    return [{"value": first, "rank": 1}, {"value": second, "rank": 1 if tie else 2}]


def preferred_slot(record: dict) -> tuple[str, str]:
    fields = record["fields"]
    if fields["response_a"].startswith("PREFERRED:"):
        return "response_a", "response_b"
    return "response_b", "response_a"


def annotate(annotator, index: int, sft_id: str, pref_id: str) -> None:
    """What annotator number `index` (0, 1, 2) answers, decided from what the UI shows them."""
    for record in annotator.pending_queue(sft_id):
        tag = tag_of(record)
        answers = {
            "sft-good": {"quality": [5, 4, 4][index], "decision": "keep"},
            "sft-bad": {"quality": 1, "decision": ["discard", "discard", "keep"][index]},
            "sft-split": {"quality": 3, "decision": ["discard", "keep", "keep"][index]},
            "sft-tie": {"quality": 3, "decision": ["discard", "keep", None][index]},
            "sft-fix": {"quality": 2, "decision": "keep", "corrected_response": ["Restart it, then update the firmware.",
                        "Restart it, then update the firmware. ", None][index]},  # fmt: skip
            "sft-lonely": {"quality": 4, "decision": ["keep", None, None][index]},
        }[tag]
        if answers["decision"] is None:
            continue  # this annotator skips the record
        annotator.submit(record["id"], {k: v for k, v in answers.items() if v is not None})
    for record in annotator.pending_queue(pref_id):
        tag = tag_of(record)
        better, worse = preferred_slot(record)
        if tag == "pref-tie":
            values = {"preference": [ranking("response_a", "response_b"), ranking("response_b", "response_a"),
                                     ranking("response_a", "response_b", tie=True)][index], "quality": 3}  # fmt: skip
        elif tag == "pref-junk":
            values = {"preference": ranking(better, worse), "quality": 1, "decision": ["discard", "discard", "keep"][index]}
        else:
            values = {"preference": ranking(better, worse), "quality": 4}
        annotator.submit(record["id"], values)


def owner_records(server, dataset_name: str) -> list[dict]:
    headers = server.headers()
    datasets = requests.get(f"{server.url}/api/v1/me/datasets", headers=headers, timeout=30).json()["items"]
    dataset_id = next(item["id"] for item in datasets if item["name"] == dataset_name)
    records, offset = [], 0
    while True:
        page = requests.get(
            f"{server.url}/api/v1/datasets/{dataset_id}/records", headers=headers, params={"offset": offset, "limit": 1000}, timeout=30
        ).json()["items"]
        records += page
        offset += len(page)
        if len(page) < 1000:
            return records


def test_push_annotate_pull_aggregate_into_preference_pairs(argilla_env, tmp_path, capsys):
    server = argilla_env
    rows = labeling_rows()
    data = tmp_path / "filtered" / "data.parquet"
    data.parent.mkdir()
    rows.write_parquet(data)
    push = ["label", "push", str(data), "--dataset", "flow", "--min-submitted", "3", "--suggest", "quality=quality_score",
            "--preference-question", "ranking"]  # fmt: skip
    assert main(push) == 0
    assert main(push) == 0  # a second push changes nothing and duplicates nothing
    assert sorted(r["external_id"] for r in owner_records(server, "flow-sft")) == sorted(rows.filter(pl.col("kind") == "sft")["id"])
    assert len(owner_records(server, "flow-pref")) == 4

    annotators = create_annotators(server, "curate", 3, prefix="flow")
    for index, annotator in enumerate(annotators):
        annotate(annotator, index, annotator.dataset_id("flow-sft"), annotator.dataset_id("flow-pref"))

    capsys.readouterr()
    assert main(["label", "status", "--dataset", "flow", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    submitted = {user.split("-")[0]: counts["submitted"] for user, counts in status["flow-sft"]["annotators"].items()}
    assert submitted == {"flow1": 6, "flow2": 5, "flow3": 4}
    assert status["flow-pref"]["completed"] == 4 and status["flow-pref"]["total"] == 4

    out = tmp_path / "labeled"
    pull = ["label", "pull", str(data), "--dataset", "flow", "--out", str(out), "--min-responses", "2",
            "--insufficient", "hold_back", "--quiet"]  # fmt: skip
    assert main(pull) == 0
    kept = pl.read_parquet(out / "label_pull" / "data.parquet")
    dropped = pl.read_parquet(out / "label_pull" / "dropped.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    report = manifest["stages"][-1]["report"]

    def tag(row) -> str:
        text = (row["messages"] or row["prompt"])[0]["content"]
        return text[1 : text.index("]")]

    reasons = {tag(row): row["reason"] for row in dropped.iter_rows(named=True)}
    assert reasons == {"sft-bad": "annotator_discard", "sft-lonely": "label_held_back", "pref-junk": "annotator_discard"}
    assert kept.height + dropped.height == rows.height + 1  # one pair added from the correction
    by_tag = {}
    for row in kept.iter_rows(named=True):
        by_tag.setdefault((tag(row), row["label_origin"]), row)
    assert by_tag[("sft-good", "pushed")]["label_quality"] == 4.0
    assert by_tag[("sft-split", "pushed")]["label_decision"] == "keep"
    assert by_tag[("sft-tie", "pushed")]["label_decision"] == "keep"  # 1 vs 1: a tie keeps the row
    fixed = by_tag[("sft-fix", "pushed")]
    assert fixed["messages"][-1]["content"] == "Restart it, then update the firmware."
    assert fixed["label_original_response"] == "Buy a new one." and fixed["label_source_id"] != fixed["id"]

    pairs = kept.filter(pl.col("kind") == "preference")
    chosen = {(tag(row), row["label_origin"]): (row["chosen"][0]["content"], row["rejected"][0]["content"]) for row in pairs.iter_rows(named=True)}
    assert chosen[("pref-agree", "pushed")][0].startswith("PREFERRED:")
    assert chosen[("pref-swap", "pushed")] == ("PREFERRED: open settings, then security, then reset.", "just guess it")
    assert chosen[("pref-tie", "pushed")][0] == "PREFERRED-ish: ask your admin."  # tie: original order kept
    assert chosen[("sft-fix", "correction")] == ("Restart it, then update the firmware.", "Buy a new one.")
    assert report["swapped_preferences"] == 1 and report["preference_ties"] == 1 and report["pairs_from_corrections"] == 1
    alphas = report["datasets"]["flow-sft"]["agreement_krippendorff_alpha"]
    assert set(alphas) == {"quality", "decision"} and all(a is None or -1 <= a <= 1 for a in alphas.values())
    assert report["datasets"]["flow-pref"]["annotators"] == 3
    assert set(report["datasets"]["flow-pref"]["agreement_krippendorff_alpha"]) == {"quality", "decision", "preference"}


def test_wrong_api_key_is_a_clear_error(argilla_server, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.parquet"
    labeling_rows().write_parquet(data)
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", "not-a-valid-key")
    assert main(["label", "push", str(data), "--dataset", "wrongkey"]) != 0
    err = capsys.readouterr().err
    assert "rejected the API key" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_server_down_is_a_clear_error_with_nonzero_exit(argilla_server, tmp_path):
    from curate.label.server import free_port

    data = tmp_path / "data.parquet"
    labeling_rows().write_parquet(data)
    env = {**os.environ, "ARGILLA_API_URL": f"http://127.0.0.1:{free_port()}", "ARGILLA_API_KEY": argilla_server.api_key}
    result = subprocess.run(
        [sys.executable, "-m", "curate.cli", "label", "push", str(data), "--dataset", "down"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "cannot reach Argilla" in result.stderr and "Traceback" not in result.stderr


def test_server_restarted_in_the_middle_of_a_push(argilla_server, tmp_path):
    from curate.label.server import start_server, stop_server

    rows = canonical_frame([conversation(f"bulk-{i}", f"Reply number {i}.") for i in range(200)])
    data = tmp_path / "data.parquet"
    rows.write_parquet(data)
    state = tmp_path / "state"
    env = {**os.environ, "ARGILLA_API_URL": argilla_server.url, "ARGILLA_API_KEY": argilla_server.api_key}
    command = [sys.executable, "-m", "curate.cli", "label", "push", str(data), "--dataset", "restart",
               "--batch-size", "20", "--max-retries", "0", "--state-dir", str(state), "--metadata", "quality_score"]  # fmt: skip
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state_file = state / "restart-sft.pushed.tsv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state_file.exists() and len(state_file.read_text().splitlines()) > 20:
            break
        time.sleep(0.02)
    stop_server(argilla_server.home, services=False)  # the web server dies; Redis and the index stay
    _, err = first.communicate(timeout=120)
    sent_before = len(state_file.read_text().splitlines()) - 1
    assert first.returncode != 0, "the push finished before the server went down: make the test bigger"
    assert "Argilla at" in err and "Traceback" not in err
    assert 20 <= sent_before < 200
    start_server(argilla_server.home)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    records = owner_records(argilla_server, "restart-sft")
    external = [record["external_id"] for record in records]
    assert len(external) == len(set(external)) == 200  # nothing lost, nothing duplicated
    assert set(external) == set(rows["id"])
    assert len(state_file.read_text().splitlines()) - 1 == 200  # the rerun sent only what was missing
    # A changed score re-sends only the changed rows, and updates them in place.
    rows.with_columns(pl.when(pl.int_range(pl.len()) < 5).then(0.9).otherwise(pl.col("quality_score")).alias("quality_score")).write_parquet(data)
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert len(state_file.read_text().splitlines()) - 1 == 205
    records = owner_records(argilla_server, "restart-sft")
    assert len(records) == 200
    updated = {record["external_id"] for record in records if record["metadata"].get("quality_score") == 0.9}
    assert updated == set(rows["id"].head(5))


def test_serve_and_stop_rebuild_the_search_index(tmp_path, capsys, monkeypatch):
    """`curate label serve` on its own home; after stop + serve the emulator's index is rebuilt from
    the database, so an annotator's queue (a search) still holds the records."""
    from curate.label.server import server_processes

    home = tmp_path / "home"
    try:
        assert main(["label", "serve", "--home", str(home)]) == 0
        assert server_processes(home) == {"argilla": True, "osmem-server": True, "redis-server": True}
        out = capsys.readouterr().out
        owner = json.loads((home / "owner.json").read_text())
        assert owner["url"] in out and str(home / "owner.json") in out and owner["api_key"] not in out
        assert (home / "owner.json").stat().st_mode & 0o077 == 0
        server = ArgillaTestServer(owner["url"], owner["api_key"], home)
        data = tmp_path / "data.parquet"
        labeling_rows().write_parquet(data)
        # Through the pipeline stage, with the key in a variable named by the config.
        monkeypatch.setenv("SERVED_ARGILLA_KEY", server.api_key)
        monkeypatch.delenv("ARGILLA_API_URL", raising=False)
        config = {"dataset": "served", "min_submitted": 1, "api_url": server.url, "api_key_env": "SERVED_ARGILLA_KEY"}
        result = run_single_stage("label_push", config, [data], tmp_path / "run")
        report = result.manifest["stages"][-1]["report"]
        assert report["skipped"] is False and report["datasets"]["served-sft"]["sent"] == 6
        assert server.api_key not in (tmp_path / "run" / "manifest.json").read_text()
        annotator = create_annotators(server, "curate", 1, prefix="served")[0]
        assert len(annotator.pending_queue(annotator.dataset_id("served-sft"))) == 6
        assert main(["label", "stop", "--home", str(home)]) == 0
        assert "argilla, osmem-server, redis-server" in capsys.readouterr().out
        assert server_processes(home) == {"argilla": False, "osmem-server": False, "redis-server": False}
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.url}/api/v1/me", timeout=5)
        assert main(["label", "serve", "--home", str(home)]) == 0
        owner = json.loads((home / "owner.json").read_text())
        annotator.url = owner["url"]
        queue = annotator.pending_queue(annotator.dataset_id("served-sft"))
        assert len(queue) == 6
        annotator.submit(queue[0]["id"], {"quality": 4, "decision": "keep"})
        assert len(annotator.pending_queue(annotator.dataset_id("served-sft"))) == 5
    finally:
        main(["label", "stop", "--home", str(home)])


def test_serve_names_why_the_server_could_not_start(tmp_path, capsys):
    """The one-line error gives the exit status and the exception of this start, not the log's tail."""
    from curate.label.server import claim_server_home

    home = claim_server_home(tmp_path / "home")  # a home of ours (a user's folder is refused before start-up)
    (home / "logs").mkdir(parents=True)
    (home / "logs" / "argilla.log").write_text("INFO an earlier run\nsys:1: SAWarning: an earlier run's noise\n")
    (home / "argilla.db").mkdir()  # the database path is taken by a directory
    try:
        assert main(["label", "serve", "--home", str(home)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: the Argilla server exited during start-up (exit code 1: ")
        assert "OperationalError" in err and "unable to open database file" in err and "earlier run" not in err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    finally:
        main(["label", "stop", "--home", str(home)])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_web_ui_shows_a_pushed_dataset(argilla_server, tmp_path):
    """Headless chromium signs in as the owner and opens the annotation page of a pushed dataset."""
    from curate.label.client import Connection
    from curate.label.push import PushOptions, push_frame
    from curate.label.server import server_venv

    rows = canonical_frame([conversation("ui", "Hold the reset button for ten seconds.")])
    report = push_frame(rows, Connection(argilla_server.url, argilla_server.api_key), PushOptions(dataset="ui", min_submitted=1))
    dataset_id = report["datasets"]["ui-sft"]["dataset_id"]
    owner = json.loads((argilla_server.home / "owner.json").read_text())
    screenshot = tmp_path / "annotation.png"
    expected = ("ui-sft", "my router keeps rebooting", "Hold the reset button for ten seconds.",
                "Quality of the assistant's replies", "Keep for training?")  # fmt: skip
    result = subprocess.run(
        [str(server_venv() / "bin" / "python"), str(Path(__file__).with_name("argilla_ui_check.py")), argilla_server.url,
         owner["username"], owner["password"], dataset_id, str(screenshot), *expected],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    page = json.loads(result.stdout)
    assert page["path"] == f"/dataset/{dataset_id}/annotation-mode"
    for shown in expected:
        assert shown in page["text"]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
