"""Annotator accounts on an Argilla server: create one, list them.

A new user gets a random password; the server makes their API key. Both come back to the caller once
(the CLI prints them on stdout) and are never written anywhere by us: not in a file, not in a log, not in
an error message. The owner's key (the connection) is what creates them.

Plain REST calls (`POST /api/v1/users`, `POST /api/v1/workspaces/{id}/users`): the SDK's `rg.User` does
the same calls but hides the new user's API key, which an annotator scripting against the API needs.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from curate.errors import ConfigError, ExternalServiceError
from curate.label.client import DEFAULT_WORKSPACE, Connection, RestApi, check_server

ROLES = ("annotator", "admin")
# Printable, shell-safe and usable as the UI's sign-in name; Argilla itself only asks for one character.
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$"


@dataclass(frozen=True)
class NewUser:
    username: str
    role: str
    workspace: str
    # repr=False: a NewUser printed by accident (a debugger, a log line) does not show the secrets.
    password: str = field(repr=False)
    api_key: str = field(repr=False)


def check_username(username: str) -> str:
    if not re.fullmatch(USERNAME_PATTERN, username or ""):
        raise ConfigError(f"user name {username!r}: use 1-100 letters, digits, '_', '.', '@' or '-' (a letter or digit first)")
    return username


def _workspace_id(api: RestApi, name: str) -> str:
    """The id of workspace `name`, created when missing (the owner may)."""
    workspaces = api.call("GET", "/api/v1/me/workspaces", "listing workspaces")["items"]
    for item in workspaces:
        if item["name"] == name:
            return item["id"]
    return api.call("POST", "/api/v1/workspaces", f"creating workspace {name!r}", json={"name": name})["id"]


def add_user(
    connection: Connection, username: str, role: str = "annotator", workspace: str = DEFAULT_WORKSPACE, max_retries: int = 5
) -> NewUser:
    """Create `username` with a random password, add them to `workspace`; their credentials are returned."""
    check_username(username)
    if role not in ROLES:
        raise ConfigError(f"role {role!r}: use one of {', '.join(ROLES)}")
    check_server(connection)
    api = RestApi(connection, max_retries)
    if any(item["username"] == username for item in api.call("GET", "/api/v1/users", "listing users")["items"]):
        raise ConfigError(f"user {username!r} already exists on {connection.api_url}")
    workspace_id = _workspace_id(api, workspace)
    password = secrets.token_urlsafe(18)
    body = {"first_name": username, "username": username, "role": role, "password": password}
    # No retry: a create the server did but whose answer was lost would come back as "not unique".
    creating = RestApi(connection, max_retries=0)
    try:
        created = creating.call("POST", "/api/v1/users", f"creating user {username!r}", json=body)
    except ExternalServiceError as error:
        raise ExternalServiceError(str(error).replace(password, "***")) from None
    api.call("POST", f"/api/v1/workspaces/{workspace_id}/users", f"adding {username!r} to {workspace!r}", json={"user_id": created["id"]})
    return NewUser(username=username, role=role, workspace=workspace, password=password, api_key=created["api_key"])


def list_users(connection: Connection, max_retries: int = 5) -> list[dict]:
    """Every user: username, role and the workspaces they belong to (never their keys)."""
    check_server(connection)
    api = RestApi(connection, max_retries)
    users = api.call("GET", "/api/v1/users", "listing users")["items"]
    member_of: dict[str, list[str]] = {}
    for workspace in api.call("GET", "/api/v1/me/workspaces", "listing workspaces")["items"]:
        members = api.call("GET", f"/api/v1/workspaces/{workspace['id']}/users", f"listing users of {workspace['name']!r}")["items"]
        for member in members:
            member_of.setdefault(member["id"], []).append(workspace["name"])
    rows = [
        {"username": user["username"], "role": user["role"], "workspaces": sorted(member_of.get(user["id"], []))}
        for user in users
    ]
    return sorted(rows, key=lambda row: row["username"])
