"""The tools never remove or overwrite what they did not create (issue 11, class 1), a run dir describes
one run only (class 4), one run at a time per output folder (class 5), and a killed run's temp files are
cleaned by the next (class 11). Everything goes through the CLIs on real folders; "untouched" is checked
against a full listing with hashes of every file before and after."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.cli import main as curate_main
from safety.ownership import MARKER

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones too) with a hash of its bytes, or what it is."""
    listing = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            listing[key] = "link -> " + os.readlink(path)
        elif path.is_dir():
            listing[key] = "dir"
        else:
            listing[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return listing


def write_project(folder: Path, run_dir: str = "out", stages: list | None = None) -> Path:
    """Raw inputs in data/, a pipeline file, and a user's own manifest.json and notes beside them."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Question {i} about billing", "output": "Short." if i % 3 == 0 else f"A long enough answer {i}."} for i in range(24)]
    pairs = [{"prompt": f"Refund {i}?", "chosen": f"Yes, within {i + 20} days of purchase.", "rejected": "No."} for i in range(6)]
    (folder / "data" / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "data" / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pairs) + "\n")
    (folder / "manifest.json").write_text('{"mine": "a manifest the user wrote"}\n')
    (folder / "data" / "manifest.json").write_text('{"mine": true}\n')
    return write_pipeline(folder, run_dir, stages)


def write_pipeline(folder: Path, run_dir: str = "out", stages: list | None = None) -> Path:
    pipeline = {
        "name": "t",
        "run_dir": run_dir,
        "inputs": [{"path": "data/*.jsonl"}],
        "stages": stages if stages is not None else [{"name": "length", "type": "stage_plugins:min_length", "config": {"min_chars": 10}}],
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------ class 1: never destroy


@pytest.mark.parametrize("run_dir", [".", "..", "data", "notes", "linked"])
def test_clean_refuses_folders_the_tool_did_not_create_and_touches_nothing(tmp_path, monkeypatch, capsys, run_dir):
    project = tmp_path / "project"
    pipeline = write_project(project, run_dir=run_dir)
    (project / "notes").mkdir()
    (project / "notes" / "manifest.json").write_text("{}\n")  # merely holding one made the old --clean delete it
    (project / "notes" / "ingest").mkdir()
    (project / "notes" / "plan.txt").write_text("my plan\n")
    (project / "linked").symlink_to(project / "notes", target_is_directory=True)
    (tmp_path / "sibling.txt").write_text("next to the project\n")
    monkeypatch.chdir(project)
    before = snapshot(tmp_path)
    code = curate_main(["run", str(pipeline), "--clean", "--quiet"])
    assert code == 2
    err = one_line_error(capsys)
    assert "curate" in err and ("choose" in err.lower() or "Choose" in err)
    assert snapshot(tmp_path) == before


def test_clean_of_a_folder_holding_the_pipeline_is_refused_from_anywhere(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    pipeline = write_project(project / "sub", run_dir="..")  # the folder above the pipeline file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = snapshot(tmp_path)
    assert curate_main(["run", str(pipeline), "--clean", "--quiet"]) == 2
    assert "holds" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


def test_home_folder_is_never_an_output(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    write_project(project)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    before = snapshot(tmp_path)
    assert curate_main(["ingest", "data/chats.jsonl", "--out", str(home)]) == 2
    assert "home folder" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


def test_a_run_into_a_non_run_folder_leaves_its_manifest_and_report_alone(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    write_project(project)
    other = project / "results"
    other.mkdir()
    (other / "manifest.json").write_text('{"quarterly": "numbers"}\n')
    (other / "report.html").write_text("<p>my report</p>\n")
    monkeypatch.chdir(project)
    before = snapshot(tmp_path)
    assert curate_main(["ingest", "data/chats.jsonl", "--out", "results"]) == 2
    err = one_line_error(capsys)
    assert "results" in err and "not created by curate" in err
    assert snapshot(tmp_path) == before
    # `curate report` does not overwrite a report.html it did not write either.
    assert curate_main(["report", "results", "--out", "results/report.html"]) == 2
    one_line_error(capsys)
    assert snapshot(tmp_path) == before


def test_clean_of_our_run_dir_removes_only_what_we_recorded(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    pipeline = write_project(project)
    monkeypatch.chdir(project)
    assert curate_main(["run", str(pipeline), "--quiet"]) == 0
    run = project / "out"
    assert json.loads((run / MARKER).read_text())["tool"] == "curate"
    (run / "my-notes.txt").write_text("not curate's\n")
    (run / "length" / "data.parquet").write_bytes(b"to be rebuilt")
    outside = snapshot(project / "data")
    assert curate_main(["run", str(pipeline), "--clean", "--quiet"]) == 0
    assert (run / "my-notes.txt").read_text() == "not curate's\n"
    assert pl.read_parquet(run / "length" / "data.parquet").height == json.loads((run / "manifest.json").read_text())["accounting"]["kept"]
    assert snapshot(project / "data") == outside
    assert (project / "manifest.json").read_text() == '{"mine": "a manifest the user wrote"}\n'


def test_a_link_in_place_of_an_output_is_never_written_through(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    pipeline = write_project(project)
    monkeypatch.chdir(project)
    assert curate_main(["run", str(pipeline), "--quiet"]) == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.parquet").write_bytes(b"the user's own file")
    run = project / "out"
    for path in sorted((run / "length").iterdir()):
        path.unlink()
    (run / "length").rmdir()
    (run / "length").symlink_to(precious, target_is_directory=True)
    before = snapshot(tmp_path)
    assert curate_main(["run", str(pipeline), "--quiet", "--force"]) == 2
    assert "is a link" in one_line_error(capsys)
    assert snapshot(tmp_path) == before
    # --clean removes the link (ours, recorded), never what it points to, and the run goes on.
    assert curate_main(["run", str(pipeline), "--quiet", "--clean"]) == 0
    assert not (run / "length").is_symlink() and (run / "length" / "data.parquet").is_file()
    assert (precious / "data.parquet").read_bytes() == b"the user's own file"


def test_a_user_folder_where_an_export_goes_is_refused_not_replaced(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    pipeline = write_project(project, stages=[{"type": "split", "config": {"min_validation_rows": 0, "min_test_rows": 0}}])
    monkeypatch.chdir(project)
    run = project / "out"
    run.mkdir()
    assert curate_main(["run", str(pipeline), "--quiet"]) == 0
    (run / "sft" / "extra.txt").write_text("dropped into curate's folder by a user\n")
    assert curate_main(["run", str(pipeline), "--quiet", "--force"]) == 2
    assert "extra.txt" in one_line_error(capsys)
    assert (run / "sft" / "extra.txt").is_file()


def test_label_serve_refuses_a_user_folder_as_home(tmp_path, capsys):
    home = tmp_path / "my-documents"
    home.mkdir()
    (home / "thesis.tex").write_text("\\section{}\n")
    before = snapshot(tmp_path)
    assert curate_main(["label", "serve", "--home", str(home)]) == 2
    assert "not created by curate" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ train outputs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from train_helpers import make_tiny_model, sft_conversations, write_sft_split

    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model")
    split = write_sft_split(root / "sft", sft_conversations(12), sft_conversations(4, offset=100))
    return {"model": model, "sft": split}


def train_args(tiny, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(tiny["model"]), "--data", str(tiny["sft"]), "--output-dir", str(out), "--max-steps", "4",
            "--max-seq-len", "128", "--set", "optim.batch_rows=2", "--set", "eval.at_end=false", "--no-progress", *extra]  # fmt: skip


def test_train_merge_out_onto_a_user_folder_is_refused(tiny, tmp_path, capsys):
    from train.cli import main as train_main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}\n")
    out = tmp_path / "my-model"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"\0" * 64)
    before = snapshot(tmp_path)
    code = train_main(["merge", "--model", str(tiny["model"]), "--data", str(tiny["sft"]), "--adapter", str(adapter), "--out", str(out)])
    assert code == 2
    assert "not created by train" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


def test_train_output_dir_must_be_ours_and_leftover_temps_are_cleaned(tiny, tmp_path, capsys):
    from train.cli import main as train_main

    user = tmp_path / "user"
    user.mkdir()
    (user / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = snapshot(user)
    assert train_main(train_args(tiny, user)) == 2
    assert "not created by train" in one_line_error(capsys)
    assert snapshot(user) == before

    out = tmp_path / "run"
    assert train_main(train_args(tiny, out, "--stop-at-step", "2")) == 0
    # What a kill -9 mid-write leaves behind; and a user's file beside our outputs.
    (out / ".adapter.tmp").mkdir()
    (out / ".adapter.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (out / "checkpoints" / ".step-000003.abcd1234.tmp").mkdir()
    (out / ".metrics.jsonl.x1y2z3w4.tmp").write_text("half\n")
    (out / ".notes.tmp").write_text("a user's file with a dotted name\n")
    capsys.readouterr()
    assert train_main(train_args(tiny, out)) == 0
    assert "resumed from step" in capsys.readouterr().out
    left = {p.name for p in out.rglob("*")}
    assert not {".adapter.tmp", ".step-000003.abcd1234.tmp", ".metrics.jsonl.x1y2z3w4.tmp"} & left
    assert (out / ".notes.tmp").read_text() == "a user's file with a dotted name\n"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ class 4: describe this run only


def exported_rows(run: Path) -> int:
    return sum(pl.read_parquet(p).height for sub in ("sft", "pref") for p in (run / sub).glob("*.parquet"))


def test_stale_stage_folders_and_exports_of_an_earlier_config_are_removed(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    split = {"name": "split", "type": "split", "config": {"min_validation_rows": 0, "min_test_rows": 0}}
    length = {"name": "length", "type": "stage_plugins:min_length", "config": {"min_chars": 10}}
    pipeline = write_project(project, stages=[length, split])
    monkeypatch.chdir(project)
    run = project / "out"
    assert curate_main(["run", str(pipeline), "--quiet"]) == 0
    first = json.loads((run / "manifest.json").read_text())["accounting"]["kept"]
    assert exported_rows(run) == first

    # A stiffer threshold: the exports shrink with the kept count.
    write_pipeline(project, stages=[{**length, "config": {"min_chars": 26}}, split])
    assert curate_main(["run", str(pipeline), "--quiet"]) == 0
    stiffer = json.loads((run / "manifest.json").read_text())["accounting"]["kept"]
    assert stiffer < first and exported_rows(run) == stiffer

    # The length stage disabled and the split renamed: neither `length/` nor the old `split/` is left.
    write_pipeline(project, stages=[{**length, "enabled": False}, {**split, "name": "final_split"}])
    capsys.readouterr()
    assert curate_main(["run", str(pipeline)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["ingest", "final_split"]
    assert not (run / "length").exists() and not (run / "split").exists()
    assert "length" in out and "removed outputs of stages no longer in the pipeline" in out
    assert exported_rows(run) == manifest["accounting"]["kept"] == pl.read_parquet(run / "final_split" / "data.parquet").height

    # Without a split stage, no sft/ or pref/ of an earlier run is left to be mistaken for this run's.
    write_pipeline(project, stages=[length])
    assert curate_main(["run", str(pipeline), "--quiet"]) == 0
    assert not (run / "sft").exists() and not (run / "pref").exists() and not (run / "final_split").exists()
    assert (project / "data" / "chats.jsonl").is_file() and (project / "manifest.json").is_file()


# ------------------------------------------------------------------------- class 5: one run at a time


HOLD_LOCK = """
import sys, time
from safety.locking import exclusive_lock
with exclusive_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_gets_the_holders_pid_and_a_killed_holder_blocks_nothing(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    pipeline = write_project(project)
    monkeypatch.chdir(project)
    assert curate_main(["run", str(pipeline), "--quiet"]) == 0
    run = project / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        assert curate_main(["run", str(pipeline), "--quiet", "--force"]) == 2
        err = one_line_error(capsys)
        assert f"pid {holder.pid}" in err
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert curate_main(["run", str(pipeline), "--quiet"]) == 0


# ------------------------------------------------------------- class 11: a killed run's leftovers


def test_leftover_temp_files_of_a_killed_run_are_cleaned_by_the_next_run(tmp_path, monkeypatch):
    project = tmp_path / "project"
    pipeline = write_project(project)
    monkeypatch.chdir(project)
    assert curate_main(["run", str(pipeline), "--quiet"]) == 0
    run = project / "out"
    leftovers = [
        run / "length" / ".data.parquet.k3j9x0qa.parquet.tmp",
        run / ".manifest.json.ab12cd34.tmp",
        run / "ingest" / ".ingest-parts-q1w2e3r4" / "records-00000-000000.parquet",
        run / ".sft.zz99yy88.old" / "train-00000-of-00001.parquet",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    keep = [run / ".my.tmp", run / "scratch.tmp", project / "data" / ".chats.jsonl.ab12cd34.tmp"]
    for path in keep:
        path.write_text("not curate's\n")
    assert curate_main(["run", str(pipeline), "--quiet"]) == 0
    assert not [p for p in leftovers if p.exists()]
    assert not (run / "ingest" / ".ingest-parts-q1w2e3r4").exists() and not (run / ".sft.zz99yy88.old").exists()
    assert all(p.read_text() == "not curate's\n" for p in keep)
