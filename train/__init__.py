"""train: a thin LoRA trainer (SFT and DPO) on curated splits."""
