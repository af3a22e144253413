"""Annotators against a real Argilla server (marked `argilla`, session server shared with
test_label_argilla.py): `curate label users add` prints the new annotator's credentials once and they
work; the default A/B/Tie preference question round trip push → annotate over HTTP → pull → aggregate,
with guidelines from a Markdown file and only the asked-for metadata on the records."""

from __future__ import annotations

import polars as pl
import pytest
import requests

from curate.cli import main
from curate.records import canonical_frame
from argilla_fixtures import Annotator, argilla_env, argilla_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.argilla


def add_user(name: str, capsys) -> dict[str, str]:
    """`curate label users add NAME`; the printed `key: value` lines."""
    capsys.readouterr()
    assert main(["label", "users", "add", name]) == 0
    out = capsys.readouterr().out
    return dict(line.split(": ", 1) for line in out.strip().splitlines())


def test_users_add_prints_working_credentials_once(argilla_env, capsys, tmp_path, monkeypatch):
    server = argilla_env
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["label", "users", "add", "ann-creds"]) == 0
    captured = capsys.readouterr()
    printed = dict(line.split(": ", 1) for line in captured.out.strip().splitlines())
    assert (printed["username"], printed["role"], printed["workspace"]) == ("ann-creds", "annotator", "curate")
    password, api_key = printed["password"], printed["api_key"]
    assert len(password) >= 16 and api_key
    assert captured.out.count(password) == 1 and captured.out.count(api_key) == 1  # shown once, on stdout only
    assert password not in captured.err and api_key not in captured.err and "shown once" in captured.err
    assert not list(tmp_path.iterdir())  # nothing written where the command ran
    # The API key authenticates as the new annotator, who belongs to the workspace.
    me = requests.get(f"{server.url}/api/v1/me", headers={"X-Argilla-Api-Key": api_key}, timeout=30)
    assert me.status_code == 200 and (me.json()["username"], me.json()["role"]) == ("ann-creds", "annotator")
    workspaces = requests.get(f"{server.url}/api/v1/me/workspaces", headers={"X-Argilla-Api-Key": api_key}, timeout=30)
    assert [item["name"] for item in workspaces.json()["items"]] == ["curate"]
    # So does the password (the UI's sign-in form posts to /api/v1/token).
    token = requests.post(f"{server.url}/api/v1/token", data={"username": "ann-creds", "password": password}, timeout=30)
    assert token.status_code == 201, token.text
    bearer = {"Authorization": f"Bearer {token.json()['access_token']}"}
    assert requests.get(f"{server.url}/api/v1/me", headers=bearer, timeout=30).json()["username"] == "ann-creds"
    # Listing shows the user, never a key or password.
    assert main(["label", "users", "list"]) == 0
    listing = capsys.readouterr().out
    assert "ann-creds" in listing and "annotator" in listing and api_key not in listing and password not in listing
    assert server.api_key not in listing
    # The same name again is a one-line error; the first user's credentials are untouched.
    assert main(["label", "users", "add", "ann-creds"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and len(err.splitlines()) == 1
    assert requests.get(f"{server.url}/api/v1/me", headers={"X-Argilla-Api-Key": api_key}, timeout=30).status_code == 200


def preference_rows() -> pl.DataFrame:
    rows = [
        {"prompt": "[agree] How do I reset my password?", "chosen": "GOOD: use the 'forgot password' link.", "rejected": "no idea"},
        {"prompt": "[swap] How do I change my email?", "chosen": "just guess", "rejected": "GOOD: open settings, then account."},
        {"prompt": "[tie] Which plan should I pick?", "chosen": "The basic plan.", "rejected": "The pro plan."},
        {"prompt": "[swap2] How do I export my data?", "chosen": "you cannot", "rejected": "GOOD: settings, privacy, export."},
    ]
    frame = canonical_frame(rows)
    return frame.with_columns(pl.lit("en").alias("lang"), pl.lit(0.5).alias("quality_score"))


def test_a_b_question_round_trip_with_guidelines_and_chosen_metadata(argilla_env, capsys, tmp_path):
    server = argilla_env
    rows = preference_rows()
    data = tmp_path / "filtered" / "data.parquet"
    data.parent.mkdir()
    rows.write_parquet(data)
    guide = tmp_path / "guidelines.md"
    guide.write_text("# Support answers\n\nPrefer the answer that **solves** the problem. Tie when neither does.\n")
    assert main(["label", "push", str(data), "--dataset", "ab", "--min-submitted", "2", "--guidelines", str(guide)]) == 0

    owner = server.headers()
    datasets = requests.get(f"{server.url}/api/v1/me/datasets", headers=owner, timeout=30).json()["items"]
    dataset = next(item for item in datasets if item["name"] == "ab-pref")
    assert dataset["guidelines"] == guide.read_text()
    questions = requests.get(f"{server.url}/api/v1/datasets/{dataset['id']}/questions", headers=owner, timeout=30).json()["items"]
    preference = next(item for item in questions if item["name"] == "preference")
    assert preference["title"] == "Which answer is better?" and preference["settings"]["type"] == "label_selection"
    assert [(o["value"], o["text"]) for o in preference["settings"]["options"]][:2] == [("response_a", "A"), ("response_b", "B")]
    assert next(item for item in questions if item["name"] == "quality")["required"] is False
    records = requests.get(f"{server.url}/api/v1/datasets/{dataset['id']}/records", headers=owner, timeout=30).json()["items"]
    assert all(set(record["metadata"]) == {"source_file", "source_row", "lang"} for record in records)  # no scores
    # Edited guidelines reach the existing dataset on the next push.
    guide.write_text("# Support answers\n\nPrefer the answer that solves the problem; Tie when neither does.\n")
    assert main(["label", "push", str(data), "--dataset", "ab", "--min-submitted", "2", "--guidelines", str(guide)]) == 0
    again = requests.get(f"{server.url}/api/v1/datasets/{dataset['id']}", headers=owner, timeout=30).json()
    assert again["guidelines"] == guide.read_text()

    annotators = []
    for name in ("ab-ann1", "ab-ann2"):
        printed = add_user(name, capsys)
        annotators.append(Annotator(username=name, api_key=printed["api_key"], url=server.url))
    for index, annotator in enumerate(annotators):
        for record in annotator.pending_queue(annotator.dataset_id("ab-pref")):
            fields = record["fields"]
            tag = fields["prompt"][0]["content"].split("]")[0][1:]
            good = "response_a" if fields["response_a"].startswith("GOOD:") else "response_b"
            if tag == "tie":
                values = {"preference": "tie"}
            elif tag == "swap2" and index == 1:
                values = {"preference": good, "quality": 4}  # the optional rating, answered by one annotator
            else:
                values = {"preference": good}
            annotator.submit(record["id"], values)

    out = tmp_path / "labeled"
    assert main(["label", "pull", str(data), "--dataset", "ab", "--out", str(out), "--min-responses", "2", "--quiet"]) == 0
    kept = pl.read_parquet(out / "label_pull" / "data.parquet")
    assert kept.height == rows.height
    pairs = {row["prompt"][0]["content"].split("]")[0][1:]: row for row in kept.iter_rows(named=True)}
    for tag in ("agree", "swap", "swap2"):
        assert pairs[tag]["chosen"][0]["content"].startswith("GOOD:"), tag
        assert not pairs[tag]["rejected"][0]["content"].startswith("GOOD:"), tag
    assert [pairs[tag]["label_swapped"] for tag in ("agree", "swap", "swap2", "tie")] == [False, True, True, False]
    assert pairs["tie"]["label_preference"] == "tie" and pairs["tie"]["chosen"][0]["content"] == "The basic plan."
    assert pairs["swap2"]["label_quality"] == 4.0 and pairs["agree"]["label_quality"] is None
    original = {row["prompt"][0]["content"]: row["id"] for row in rows.iter_rows(named=True)}
    assert pairs["swap"]["label_source_id"] == original["[swap] How do I change my email?"] != pairs["swap"]["id"]
