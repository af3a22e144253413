"""`curate label push|pull|status|serve|stop`: human labeling in Argilla.

  curate label serve [--home DIR] [--port N]     start a local Argilla (SQLite, Redis, osmem search)
  curate label push DATA.parquet --dataset NAME  create/update datasets NAME-sft and NAME-pref
  curate label status --dataset NAME             progress per dataset and per annotator
  curate label pull DATA.parquet --dataset NAME --out DIR   aggregate answers, apply them
  curate label stop [--home DIR]
  curate label users add NAME [--role annotator]  create an annotator; prints their password and API key once
  curate label users list                        usernames, roles and workspaces (never keys)

The server comes from --api-url or ARGILLA_API_URL, the key from ARGILLA_API_KEY (after `serve`, both
are in the owner file it names).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import polars as pl
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from curate.cli_support import add_set_argument, apply_set_items
from curate.display import console, live_run_events, print_summary, styled
from curate.errors import ConfigError, InputFileError
from curate.label.client import DEFAULT_WORKSPACE, require_connection
from curate.label.schema import DEFAULT_METADATA_COLUMNS, check_dataset_name, read_guidelines
from curate.label.users import ROLES as USER_ROLES
from safety.ownership import claim_dir
from safety.redact import redact


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "label",
        help="human labeling in Argilla (push, pull, status, serve, stop, users)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="label_command", required=True, metavar="VERB")

    def server_args(sub):
        sub.add_argument("--dataset", required=True, help="base name: datasets NAME-sft and NAME-pref")
        sub.add_argument("--workspace", default=DEFAULT_WORKSPACE, help=f"Argilla workspace (default {DEFAULT_WORKSPACE})")
        sub.add_argument("--api-url", help="Argilla URL (default: $ARGILLA_API_URL)")
        sub.add_argument("--max-retries", type=int, default=5, help="retries on connection errors and 5xx (default 5)")

    push = verbs.add_parser("push", help="create or update Argilla datasets from canonical rows")
    push.add_argument("input", type=Path, help="a stage's canonical data.parquet")
    server_args(push)
    push.add_argument("--min-submitted", type=int, default=2, help="annotators per record (default 2)")
    push.add_argument(
        "--preference-question", choices=["label", "ranking"], default="label",
        help="label: 'Which answer is better? A / B / tie' (default); ranking: rank A and B",
    )
    push.add_argument("--guidelines", type=Path, metavar="FILE", help="Markdown file shown to annotators as the dataset's guidelines")
    push.add_argument(
        "--suggest", action="append", default=[], metavar="QUESTION=COLUMN", help="suggest answers from a column"
    )
    push.add_argument(
        "--metadata", action="append", metavar="COLUMN",
        help=f"a column to show as metadata, repeatable (default: {', '.join(DEFAULT_METADATA_COLUMNS)})",
    )
    push.add_argument("--batch-size", type=int, default=100)
    push.add_argument("--state-dir", type=Path, help="resume state (default: beside the input)")
    push.set_defaults(handler=handle_push)

    pull = verbs.add_parser("pull", help="aggregate submitted answers and apply them to the rows")
    pull.add_argument("input", type=Path, help="the data.parquet that was pushed")
    server_args(pull)
    pull.add_argument("--out", type=Path, required=True, help="run directory to write")
    pull.add_argument("--min-responses", type=int, default=1, help="annotators needed per row (default 1)")
    pull.add_argument("--insufficient", choices=["keep", "hold_back", "drop"], default="keep")
    pull.add_argument("--preference-tie", choices=["keep", "hold_back", "drop"], default="keep")
    pull.add_argument("--no-correction-pairs", dest="corrections_as_pairs", action="store_false")
    add_set_argument(pull, "preference_tie=drop")
    pull.add_argument("--quiet", action="store_true")
    pull.set_defaults(handler=handle_pull)

    status = verbs.add_parser("status", help="progress per dataset and per annotator")
    server_args(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.set_defaults(handler=handle_status)

    serve = verbs.add_parser("serve", help="start a local Argilla server (SQLite + Redis + osmem search)")
    serve.add_argument("--home", type=Path, help="server home (default: $CURATE_ARGILLA_HOME or .argilla/ in the repository)")
    serve.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    serve.set_defaults(handler=handle_serve)

    stop = verbs.add_parser("stop", help="stop the local Argilla server started by serve")
    stop.add_argument("--home", type=Path, help="server home (default: $CURATE_ARGILLA_HOME or .argilla/ in the repository)")
    stop.set_defaults(handler=handle_stop)

    users = verbs.add_parser("users", help="annotator accounts: add, list")
    user_verbs = users.add_subparsers(dest="users_command", required=True, metavar="VERB")
    add = user_verbs.add_parser("add", help="create a user; prints their password and API key once (never stored)")
    add.add_argument("name", help="username (letters, digits, '_', '.', '@', '-')")
    add.add_argument("--role", choices=list(USER_ROLES), default="annotator")
    add.add_argument("--workspace", default=DEFAULT_WORKSPACE, help=f"workspace to add them to (default {DEFAULT_WORKSPACE})")
    add.add_argument("--api-url", help="Argilla URL (default: $ARGILLA_API_URL); the owner key from $ARGILLA_API_KEY")
    add.set_defaults(handler=handle_users_add)
    listing = user_verbs.add_parser("list", help="usernames, roles and workspaces")
    listing.add_argument("--api-url", help="Argilla URL (default: $ARGILLA_API_URL)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=handle_users_list)


def _read_canonical(path: Path) -> pl.DataFrame:
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    try:
        frame = pl.read_parquet(path, glob=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputFileError(f"{path}: not a readable Parquet file ({type(error).__name__})") from None
    missing = [c for c in ("id", "kind", "messages", "prompt", "chosen", "rejected", "source") if c not in frame.columns]
    if missing:
        raise InputFileError(f"{path}: not a canonical frame (missing column {missing[0]!r}); give a stage's data.parquet")
    return frame


def _suggestions(pairs: list[str]) -> dict[str, str]:
    result = {}
    for pair in pairs:
        question, sep, column = pair.partition("=")
        if not sep or not question or not column:
            raise ConfigError(f"--suggest {pair!r}: expected QUESTION=COLUMN")
        result[question] = column
    return result


def handle_push(args) -> int:
    from curate.label.push import PushOptions, push_frame

    check_dataset_name(args.dataset)  # before it becomes a path or reaches the server
    if args.guidelines:
        read_guidelines(args.guidelines)  # a missing file is reported before the server is asked anything
    connection = require_connection(args.api_url, os.environ.get("ARGILLA_API_KEY"))
    frame = _read_canonical(args.input)
    options = PushOptions(
        dataset=args.dataset,
        workspace=args.workspace,
        min_submitted=args.min_submitted,
        preference_question=args.preference_question,
        guidelines=read_guidelines(args.guidelines) if args.guidelines else None,
        suggestions=_suggestions(args.suggest),
        metadata_columns=args.metadata,
        batch_size=args.batch_size,
        max_retries=args.max_retries,
    )
    # Resume state goes into a folder of ours only (a default one from before ownership markers is adopted).
    state_dir = claim_dir(
        args.state_dir or args.input.resolve().parent / "label_push_state", "curate", "label-push-state",
        protected=[args.input], option="--state-dir", adopt_unmarked=args.state_dir is None,
    )
    # markup=False: the description is a dataset name, user text.
    columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        report = push_frame(frame, connection, options, state_dir, progress, on_retry=lambda m: console.print(styled(m, "yellow")))
    table = Table(title=f"pushed to {redact(connection.api_url)} (workspace {options.workspace})")
    for column in ("dataset", "records", "sent", "unchanged"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for name, item in report["datasets"].items():
        table.add_row(name, f"{item['records']:,}", f"{item['sent']:,}", f"{item['unchanged_skipped']:,}")
    console.print(table)
    return 0


def handle_pull(args) -> int:
    from curate.runner import run_single_stage

    check_dataset_name(args.dataset)  # before it becomes a path or reaches the server
    require_connection(args.api_url, os.environ.get("ARGILLA_API_KEY"))
    config = {
        "dataset": args.dataset,
        "workspace": args.workspace,
        "api_url": args.api_url,
        "max_retries": args.max_retries,
        "min_responses": args.min_responses,
        "insufficient": args.insufficient,
        "preference_tie": args.preference_tie,
        "corrections_as_pairs": args.corrections_as_pairs,
    }
    apply_set_items(config, args.set_items)
    with live_run_events(enabled=not args.quiet) as events:
        result = run_single_stage("label_pull", config, [args.input], args.out, events=events)
    print_summary(result.manifest)
    stage = result.manifest["stages"][-1]["report"]
    table = Table(title="labels applied")
    table.add_column("what")
    table.add_column("rows", justify="right")
    for key in ("labeled", "annotator_discard", "insufficient_responses", "held_back", "preference_ties",
                "corrected", "swapped_preferences", "pairs_from_corrections"):  # fmt: skip
        table.add_row(key, f"{stage.get(key, 0):,}")
    console.print(table)
    for name, item in stage.get("datasets", {}).items():
        alphas = item.get("agreement_krippendorff_alpha") or {}
        shown = ", ".join(f"{q} {'n/a' if a is None else f'{a:.3f}'}" for q, a in alphas.items())
        console.print(f"{name}: {item.get('annotators', 0)} annotators; Krippendorff's alpha: {shown or 'n/a'}")
    return 0


def handle_status(args) -> int:
    from curate.label.status import labeling_status

    check_dataset_name(args.dataset)  # before it becomes a path or reaches the server
    connection = require_connection(args.api_url, os.environ.get("ARGILLA_API_KEY"))
    status = labeling_status(connection, args.dataset, args.workspace, args.max_retries)
    if args.json:
        console.print_json(json.dumps(status))
        return 0
    if not status:
        console.print(f"no datasets named {args.dataset}-sft or {args.dataset}-pref in workspace {args.workspace}")
        return 1
    table = Table(title="labeling progress")
    for column in ("dataset", "records", "completed", "pending"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    people = Table(title="per annotator")
    for column in ("dataset", "annotator", "submitted", "draft", "discarded"):
        people.add_column(column, justify="left" if column in ("dataset", "annotator") else "right")
    for name, item in status.items():
        table.add_row(name, f"{item['total']:,}", f"{item['completed']:,}", f"{item['pending']:,}")
        for user, counts in item["annotators"].items():
            people.add_row(name, user, *(f"{counts[k]:,}" for k in ("submitted", "draft", "discarded")))
    console.print(table)
    console.print(people)
    return 0


def handle_serve(args) -> int:
    from curate.label.server import start_server

    info = start_server(args.home, port=args.port, progress=lambda message: console.print(styled(message, "dim")))
    console.print(Text.assemble("Argilla is running at ", (info.url, "bold"), f" (home {info.home})"), soft_wrap=True)
    console.print(f"owner username, password and API key: {info.owner_file} (mode 600; keys 'username', 'password', 'api_key')", soft_wrap=True)
    console.print(f"  export ARGILLA_API_URL={info.url}", soft_wrap=True)
    console.print(f"  export ARGILLA_API_KEY=$(python -c \"import json; print(json.load(open('{info.owner_file}'))['api_key'])\")", soft_wrap=True)
    console.print("stop it with: curate label stop" + (f" --home {args.home}" if args.home else ""), soft_wrap=True)
    return 0


def handle_stop(args) -> int:
    from curate.label.server import stop_server

    stopped = stop_server(args.home)
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def handle_users_add(args) -> int:
    from curate.label.users import add_user, check_username

    check_username(args.name)
    connection = require_connection(args.api_url, os.environ.get("ARGILLA_API_KEY"))
    user = add_user(connection, args.name, role=args.role, workspace=args.workspace)
    # The only place the credentials ever appear: plain lines on stdout, easy to hand over or pipe.
    print(f"username: {user.username}")
    print(f"role: {user.role}")
    print(f"workspace: {user.workspace}")
    print(f"password: {user.password}")
    print(f"api_key: {user.api_key}")
    print(f"sign in at: {redact(connection.api_url)}")
    print("these credentials are shown once and stored nowhere by curate: hand them over now", file=sys.stderr)
    return 0


def handle_users_list(args) -> int:
    from curate.label.users import list_users

    connection = require_connection(args.api_url, os.environ.get("ARGILLA_API_KEY"))
    users = list_users(connection)
    if args.json:
        console.print_json(json.dumps(users))
        return 0
    table = Table(title=f"users on {redact(connection.api_url)}")
    for column in ("username", "role", "workspaces"):
        table.add_column(column)
    for user in users:
        table.add_row(user["username"], user["role"], ", ".join(user["workspaces"]))
    console.print(table)
    return 0
