"""Small pieces the `curate` verbs share: reading a YAML config file and applying flag overrides."""

from __future__ import annotations

from pathlib import Path

import yaml

from curate.errors import ConfigError
from curate.formats import FORMATS


def add_input_arguments(parser, inputs_help: str, config_help: str | None = None) -> None:
    """The arguments every data verb shares: inputs, --out, [--config], --format and --column."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=inputs_help)
    parser.add_argument("--out", type=Path, required=True, help="run directory to write")
    if config_help:
        parser.add_argument("--config", type=Path, help=config_help)
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="raw format (default: detect)")
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="ROLE=NAME",
        help="field name for a role in the raw inputs, e.g. --column prompt=customer_message --column response=agent_reply",
    )


def read_yaml_mapping(path: Path, expected: str) -> dict:
    """A YAML file holding a mapping (empty file → {}); problems are one-line ConfigErrors."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {expected}, got {type(data).__name__}")
    return data


def load_stage_config(path: Path | None, stage_type: str) -> dict:
    """A stage's config from a file holding either the bare config or a pipeline stage entry
    (`{type: dedup, config: {...}}`)."""
    if path is None:
        return {}
    loaded = read_yaml_mapping(path, f"{stage_type} config fields")
    if set(loaded) <= {"name", "type", "config"} and isinstance(loaded.get("config"), dict):
        loaded = loaded["config"]
    return dict(loaded)


def apply_overrides(config: dict, args, fields) -> dict:
    """Flags given on the command line win over the config file."""
    for name in fields:
        value = getattr(args, name)
        if value is not None:
            config[name] = value
    return config


def derive_flags_from_model(parser, model, fields) -> None:
    """Flags that set config fields take their choices and the default they show from the stage's config
    model, so neither is written twice (help texts carry no defaults of their own)."""
    import typing

    for action in parser._actions:
        if action.dest not in fields or action.nargs == 0:  # store_true/false flags name their effect
            continue
        field = model.model_fields[action.dest]
        literal = [arg for arg in (field.annotation, *typing.get_args(field.annotation)) if typing.get_origin(arg) is typing.Literal]
        if literal:
            action.choices = list(typing.get_args(literal[0]))
        if field.default is not None and not callable(field.default):
            action.help = f"{action.help or ''} (default {field.default})".strip()


def add_set_argument(parser, example: str) -> None:
    """`--set KEY=VALUE` (repeatable), as `train` has: any config field by name, so a field needs no flag
    of its own to be set from the command line (the stage's config model checks it like any other)."""
    parser.add_argument(
        "--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
        help=f"set any config field, YAML value, dotted for nested fields, e.g. --set {example} (repeatable; wins over flags)",
    )


def apply_set_items(config: dict, items: list[str]) -> dict:
    """`a.b=value` items into the nested `config` dict (values parsed as YAML: 0.9, true, [en, de])."""
    for item in items:
        key, sep, raw = item.partition("=")
        path = [part.strip() for part in key.split(".")]
        if not sep or not all(path):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. threshold=0.8")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse the value {raw!r} as YAML") from None
        node = config
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
    return config


def parse_columns(items: list[str]) -> dict[str, str]:
    """`--column ROLE=NAME` flags → the `columns:` mapping of an input."""
    columns = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--column {item!r}: expected ROLE=NAME, e.g. prompt=customer_message")
        role, name = item.split("=", 1)
        columns[role.strip()] = name.strip()
    return columns


def add_engine_arguments(parser) -> None:
    """--engine / --address / --num-cpus: where a pipeline's stages run (curate.engines)."""
    parser.add_argument(
        "--engine", choices=("local", "ray"), default="local",
        help="local: this machine (default); ray: a Ray cluster (needs the extra: pip install 'curate[ray]')",
    )
    parser.add_argument(
        "--address", metavar="auto|HOST:PORT",
        help="with --engine ray: the cluster to join (`auto`: the one `ray start` runs here); without it a "
        "local cluster starts for this run",
    )
    parser.add_argument("--num-cpus", type=int, metavar="N", help="with --engine ray and no --address: CPUs of the local cluster (default: all)")


def engine_from_args(args, pipeline_options: dict | None = None):
    """The engine the flags ask for, or None for the local engine (the runner builds it from the pipeline's
    `engine:` options); the caller closes it (a local Ray cluster stops then). `pipeline_options` (e.g.
    batch_rows) apply to the Ray engine too."""
    from curate.engines import get_engine

    if args.engine != "ray":
        if args.address is not None or args.num_cpus is not None:
            raise ConfigError("--address and --num-cpus go with --engine ray")
        return None
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus: expected at least 1, got {args.num_cpus}")
    return get_engine("ray", address=args.address, num_cpus=args.num_cpus, **(pipeline_options or {}))
