"""`curate` verbs: each module here defines `register(subparsers)` and is picked up by curate.cli."""
