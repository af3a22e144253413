"""What determines a key text and a signature (shared by the stage, the CLI, the index and the benches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

HashName = Literal["xxh32", "sha1"]
ShingleKind = Literal["char", "word"]
KeyName = Literal["conversation", "prompt"]
PreferenceKeyName = Literal["pair", "prompt"]


@dataclass(frozen=True)
class MinHashSettings:
    """Everything that determines a key text and a signature; two indexes can be compared only if
    these match. Defaults: see curate/dedup/__init__.py (normalization that cannot merge distinct items)."""

    num_perm: int = 128
    seed: int = 1  # datasketch's default seed
    hash: HashName = "xxh32"
    shingle: ShingleKind = "char"
    ngram: int = 5
    key: KeyName = "conversation"
    preference_key: PreferenceKeyName = "pair"
    lowercase: bool = True
    strip_punctuation: bool = False
    normalize_digits: bool = False
    include_system: bool = False

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

