"""`curate stages`: list the registered stage types, each config field with its default and what it does."""

from __future__ import annotations

from rich.table import Table

from curate.display import console, styled
from curate.stage import registered_stages


def register(subparsers) -> None:
    parser = subparsers.add_parser("stages", help="list stage types usable in a pipeline YAML", description=__doc__)
    parser.set_defaults(handler=handle)


def _default(field) -> str:
    return "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def handle(args) -> int:
    for name, spec in registered_stages().items():
        fields = spec.config_model.model_fields
        # Field names are what users type: never cut or wrapped, however narrow the terminal.
        table = Table(title=styled(f"{name}: {_one_line(spec.description)}"), title_justify="left", show_lines=False)
        table.add_column("field", no_wrap=True, min_width=max((len(key) for key in fields), default=5))
        table.add_column("default", overflow="fold", max_width=30)
        table.add_column("what it does", overflow="fold")
        for key, field in fields.items():
            table.add_row(styled(key), styled(_one_line(_default(field))), styled(_one_line(field.description)))
        console.print(table)
    return 0
