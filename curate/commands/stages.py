"""`curate stages`: list the registered stage types and their config fields."""

from __future__ import annotations

from rich.table import Table

from curate.display import console
from curate.stage import registered_stages


def register(subparsers) -> None:
    parser = subparsers.add_parser("stages", help="list stage types usable in a pipeline YAML", description=__doc__)
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    table = Table(title="stage types")
    table.add_column("type")
    table.add_column("config fields (default)")
    table.add_column("what it does")
    for name, spec in registered_stages().items():
        fields = ", ".join(
            f"{key}={field.get_default(call_default_factory=True)!r}" if not field.is_required() else f"{key} (required)"
            for key, field in spec.config_model.model_fields.items()
        )
        table.add_row(name, fields, spec.description)
    console.print(table)
    return 0
