"""Built-in pipeline stages. Every module in this package is imported when the runner first looks up a
stage type, and registers its stages with `curate.stage.register_stage`."""
