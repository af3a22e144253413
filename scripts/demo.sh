#!/usr/bin/env bash
# The main job: set up, curate sample_data/ end to end, then train a LoRA on the curated SFT split
# (SmolLM2-135M-Instruct on CPU, a few minutes) and compare base vs adapter validation loss.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/curate run sample_data/pipeline.yaml
.venv/bin/train sft --config configs/demo_sft.yaml
