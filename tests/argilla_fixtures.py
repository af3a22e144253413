"""Session fixture: one real local Argilla (redis-server + osmem + argilla-server under uvicorn) for the
tests marked `argilla`, started through the same launcher as `curate label serve`.

The first run installs the server's virtualenv (`.venv-argilla/`, about 100 s); later runs start in
about 10 s. Also: annotator users that work as the web UI does, over plain HTTP with their own keys.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pytest
import requests


@dataclass
class ArgillaTestServer:
    url: str
    api_key: str
    home: object  # pathlib.Path

    def headers(self, api_key: str | None = None) -> dict:
        return {"X-Argilla-Api-Key": api_key or self.api_key}


@pytest.fixture(scope="session")
def argilla_server(tmp_path_factory):
    """A running local Argilla; stopped (all three processes) at the end of the session."""
    from curate.label.server import start_server, stop_server

    home = tmp_path_factory.mktemp("argilla-home")
    try:  # a start that fails half way still stops what it started (Redis, osmem)
        info = start_server(home, timeout=240)
        yield ArgillaTestServer(url=info.url, api_key=info.api_key, home=home)
    finally:
        stop_server(home)


@pytest.fixture
def argilla_env(argilla_server, monkeypatch):
    """ARGILLA_API_URL / ARGILLA_API_KEY pointing at the session server (as a user would set them)."""
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)
    return argilla_server


@dataclass
class Annotator:
    """One annotator: their own API key, talking to the REST API exactly as the UI does."""

    username: str
    api_key: str
    url: str

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        response = requests.request(
            method, f"{self.url}{path}", headers={"X-Argilla-Api-Key": self.api_key}, timeout=30, **kwargs
        )
        return response

    def dataset_id(self, name: str) -> str:
        response = self._call("GET", "/api/v1/me/datasets")
        response.raise_for_status()
        matches = [item["id"] for item in response.json()["items"] if item["name"] == name]
        assert matches, f"{self.username} cannot see dataset {name!r}"
        return matches[0]

    def pending_queue(self, dataset_id: str, limit: int = 1000) -> list[dict]:
        """The annotator's queue: records they have not answered yet (the UI's 'Pending' view)."""
        body = {
            "filters": {
                "and": [{"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]}]
            }
        }
        response = self._call(
            "POST",
            f"/api/v1/me/datasets/{dataset_id}/records/search",
            params={"include": "responses", "limit": limit},
            json=body,
        )
        response.raise_for_status()
        return [item["record"] for item in response.json()["items"]]

    def submit(self, record_id: str, values: dict, status: str = "submitted") -> requests.Response:
        """Submit one response; `values` maps question name → answer (ranking: [{"value", "rank"}])."""
        payload = {"values": {question: {"value": value} for question, value in values.items()}, "status": status}
        response = self._call("POST", f"/api/v1/records/{record_id}/responses", json=payload)
        assert response.status_code == 201, response.text
        return response


def create_annotators(server: ArgillaTestServer, workspace: str, count: int = 3, prefix: str = "annotator"):
    """Annotator users added to `workspace`; each one's API key is read as the owner
    (`GET /api/v1/users/{id}`: the SDK's user objects hide keys)."""
    owner = server.headers()
    workspaces = requests.get(f"{server.url}/api/v1/me/workspaces", headers=owner, timeout=30).json()["items"]
    matches = [item["id"] for item in workspaces if item["name"] == workspace]
    if matches:
        workspace_id = matches[0]
    else:
        created = requests.post(f"{server.url}/api/v1/workspaces", headers=owner, json={"name": workspace}, timeout=30)
        created.raise_for_status()
        workspace_id = created.json()["id"]
    annotators = []
    for index in range(count):
        username = f"{prefix}{index + 1}-{secrets.token_hex(3)}"
        created = requests.post(
            f"{server.url}/api/v1/users",
            headers=owner,
            json={"first_name": username, "username": username, "role": "annotator", "password": secrets.token_hex(8)},
            timeout=30,
        )
        assert created.status_code == 201, created.text
        user_id = created.json()["id"]
        added = requests.post(
            f"{server.url}/api/v1/workspaces/{workspace_id}/users", headers=owner, json={"user_id": user_id}, timeout=30
        )
        assert added.status_code in (200, 201), added.text
        user = requests.get(f"{server.url}/api/v1/users/{user_id}", headers=owner, timeout=30).json()
        annotators.append(Annotator(username=username, api_key=user["api_key"], url=server.url))
    return annotators
