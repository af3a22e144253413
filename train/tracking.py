"""Experiment tracking beside metrics.jsonl, local only: `report_to: [tensorboard]` writes the scalars as
TensorBoard event files under <output_dir>/tensorboard, `report_to: [trackio]` into a trackio SQLite store
under <output_dir>/trackio (never a Space or a server). `none` (the default) writes nothing. The trackers
only mirror records the loop already has: they never read the device."""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import sys
from pathlib import Path

from train.errors import TrainConfigError

# metrics.jsonl key -> tracker tag (grouped by prefix in the UIs)
TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
    "reward_chosen": "train/rewards/chosen", "reward_rejected": "train/rewards/rejected",
    "reward_margin": "train/rewards/margin", "reward_accuracy": "train/rewards/accuracy",
}  # fmt: skip
TRACKIO_PROJECT = "train"  # `TRACKIO_DIR=<output_dir>/trackio trackio show --project train`
TRACKIO_RUN = "run"
# Variables that would send a trackio run to a Space or a server instead of the local store.
TRACKIO_REMOTE_ENV = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID")


def tag_of(key: str) -> str | None:
    if key in TAGS:
        return TAGS[key]
    if key.startswith("val_"):
        return "eval/" + key[len("val_") :]
    return None


def _numbers(items) -> dict[str, float]:
    return {tag: value for tag, value in items if tag and isinstance(value, (int, float)) and not isinstance(value, bool)}


class _TensorBoard:
    def __init__(self, output_dir: Path, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainConfigError("report_to: tensorboard needs the tensorboard package: pip install 'curate-train[track]'") from None
        # purge_step drops events a killed run logged past the checkpoint being resumed.
        purge = resume_step + 1 if resume_step else None
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge)

    def write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def _without_remote_env():
    saved = {name: os.environ.pop(name) for name in TRACKIO_REMOTE_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class _Trackio:
    """A trackio run whose store is <output_dir>/trackio. trackio reads TRACKIO_DIR once, at import, into
    module constants; they point at this run's folder while it is open, and back when it closes."""

    DIR_NAMES = {"TRACKIO_DIR": "", "MEDIA_DIR": "media", "ARTIFACTS_DIR": "artifacts"}

    def __init__(self, output_dir: Path, resume_step: int | None):
        try:
            import trackio
        except ImportError:
            raise TrainConfigError("report_to: trackio needs the trackio package: pip install 'curate-train[track]'") from None
        self.folder = output_dir / "trackio"
        self.saved = self._point_at(self.folder)
        if resume_step:
            self._drop_steps_after(resume_step)
        with _without_remote_env(), contextlib.redirect_stdout(io.StringIO()):  # trackio prints dashboard hints
            self.run = trackio.init(
                project=TRACKIO_PROJECT, name=TRACKIO_RUN, space_id=None, server_url=None, resume="allow" if resume_step else "never",
                auto_log_cpu=False, auto_log_gpu=False, embed=False,
            )  # fmt: skip

    def _point_at(self, folder: Path) -> list[tuple[object, str, object]]:
        saved = [(None, "TRACKIO_DIR", os.environ.get("TRACKIO_DIR"))]
        os.environ["TRACKIO_DIR"] = str(folder)
        for module in [m for name, m in list(sys.modules.items()) if name == "trackio" or name.startswith("trackio.")]:
            for attr, sub in self.DIR_NAMES.items():
                if isinstance(getattr(module, attr, None), Path):
                    saved.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, folder / sub if sub else folder)
        return saved

    def _drop_steps_after(self, step: int) -> None:
        """A resumed run continues the curve from its checkpoint: rows a killed run logged past it go."""
        from trackio.sqlite_storage import SQLiteStorage

        db = SQLiteStorage.get_project_db_path(TRACKIO_PROJECT)
        if db.is_file():
            with contextlib.closing(sqlite3.connect(db)) as conn, conn:
                conn.execute("DELETE FROM metrics WHERE run_name = ? AND step > ?", (TRACKIO_RUN, step))

    def write(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.run.finish()  # flushes the queued records into the SQLite store
        finally:
            from trackio import context_vars

            if context_vars.current_run.get() is self.run:  # else trackio's exit hook finishes it again, printing
                context_vars.current_run.set(None)
            for module, attr, value in reversed(self.saved):
                if module is not None:
                    setattr(module, attr, value)
                elif value is None:
                    os.environ.pop(attr, None)
                else:
                    os.environ[attr] = value


TRACKERS = {"tensorboard": _TensorBoard, "trackio": _Trackio}


class Tracker:
    """Fans records out to the configured trackers; a no-op for `none`."""

    def __init__(self, report_to: list[str], output_dir: Path, resume_step: int | None):
        self.writers = []
        try:
            for name in report_to:
                if name in TRACKERS:
                    self.writers.append(TRACKERS[name](output_dir, resume_step))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict, step: int) -> None:
        scalars = _numbers((tag_of(key), value) for key, value in record.items())
        for writer in self.writers if scalars else []:
            writer.write(scalars, step)

    def log_final(self, final: dict, step: int) -> None:
        """End-of-run comparison: base vs adapter (SFT) or the validation DPO metrics."""
        scalars = _numbers((f"final/{key}", value) for key, value in final.items())
        for writer in self.writers:
            writer.write(scalars, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []
