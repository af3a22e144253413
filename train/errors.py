"""Errors a user of `train` can cause: one-line messages, printed by the CLI without a traceback."""

from __future__ import annotations


class TrainError(Exception):
    """Base class: `str(error)` is the whole one-line message shown to the user."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class TrainConfigError(TrainError):
    """A config file or flag that does not fit the schema."""


class DataError(TrainError):
    """A split directory or record that cannot be trained on."""


class ModelLoadError(TrainError):
    """A model path, GGUF file or adapter that cannot be loaded."""


class CheckpointError(TrainError):
    """A checkpoint folder that is missing, partial or from a different run."""


class TrainingDivergedError(TrainError):
    """A non-finite loss, gradient or weight: the run stops before anything poisoned is saved."""
