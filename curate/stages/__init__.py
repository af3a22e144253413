"""Built-in pipeline stages, one module per concern; each registers its stages with
`curate.stage.register_stage` when imported.

`MODULES` says which module registers which built-in type, so looking up one type imports only its
module (a dedup run does not pay for the tagging or labeling imports). Listing every stage
(`registered_stages`) or an unknown type still imports them all.
"""

MODULES = {
    "decontaminate": "tag",
    "dedup": "dedup",
    "filter": "filter",
    "ingest": "ingest",
    "label_pull": "label",
    "label_push": "label",
    "mix": "mix",
    "pii": "tag",
    "split": "split",
    "tag": "tag",
}
