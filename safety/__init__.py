"""Promises both CLIs keep about the user's files and secrets, in one place so `curate` and `train`
cannot drift apart: which folders the tools own (and so may overwrite or remove), exclusive locks on
output folders, and redaction of credentials before anything is printed or persisted.

See docs/safety.md for the promises and the tests that hold them."""
