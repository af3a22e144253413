"""`curate label status`: labeling progress per dataset and per annotator."""

from __future__ import annotations

from curate.label import schema
from curate.label.client import Connection, RestApi, check_server


def labeling_status(connection: Connection, dataset: str, workspace: str, max_retries: int = 5) -> dict:
    """{dataset name: {total, completed, pending, annotators: {username: {submitted, draft, discarded}}}}

    `completed` records have reached the dataset's min_submitted; per annotator, counts are summed over
    completed and pending records."""
    check_server(connection)
    api = RestApi(connection, max_retries)
    result: dict = {}
    for kind in ("sft", "preference"):
        name = schema.dataset_name(dataset, kind)
        found = api.find_dataset(name, workspace)
        if found is None:
            continue
        progress = api.call("GET", f"/api/v1/datasets/{found['id']}/progress", f"progress of {name!r}")
        users = api.call("GET", f"/api/v1/datasets/{found['id']}/users/progress", f"annotators of {name!r}")["users"]
        annotators = {}
        for user in users:
            totals = {}
            for part in ("completed", "pending"):
                for status, count in (user.get(part) or {}).items():
                    totals[status] = totals.get(status, 0) + int(count or 0)
            annotators[user["username"]] = {key: totals.get(key, 0) for key in ("submitted", "draft", "discarded")}
        result[name] = {
            "total": int(progress.get("total", 0)),
            "completed": int(progress.get("completed", 0)),
            "pending": int(progress.get("pending", 0)),
            "annotators": dict(sorted(annotators.items())),
        }
    return result
