"""Experiment tracking beside metrics.jsonl: `report_to: [tensorboard]` writes the same scalars as
TensorBoard event files under <output_dir>/tensorboard (local, no account). `none` (the default) writes
nothing. The tracker only mirrors records the loop already has: it never reads the device."""

from __future__ import annotations

from pathlib import Path

from train.errors import TrainConfigError

# metrics.jsonl key -> TensorBoard tag (grouped by prefix in the UI)
TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
    "reward_chosen": "train/rewards/chosen", "reward_rejected": "train/rewards/rejected",
    "reward_margin": "train/rewards/margin", "reward_accuracy": "train/rewards/accuracy",
}  # fmt: skip


def tag_of(key: str) -> str | None:
    if key in TAGS:
        return TAGS[key]
    if key.startswith("val_"):
        return "eval/" + key[len("val_") :]
    return None


class Tracker:
    """Fans records out to the configured trackers; a no-op for `none`."""

    def __init__(self, report_to: list[str], output_dir: Path, resume_step: int | None):
        self.writers = []
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainConfigError("report_to: tensorboard needs the tensorboard package: pip install 'curate-train[track]'") from None
            # purge_step drops events a killed run logged past the checkpoint being resumed.
            purge = resume_step + 1 if resume_step else None
            self.writers.append(SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge))

    def log(self, record: dict, step: int) -> None:
        for writer in self.writers:
            for key, value in record.items():
                tag = tag_of(key)
                if tag and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(tag, value, step)

    def log_final(self, final: dict, step: int) -> None:
        """End-of-run comparison: base vs adapter (SFT) or the validation DPO metrics."""
        for writer in self.writers:
            for key, value in final.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"final/{key}", value, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
