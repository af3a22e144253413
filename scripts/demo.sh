#!/usr/bin/env bash
# The main job: set up, curate sample_data/ end to end, then train a LoRA on the curated SFT split
# (SmolLM2-135M-Instruct on CPU, a few minutes) and compare base vs adapter validation loss.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/curate run sample_data/pipeline.yaml
.venv/bin/train sft --config configs/demo_sft.yaml
cat <<TXT

Where things are:
  runs/sample/manifest.json     every input row: kept, dropped (stage, reason) or quarantined
  runs/sample/report.html       funnel, reasons, lengths, clusters, languages (open in a browser)
  runs/sample/quarantine.parquet  rows that could not be read, with file, row, reason and raw text
  runs/sample/sft/  runs/sample/pref/   train/validation/test Parquet shards + dataset cards
  runs/sample/train-sft/        LoRA adapter, metrics.jsonl, loss.png, checkpoints
TXT
