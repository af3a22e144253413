"""The `filter` stage's rules: data, not code (as dolma's mixer).

A rule reads one score column the `tag` stage (or `decontaminate`) wrote and states what a row must
satisfy to stay:

    {name: min_last_assistant_words, column: last_assistant_word_count, min: 2, why: "..."}

Tests: `min` (column >= value), `max` (column <= value), `in` (column is one of the values; a null
never passes a keep-list), `not_in`, `is_null: true` (the column must be null: flag columns such as
`refusal_phrase`). `when: {column, min|max}` limits a rule to rows meeting that condition. A null
score never fails a `min`/`max` test. `optional: true` skips the rule (listed in the report) when its
column is absent; any other rule whose column is absent is a config error, never a silent no-op.

Presets are named YAML blocks shipped in curate/filters/presets/ (`chat`, `short_answer`, `code`,
`preference`), each rule with its rationale. A config picks one (`preset: short_answer`), overrides a
rule by naming it in `rules` (only the keys given change), appends new rules the same way, and turns
rules off with `disable`. The rule name is the `reason` of a dropped row; `reasons` lists every failing
rule, in rule order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import polars as pl
import yaml
from pydantic import Field, ValidationError, model_validator

from curate.errors import ConfigError
from curate.stage import StageConfig

PRESETS = ("chat", "short_answer", "code", "preference")
LANGUAGE_RULE = "languages"
TESTS = ("min", "max", "in", "not_in", "is_null")
Value = str | int | float | bool


class Condition(StageConfig):
    column: str = Field(..., min_length=1, description="Score column the condition reads.")
    min: float | None = Field(None, description="Condition holds when column >= min.")
    max: float | None = Field(None, description="Condition holds when column <= max.")


class RuleSpec(StageConfig):
    """One rule as written in a preset or a config's `rules` list."""

    model_config = StageConfig.model_config | {"populate_by_name": True}

    name: str = Field(..., min_length=1, description="Rule name: the `reason` of the rows it drops.")
    column: str | None = Field(None, description="Score column the rule reads (from a preset when overriding).")
    min: float | None = Field(None, description="Keep rows with column >= min.")
    max: float | None = Field(None, description="Keep rows with column <= max.")
    in_: list[Value] | None = Field(None, alias="in", description="Keep rows whose column is one of these (null never is).")
    not_in: list[Value] | None = Field(None, description="Drop rows whose column is one of these.")
    is_null: bool | None = Field(None, description="true: keep rows whose column is null (flag columns).")
    when: Condition | None = Field(None, description="Apply the rule only to rows meeting this condition.")
    optional: bool = Field(False, description="Skip (and report) instead of refusing when the column is absent.")
    why: str | None = Field(None, description="Rationale, shown by `curate filter --explain`.")


class FilterConfig(StageConfig):
    preset: str | None = Field(
        "chat",
        description="Named rule set from curate/filters/presets/: chat, short_answer, code, preference "
        "(`curate filter --explain RULE` shows what a rule measures). Null: only the rules listed here.",
    )
    languages: list[str] | None = Field(
        None,
        description="Shorthand for the `languages` rule's keep-list (ISO codes of the tag stage's detector, e.g. "
        "[en, de]). Unset: the preset's; null: rule off. Rows of unknown or low-confidence language never pass.",
    )
    rules: list[RuleSpec] = Field(
        default_factory=list,
        description="Rules to add, or to override by name (only the keys given change a preset rule).",
    )
    disable: list[str] = Field(
        default_factory=list, description="Names of preset rules to turn off (an unknown name is an error, not a no-op)."
    )

    @model_validator(mode="after")
    def _known_preset(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
        return self


@dataclass(frozen=True)
class Rule:
    name: str
    columns: tuple[str, ...]
    fails: pl.Expr  # true when the row breaks the rule
    optional: bool = False


@cache
def preset_rules(name: str) -> tuple[dict, ...]:
    """The rules of a shipped preset, as written (validated as RuleSpec on load)."""
    data = yaml.safe_load((files("curate.filters") / "presets" / f"{name}.yaml").read_text(encoding="utf-8"))
    rules = tuple(dict(rule) for rule in data["rules"])
    for rule in rules:
        RuleSpec.model_validate(rule)
    return rules


def preset_description(name: str) -> str:
    data = yaml.safe_load((files("curate.filters") / "presets" / f"{name}.yaml").read_text(encoding="utf-8"))
    return str(data.get("description", ""))


def resolve_rules(config: FilterConfig) -> list[RuleSpec]:
    """Preset rules, then the config's overrides/additions, the `languages` shorthand and `disable`."""
    merged: dict[str, dict] = {rule["name"]: dict(rule) for rule in preset_rules(config.preset)} if config.preset else {}
    for rule in config.rules:
        given = rule.model_dump(by_alias=True, exclude_unset=True)
        if rule.name in merged and set(given) & set(TESTS):
            # A new test replaces the preset's (min: 1 on a max rule would combine two tests silently).
            merged[rule.name] = {k: v for k, v in merged[rule.name].items() if k not in TESTS}
        merged.setdefault(rule.name, {}).update(given)
    if "languages" in config.model_fields_set:
        if config.languages is None:
            merged.pop(LANGUAGE_RULE, None)
        else:
            merged.setdefault(LANGUAGE_RULE, {"name": LANGUAGE_RULE, "column": "lang"})["in"] = list(config.languages)
    unknown = [name for name in config.disable if name not in merged]
    if unknown:
        raise ConfigError(f"filter.disable: no rule named {unknown[0]!r} (rules: {', '.join(merged)})")
    specs = []
    for name, fields in merged.items():
        if name in config.disable:
            continue
        spec = _validated(fields)
        if spec.column is None:
            raise ConfigError(f"filter.rules: rule {name!r} has no column (it is not a preset rule to override)")
        if not any(getattr(spec, "in_" if test == "in" else test) is not None for test in TESTS):
            raise ConfigError(f"filter.rules: rule {name!r} has no test (give min, max, in, not_in or is_null)")
        specs.append(spec)
    return specs


def _validated(fields: dict) -> RuleSpec:
    try:
        return RuleSpec.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"filter.rules: rule {fields.get('name')!r}: {where}: {first['msg']}") from None


def _condition(column: str, minimum, maximum) -> pl.Expr:
    holds = pl.lit(True)
    if minimum is not None:
        holds = holds & (pl.col(column) >= minimum)
    if maximum is not None:
        holds = holds & (pl.col(column) <= maximum)
    return holds


def compile_rule(spec: RuleSpec) -> Rule:
    column = pl.col(spec.column)
    fails = pl.lit(False)
    if spec.min is not None or spec.max is not None:
        fails = fails | ~_condition(spec.column, spec.min, spec.max).fill_null(True)  # null scores never fail
    if spec.in_ is not None:
        fails = fails | column.is_null() | ~column.is_in(spec.in_)
    if spec.not_in is not None:
        fails = fails | column.is_in(spec.not_in).fill_null(False)
    if spec.is_null:
        fails = fails | column.is_not_null()
    columns = [spec.column]
    if spec.when is not None:
        fails = fails & _condition(spec.when.column, spec.when.min, spec.when.max).fill_null(False)
        columns.append(spec.when.column)
    return Rule(spec.name, tuple(columns), fails.fill_null(False), spec.optional)


def describe_rule(spec: RuleSpec) -> str:
    """The rule's test in words: `last_assistant_word_count >= 2`, `refusal_phrase is null`, ..."""
    parts = []
    if spec.min is not None:
        parts.append(f"{spec.column} >= {spec.min:g}")
    if spec.max is not None:
        parts.append(f"{spec.column} <= {spec.max:g}")
    if spec.in_ is not None:
        parts.append(f"{spec.column} in {spec.in_}")
    if spec.not_in is not None:
        parts.append(f"{spec.column} not in {spec.not_in}")
    if spec.is_null:
        parts.append(f"{spec.column} is null")
    text = "keep rows with " + " and ".join(parts)
    if spec.when is not None:
        when = describe_rule(RuleSpec(name="when", column=spec.when.column, min=spec.when.min, max=spec.when.max))
        text += f" (only checked for rows with {when.removeprefix('keep rows with ')})"
    return text


def find_rule(name: str) -> list[tuple[str, RuleSpec]]:
    """Every preset defining a rule of this name, with its spec."""
    return [(preset, RuleSpec.model_validate(rule)) for preset in PRESETS for rule in preset_rules(preset) if rule["name"] == name]
