"""The mapping language: turn records of any shape into canonical conversations, by config.

An input's `mapping:` (pipeline YAML) or the `curate ingest --map-*` flags say where a record's turns,
prompt, answers and preference replies are (paths with nested keys and list indices: `a.b[0].c`), how
speakers become roles, which fields are appended as turns, and which conversation repairs to apply.
Each mapped row is rewritten into the shape of the `openai` (messages) or `preference` format and then
decoded and checked exactly like those formats; the fields a mapping does not consume stay with the
row and end in `metadata`.

This step runs once per row in Python (json.loads, list work, json.dumps): the shapes it reads (turns
as strings or objects, answers as a string or a list, nested turn groups) have no single column type a
vectorized decode could use. Inputs without a `mapping:` never come here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from functools import cached_property, lru_cache
from typing import Any

from curate.errors import ConfigError
from curate.formats import text_of_parts

ANSWER_MODES = ("first", "explode", "join")
FEW_SHOT_MODES = ("turns", "system")
ROLES = ("user", "assistant", "system", "tool")
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


@dataclass(frozen=True)
class Mapping:
    """The parsed `mapping:` block of one input (see docs/formats.md for each field)."""

    messages: str | None = None
    role_field: str = "role"
    content_field: str = "content"
    roles: dict[str, str] = field(default_factory=dict)
    first_speaker: str | None = None  # "user": speakers alternate user/assistant by order of appearance
    system: str | None = None
    prompt: str | None = None
    response: str | None = None
    append: tuple[tuple[str, str], ...] = ()  # (path, role)
    chosen: str | None = None
    rejected: str | None = None
    answers: str = "first"
    join_with: str = "\n"
    records: str | None = None  # "values": the file is one JSON object whose values are the records
    key_field: str = "key"
    merge_consecutive: bool = False
    trim_trailing_user: bool = False
    few_shot: str = "turns"

    @property
    def kind(self) -> str:
        return "preference" if self.chosen or self.rejected else "sft"

    @classmethod
    def from_config(cls, config: dict, where: str) -> "Mapping":
        config = dict(config)
        append = tuple((item["field"], item.get("role", "assistant")) for item in config.pop("append", []))
        mapping = cls(**config, append=append)
        mapping.check(where)
        return mapping

    def as_config(self) -> dict:
        """The mapping as written in config (defaults left out), for the manifest and fingerprints."""
        defaults = Mapping()
        values = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "append"}
        config = {name: value for name, value in values.items() if value != getattr(defaults, name)}
        if self.append:
            config["append"] = [{"field": path, "role": role} for path, role in self.append]
        return config

    def check(self, where: str) -> None:
        if self.kind == "preference" and not (self.chosen and self.rejected):
            raise ConfigError(f"{where}: mapping needs both `chosen` and `rejected` for preference pairs")
        if self.kind == "sft" and not (self.messages or self.prompt):
            raise ConfigError(f"{where}: mapping needs `messages` (a list of turns) or `prompt` (a text field)")
        if self.first_speaker not in (None, "user", "assistant"):
            raise ConfigError(f"{where}: mapping.first_speaker must be user or assistant, got {self.first_speaker!r}")
        for name, role in [*self.roles.items(), *((path, role) for path, role in self.append)]:
            if role not in ROLES:
                raise ConfigError(f"{where}: mapping role for {name!r} must be one of {', '.join(ROLES)}, got {role!r}")
        for path in self.paths():
            parse_path(path, where)

    def paths(self) -> list[str]:
        named = [self.messages, self.system, self.prompt, self.response, self.chosen, self.rejected]
        return [path for path in named if path] + [path for path, _ in self.append]

    @cached_property
    def consumed_fields(self) -> frozenset[str]:
        """Top-level fields the mapping reads: the others go on to `metadata`."""
        return frozenset(parse_path(path, "mapping")[0] for path in self.paths())


class RowProblem(Exception):
    """Why one row cannot be mapped: (reason, field, detail) for the quarantine."""

    def __init__(self, reason: str, field_name: str, detail: str):
        super().__init__(detail)
        self.reason, self.field_name, self.detail = reason, field_name, detail


def parse_path(path: str, where: str) -> tuple[str | int, ...]:
    parts = _parsed_path(path)
    if parts is None:
        raise ConfigError(f"{where}: mapping path {path!r} is not `key.key[index]`")
    return parts


@lru_cache(maxsize=256)
def _parsed_path(path: str) -> tuple[str | int, ...] | None:
    parts: list[str | int] = []
    position = 0
    for match in _PATH_PART.finditer(path):
        if match.start() != position and path[position:match.start()] != ".":
            return None
        parts.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        position = match.end()
    if not parts or position != len(path) or not isinstance(parts[0], str):
        return None
    return tuple(parts)


def get_path(record: Any, path: str, required: bool = True) -> Any:
    value = record
    for part in parse_path(path, "mapping"):
        if isinstance(part, int) and isinstance(value, list) and -len(value) <= part < len(value):
            value = value[part]
        elif isinstance(part, str) and isinstance(value, dict) and part in value:
            value = value[part]
        else:
            value = None
        if value is None:
            if required:
                raise RowProblem("missing_field", path, "required field is missing or null")
            return None
    return value


@dataclass
class RepairCounts:
    """What the mapping changed, per file: the manifest reports it next to the row counts."""

    merged_turns: int = 0
    trimmed_trailing_user: int = 0
    few_shot_turns: int = 0
    few_shot_to_system: int = 0
    exploded_rows: int = 0
    joined_answers: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: value for name, value in self.__dict__.items() if value}


def map_record(record: Any, mapping: Mapping, counts: RepairCounts) -> list[dict]:
    """One raw record → the canonical-shaped objects it becomes (several when answers explode)."""
    if not isinstance(record, dict):
        raise RowProblem("wrong_type", "", f"expected a JSON object, got {type(record).__name__}")
    extras = {key: value for key, value in record.items() if key not in mapping.consumed_fields}
    if mapping.kind == "preference":
        prompt = _turns_at(record, mapping.prompt, mapping, "user", required=False) if mapping.prompt else []
        return [{
            **extras,
            "prompt": _with_system(record, mapping, prompt),
            "chosen": _turns_at(record, mapping.chosen, mapping, "assistant"),
            "rejected": _turns_at(record, mapping.rejected, mapping, "assistant"),
        }]  # fmt: skip
    if mapping.messages:
        turns = _turns_at(record, mapping.messages, mapping, None)
    else:
        turns = [{"role": "user", "content": _text(get_path(record, mapping.prompt), mapping.prompt)}]
    turns = _few_shot(_with_system(record, mapping, turns), mapping, counts)
    appended = [(path, role) for path, role in mapping.append]
    if mapping.response:
        appended.insert(0, (mapping.response, "assistant"))
    variants = [turns]
    for path, role in appended:
        answers = _answers(get_path(record, path), path, mapping, counts)
        variants = [[*turns_so_far, {"role": role, "content": answer}] for turns_so_far in variants for answer in answers]
    counts.exploded_rows += len(variants) - 1
    return [{**extras, "messages": _repaired(turns, mapping, counts)} for turns in variants]


def _with_system(record: dict, mapping: Mapping, turns: list[dict]) -> list[dict]:
    if not mapping.system:
        return turns
    system = get_path(record, mapping.system, required=False)
    return ([{"role": "system", "content": _text(system, mapping.system)}] if system else []) + turns


def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        text = text_of_parts(value)
        if text is not None:
            return text
    raise RowProblem("wrong_type", where, f"expected text, got {type(value).__name__}")


def _turns_at(record: dict, path: str, mapping: Mapping, single_role: str | None, required: bool = True) -> list[dict]:
    """The turns at `path`: a list of turn objects or strings (nested groups flattened), or one text
    (a turn of `single_role`)."""
    value = get_path(record, path, required)
    if value is None:
        return []
    if isinstance(value, str):
        if single_role is None:
            raise RowProblem("wrong_type", path, "expected a list of turns, got a string")
        return [{"role": single_role, "content": value}]
    if not isinstance(value, list):
        raise RowProblem("wrong_type", path, f"expected a list of turns, got {type(value).__name__}")
    flat = [turn for item in value for turn in (item if isinstance(item, list) else [item])]
    speakers: list[Any] = []
    turns = []
    for index, turn in enumerate(flat):
        where = f"{path}[{index}]"
        if isinstance(turn, str):
            speaker, content, extra = index % 2, turn, {}
        elif isinstance(turn, dict):
            speaker = turn.get(mapping.role_field)
            content = turn.get(mapping.content_field)
            extra = {key: turn[key] for key in ("tool_calls", "tool_call_id", "name") if turn.get(key) is not None}
            if content is None and not extra.get("tool_calls"):
                raise RowProblem("missing_field", f"{where}.{mapping.content_field}", "turn has no content")
        else:
            raise RowProblem("wrong_type", where, f"expected a turn object or text, got {type(turn).__name__}")
        turns.append({"role": _role(speaker, speakers, mapping), "content": "" if content is None else _text(content, where), **extra})
    return turns


def _role(speaker: Any, speakers: list[Any], mapping: Mapping) -> Any:
    """A speaker value → a role: the `roles` map first, then (first_speaker) by order of appearance,
    else the value itself (the standard aliases apply later; anything else is an unknown role)."""
    if isinstance(speaker, str) and speaker in mapping.roles:
        return mapping.roles[speaker]
    if mapping.first_speaker is None and not isinstance(speaker, int):
        return speaker
    if speaker not in speakers:
        speakers.append(speaker)
    order = ("user", "assistant") if mapping.first_speaker != "assistant" else ("assistant", "user")
    position = speakers.index(speaker)
    return order[position] if position < 2 else None  # a third speaker: an unknown role


def _answers(value: Any, path: str, mapping: Mapping, counts: RepairCounts) -> list[str]:
    if not isinstance(value, list):
        return [_text(value, path)]
    answers = [_text(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if not answers:
        raise RowProblem("missing_field", path, "the list of answers is empty")
    if mapping.answers == "first":
        return answers[:1]
    if mapping.answers == "join":
        counts.joined_answers += len(answers) > 1
        return [mapping.join_with.join(answers)]
    return answers


def _few_shot(turns: list[dict], mapping: Mapping, counts: RepairCounts) -> list[dict]:
    """System turns named example_user / example_assistant (the OpenAI evals few-shot convention) become
    user/assistant turns, or are folded into the system context as labelled examples."""
    examples = [turn for turn in turns if turn.get("role") == "system" and turn.get("name") in ("example_user", "example_assistant")]
    if not examples:
        return [_without_name(turn) for turn in turns]
    if mapping.few_shot == "turns":
        counts.few_shot_turns += len(examples)
        return [
            {"role": turn["name"].removeprefix("example_"), "content": turn["content"]} if turn in examples else _without_name(turn)
            for turn in turns
        ]
    counts.few_shot_to_system += 1
    labelled = [f"{'User' if turn['name'] == 'example_user' else 'Assistant'}: {turn['content']}" for turn in examples]
    context = [turn["content"] for turn in turns if turn.get("role") == "system" and turn not in examples]
    system = "\n\n".join([*context, "Examples:\n" + "\n".join(labelled)])
    rest = [_without_name(turn) for turn in turns if turn.get("role") != "system"]
    return [{"role": "system", "content": system}, *rest]


def _without_name(turn: dict) -> dict:
    return {key: value for key, value in turn.items() if key != "name"}


def _repaired(turns: list[dict], mapping: Mapping, counts: RepairCounts) -> list[dict]:
    if mapping.merge_consecutive:
        merged: list[dict] = []
        for turn in turns:
            plain = not turn.get("tool_calls") and turn.get("role") not in ("tool", None)
            if merged and plain and merged[-1]["role"] == turn["role"] and not merged[-1].get("tool_calls"):
                merged[-1] = {**merged[-1], "content": merged[-1]["content"] + mapping.join_with + turn["content"]}
                counts.merged_turns += 1
            else:
                merged.append(turn)
        turns = merged
    if mapping.trim_trailing_user and len(turns) > 1 and turns[-1].get("role") == "user":
        counts.trimmed_trailing_user += 1
        turns = turns[:-1]
    return turns


def map_row_text(raw: str, mapping: Mapping, counts: RepairCounts) -> list[str]:
    """One raw JSON text → the JSON texts of the rows it becomes; RowProblem when it cannot be mapped."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as error:
        raise RowProblem("malformed_json", "", f"{error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise RowProblem("malformed_json", "", "nested too deeply") from None
    return [json.dumps(row, ensure_ascii=False) for row in map_record(record, mapping, counts)]
