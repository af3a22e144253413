"""Loss curves from metrics.jsonl, as a PNG: train and validation loss with the base model's validation
loss as a reference line (SFT), and for DPO a second panel with the reward margin and accuracy."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _series(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    final = next((r["final"] for r in reversed(records) if isinstance(r.get("final"), dict)), {})
    is_dpo = any("reward_margin" in r for r in records)
    fig, axes = plt.subplots(2 if is_dpo else 1, 1, figsize=(7, 6.5 if is_dpo else 4), dpi=100, sharex=True, squeeze=False)
    ax = axes[0][0]
    train, val = _series(records, "loss"), _series(records, "val_loss")
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    if isinstance(final.get("base_loss"), (int, float)):
        ax.axhline(final["base_loss"], color="gray", linestyle="--", linewidth=1, label="base model (validation)")
    ax.set_ylabel("loss")
    if is_dpo:
        rewards = axes[1][0]
        margin, accuracy = _series(records, "reward_margin"), _series(records, "reward_accuracy")
        if margin:
            rewards.plot(*zip(*margin), color="tab:green", linewidth=1, label="reward margin (train)")
        val_margin = _series(records, "val_reward_margin")
        if val_margin:
            rewards.plot(*zip(*val_margin), "o", color="tab:green", label="reward margin (validation)")
        rewards.axhline(0, color="gray", linewidth=0.5)
        rewards.set_ylabel("reward margin")
        share = rewards.twinx()
        if accuracy:
            share.plot(*zip(*accuracy), color="tab:purple", linewidth=1, label="reward accuracy (train)")
        share.set_ylim(-0.05, 1.05)
        share.set_ylabel("reward accuracy")
        handles = rewards.get_legend_handles_labels()[0] + share.get_legend_handles_labels()[0]
        rewards.legend(handles, [h.get_label() for h in handles], loc="best")
        rewards.grid(alpha=0.3)
    bottom = axes[-1][0]
    bottom.set_xlabel("optimizer step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
