"""Secrets and local services: credentials in URLs never reach the manifest, `_SUCCESS.json` or stdout;
secret files are private from their first byte; a dataset name never becomes a path outside the
state folder. The offline parts need no server; one test uses a real Redis with a password, one a real
local Argilla (slow, marked)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.cli import main
from safety.redact import redact, redact_value

SECRET = "s3cretpw"


def write_rows(path: Path, count: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Question number {i} about billing", "output": f"A long enough answer number {i}."} for i in range(count)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


def write_pipeline(folder: Path, stages: list) -> Path:
    pipeline = {"name": "t", "run_dir": "out", "inputs": [{"path": "in/a.jsonl"}], "stages": stages}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline), encoding="utf-8")
    return path


def files_text(folder: Path) -> str:
    """Every JSON, HTML and Markdown file the run wrote, concatenated."""
    return "".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*")) if p.suffix in (".json", ".html", ".md"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------ redaction


@pytest.mark.parametrize(
    "text, hidden, kept",
    [
        ("http://user:s3cretpw@127.0.0.1:6900/api", "s3cretpw", "http://***@127.0.0.1:6900/api"),
        ("redis://:s3cretpw@localhost:6379/0", "s3cretpw", "redis://***@localhost:6379/0"),
        ("cannot reach https://tok_s3cretpw@h.example.com (ConnectionError)", "s3cretpw", "https://***@h.example.com"),
        ("http://h/x?api_key=s3cretpw&page=2", "s3cretpw", "http://h/x?api_key=***&page=2"),
        ("https://h/?token=s3cretpw", "s3cretpw", "https://h/?token=***"),
        ("admin:s3cretpw@redis.internal", "s3cretpw", "***@redis.internal"),
    ],
)
def test_redact_removes_credentials_and_keeps_the_server(text, hidden, kept):
    assert hidden not in redact(text) and kept in redact(text)


def test_redact_leaves_ordinary_text_alone():
    for text in ("http://127.0.0.1:6900", "mail support@example.com", "raw/a.jsonl:3", "ARGILLA_API_KEY"):
        assert redact(text) == text
    assert redact_value({"api_key_env": "ARGILLA_API_KEY", "api_key": SECRET, "n": 3}) == {
        "api_key_env": "ARGILLA_API_KEY", "api_key": "***", "n": 3,
    }  # fmt: skip


def test_label_stage_url_with_credentials_is_redacted_in_the_error(tmp_path, monkeypatch, capsys):
    write_rows(tmp_path / "in" / "a.jsonl")
    monkeypatch.setenv("ARGILLA_API_KEY", "key")
    url = f"http://user:{SECRET}@127.0.0.1:9"  # the discard port: nothing answers
    pipeline = write_pipeline(tmp_path, [{"type": "label_push", "config": {"dataset": "d", "api_url": url, "max_retries": 0}}])
    assert main(["run", str(pipeline), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.err + captured.out
    assert "http://***@127.0.0.1:9" in captured.err and "Traceback" not in captured.err
    assert SECRET not in files_text(tmp_path / "out")


# ------------------------------------------------------------------------------------ Redis with a password


@pytest.fixture
def redis_with_password(tmp_path):
    redis = pytest.importorskip("redis", reason="the redis Python package is not installed")
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(tmp_path), "--requirepass", SECRET]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=SECRET)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        yield port, client
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.redis
def test_redis_index_url_credentials_never_persisted_or_printed(tmp_path, redis_with_password, capsys):
    port, client = redis_with_password
    write_rows(tmp_path / "in" / "a.jsonl")

    def run(password: str) -> dict:
        url = f"redis://default:{password}@127.0.0.1:{port}/0"
        pipeline = write_pipeline(tmp_path, [{"type": "dedup", "config": {"redis": {"url": url, "basename": "t"}}}])
        assert main(["run", str(pipeline), "--quiet"]) == 0
        captured = capsys.readouterr()
        assert password not in captured.out + captured.err
        text = files_text(tmp_path / "out")
        assert password not in text and f"redis://default:***@" not in text
        assert f"redis://***@127.0.0.1:{port}/0" in (tmp_path / "out" / "manifest.json").read_text()
        assert password not in (tmp_path / "out" / "dedup" / "_SUCCESS.json").read_text()
        return json.loads((tmp_path / "out" / "manifest.json").read_text())

    first = run(SECRET)
    # A new password is a new config: the stage runs again (the fingerprint hashes the real URL) although
    # the persisted, redacted configs of both runs are identical.
    client.config_set("requirepass", "0ther-pw")
    second = run("0ther-pw")
    stage = {s["name"]: s for s in second["stages"]}["dedup"]
    assert stage["skipped"] is False
    assert first["pipeline"]["config"] == second["pipeline"]["config"]
    assert first["pipeline"]["config_hash"] != second["pipeline"]["config_hash"]


# ------------------------------------------------------------------------------------ dataset names


@pytest.mark.parametrize("name", ["../../x", "..", ".hidden", "a/b", "/abs", ""])
@pytest.mark.parametrize("verb", ["push", "pull", "status"])
def test_dataset_name_that_is_a_path_is_refused_before_anything(tmp_path, monkeypatch, capsys, name, verb):
    monkeypatch.setenv("ARGILLA_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("ARGILLA_API_KEY", "key")
    data = tmp_path / "work" / "data.parquet"
    data.parent.mkdir()
    pl.DataFrame({"id": ["a"]}).write_parquet(data)
    state = tmp_path / "work" / "state"
    argv = {
        "push": ["label", "push", str(data), "--dataset", name, "--state-dir", str(state)],
        "pull": ["label", "pull", str(data), "--dataset", name, "--out", str(tmp_path / "work" / "out")],
        "status": ["label", "status", "--dataset", name],
    }[verb]
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset name") and err.count("\n") == 1, err
    assert sorted(tmp_path.rglob("*")) == before


def test_dataset_name_in_a_pipeline_is_refused(tmp_path, capsys):
    write_rows(tmp_path / "in" / "a.jsonl")
    pipeline = write_pipeline(tmp_path, [{"type": "label_push", "config": {"dataset": "../../x"}}])
    assert main(["run", str(pipeline), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "config.dataset" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ secret files


_WATCHED: list[tuple[str, tuple]] = []
_WATCH_ROOT: list[str] = []


def _audit(event: str, args: tuple) -> None:
    # Audit hooks stay installed for the process: inert unless a test set a root to watch.
    if _WATCH_ROOT and event in ("os.chmod", "open") and str(args[0]).startswith(_WATCH_ROOT[0]):
        _WATCHED.append((event, args))


sys.addaudithook(_audit)


def test_owner_file_is_private_from_its_first_byte(tmp_path):
    """With umask 000 (the worst case), owner.json and its folder are never readable by others: created
    0600/0700 and never chmod-ed to anything wider (a chmod to 0600 after the write leaves a window)."""
    from curate.label.server import OWNER_FILE, _owner

    home = tmp_path / "home"
    old_umask = os.umask(0)
    _WATCH_ROOT.append(str(home))
    try:
        from safety.secret_files import private_dir

        owner = _owner(private_dir(home))
    finally:
        _WATCH_ROOT.clear()
        os.umask(old_umask)
    assert set(owner) == {"username", "password", "api_key"}
    assert mode(home) == 0o700 and mode(home / OWNER_FILE) == 0o600
    widened = [(event, args) for event, args in _WATCHED if event == "os.chmod" and args[1] & 0o077]
    assert not widened, widened
    # Every file opened in the home for writing was created exclusively (mkstemp/os.open with a mode),
    # never by open(path, "w"), which creates 0666 & ~umask.
    plain_writes = [args for event, args in _WATCHED if event == "open" and isinstance(args[1], str) and set(args[1]) & set("wax")]
    assert not plain_writes, plain_writes
    assert json.loads((home / OWNER_FILE).read_text()) == owner


@pytest.mark.argilla
def test_argilla_database_and_owner_file_are_private(tmp_path, monkeypatch, capsys):
    """One real server start in a home that does not exist yet: the home is 0700, owner.json and
    argilla.db (which holds the owner's API key) and the database's journals are 0600; a label stage
    whose URL carries user:password@ pushes, and the password is in no output."""
    from curate.label.server import start_server, stop_server

    home = tmp_path / "argilla-home"
    old_umask = os.umask(0o022)  # the usual umask: a file created without care would be 0644
    try:
        info = start_server(home, timeout=240)
    finally:
        os.umask(old_umask)
    try:
        assert mode(home) == 0o700
        assert mode(info.owner_file) == 0o600
        databases = sorted(home.glob("argilla.db*"))
        assert databases and all(mode(p) == 0o600 for p in databases), [(p.name, oct(mode(p))) for p in databases]

        write_rows(tmp_path / "in" / "a.jsonl")
        url = info.url.replace("http://", f"http://user:{SECRET}@")
        monkeypatch.setenv("ARGILLA_API_KEY", info.api_key)
        pipeline = write_pipeline(tmp_path, [{"type": "label_push", "config": {"dataset": "secrets-test", "api_url": url}}])
        assert main(["run", str(pipeline), "--quiet"]) == 0, capsys.readouterr().err
        captured = capsys.readouterr()
        assert SECRET not in captured.out + captured.err
        outputs = files_text(tmp_path / "out")
        assert SECRET not in outputs and "http://***@127.0.0.1" in outputs
    finally:
        stop_server(home)
