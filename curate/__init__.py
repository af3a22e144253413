"""curate: turn raw conversational data into curated fine-tuning sets.

Library entry points:
    run_pipeline(path)      — execute a YAML pipeline into a run directory (see curate.runner)
    ingest_paths(...)       — read raw files into canonical records + quarantine (see curate.ingest)
"""

__version__ = "0.1.0"

from curate.errors import CurateError  # noqa: E402

__all__ = ["CurateError", "__version__"]
