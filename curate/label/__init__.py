"""Human labeling in Argilla: a local server launcher (`server`), push (`push`, `schema`), pull and
aggregation (`pull`, `aggregate`), progress (`status`). See docs/labeling.md."""
