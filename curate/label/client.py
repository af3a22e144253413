"""Connection to an Argilla server: settings from config or environment, one-line errors, retries.

`ARGILLA_API_URL` / `ARGILLA_API_KEY` (the SDK's own variables) are the defaults; a config value wins.
Every call that goes over the network runs through :func:`with_retries`: connection errors and 5xx
answers are retried with exponential backoff, anything else (401, 404, 422) fails at once.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from curate.errors import ConfigError, ExternalServiceError

T = TypeVar("T")

DEFAULT_WORKSPACE = "curate"


@dataclass(frozen=True)
class Connection:
    api_url: str
    api_key: str


def connection_settings(api_url: str | None = None, api_key: str | None = None) -> Connection | None:
    """The server to talk to, or None when no URL is configured (label stages then skip)."""
    url = (api_url or os.environ.get("ARGILLA_API_URL") or "").strip().rstrip("/")
    if not url:
        return None
    key = (api_key or os.environ.get("ARGILLA_API_KEY") or "").strip()
    if not key:
        raise ConfigError(f"Argilla at {url}: no API key; set ARGILLA_API_KEY or the config's api_key")
    return Connection(url, key)


def require_connection(api_url: str | None = None, api_key: str | None = None) -> Connection:
    connection = connection_settings(api_url, api_key)
    if connection is None:
        raise ConfigError("no Argilla server configured: set ARGILLA_API_URL (and ARGILLA_API_KEY) or pass --api-url")
    return connection


def check_server(connection: Connection, timeout: float = 10.0) -> dict:
    """`GET /api/v1/me`: the one place a down server or a wrong key becomes a clear message."""
    import requests

    try:
        response = requests.get(
            f"{connection.api_url}/api/v1/me", headers={"X-Argilla-Api-Key": connection.api_key}, timeout=timeout
        )
    except requests.RequestException as error:
        reason = type(error).__name__
        raise ExternalServiceError(
            f"cannot reach Argilla at {connection.api_url} ({reason}); is the server running? (curate label serve)"
        ) from None
    if response.status_code == 401:
        raise ExternalServiceError(f"Argilla at {connection.api_url} rejected the API key (HTTP 401)")
    if response.status_code != 200:
        raise ExternalServiceError(f"Argilla at {connection.api_url} answered HTTP {response.status_code} to /api/v1/me")
    return response.json()


def connect(connection: Connection):
    """A checked `argilla.Argilla` client."""
    check_server(connection)
    import argilla as rg

    with quiet_sdk():
        return rg.Argilla(api_url=connection.api_url, api_key=connection.api_key, timeout=60)


def is_transient(error: BaseException) -> bool:
    """Connection trouble or a 5xx answer: worth another try."""
    import httpx
    import requests
    from argilla._exceptions import ArgillaAPIError

    if isinstance(error, (httpx.TransportError, requests.ConnectionError, requests.Timeout, ConnectionError)):
        return True
    if isinstance(error, ArgillaAPIError):
        return (getattr(error, "status_code", 0) or 0) >= 500
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return error.response.status_code >= 500
    cause = error.__cause__ or error.__context__
    return cause is not None and cause is not error and is_transient(cause)


def with_retries(
    call: Callable[[], T],
    what: str,
    connection: Connection,
    max_retries: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    on_retry: Callable[[str], None] = lambda message: None,
) -> T:
    """Run `call`, retrying transient failures with exponential backoff (0.5 s, 1 s, 2 s, ... ≤ 8 s)."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - classified just below
            if not is_transient(error):
                raise ExternalServiceError(f"Argilla at {connection.api_url}: {what} failed: {_short(error)}") from None
            attempt += 1
            if attempt > max_retries:
                raise ExternalServiceError(
                    f"Argilla at {connection.api_url}: {what} failed after {max_retries} retries: {_short(error)}"
                ) from None
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            on_retry(f"{what}: {_short(error)}; retry {attempt}/{max_retries} in {delay:.1f} s")
            time.sleep(delay)


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


@contextlib.contextmanager
def quiet_sdk():
    """The SDK draws tqdm bars and warnings on stderr; our own rich progress replaces them."""
    import logging
    import warnings

    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = logging.getLogger("argilla")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


class RestApi:
    """Plain REST calls for what the SDK does not expose as-is (raw ranking answers with their ranks,
    progress per annotator), through the same retry policy."""

    def __init__(self, connection: Connection, max_retries: int = 5):
        import requests

        self.connection = connection
        self.max_retries = max_retries
        self.session = requests.Session()
        self.session.headers["X-Argilla-Api-Key"] = connection.api_key

    def call(self, method: str, path: str, what: str | None = None, **kwargs):
        def attempt():
            response = self.session.request(method, f"{self.connection.api_url}{path}", timeout=60, **kwargs)
            response.raise_for_status()
            return response.json()

        return with_retries(attempt, what or f"{method} {path}", self.connection, self.max_retries)

    def find_dataset(self, name: str, workspace: str) -> dict | None:
        workspaces = self.call("GET", "/api/v1/me/workspaces", "listing workspaces")["items"]
        workspace_ids = {item["id"] for item in workspaces if item["name"] == workspace}
        datasets = self.call("GET", "/api/v1/me/datasets", "listing datasets")["items"]
        for item in datasets:
            if item["name"] == name and item["workspace_id"] in workspace_ids:
                return item
        return None

    def usernames(self) -> dict[str, str]:
        users = self.call("GET", "/api/v1/users", "listing users")["items"]
        return {item["id"]: item["username"] for item in users}
