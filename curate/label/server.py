"""Launcher of a local Argilla for a small team on one machine: SQLite, Redis, the osmem search emulator.

The server is a service with its own virtualenv (`.venv-argilla/` in the repo root, made on demand):
argilla-server's dependencies (click < 8.2 among them) do not fit the main environment. Three processes,
all bound to 127.0.0.1 and all recorded by pid in the server home so `stop` ends exactly what `start`
started:

- `redis-server` (Debian package; Argilla pings it at start-up and queues jobs in it),
- `osmem-server`, the OpenSearch emulator binary shipped in the `osmem-server` wheel (in memory: the
  index is rebuilt from the database whenever the emulator is started fresh),
- `server_main.py` under the server venv: migrates the database, ensures the owner user, serves
  `argilla_server:app` with uvicorn using the `osmem-opensearch` engine of `osmem_engine.py`.

The owner's URL, username, password and API key are written to `<home>/owner.json` (mode 0600); the
CLI prints that file's location, never the key. `curate label serve/stop` and the test fixture use
this module alike.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from curate.atomic import write_json
from curate.errors import ExternalServiceError
from safety.ownership import claim_dir
from safety.secret_files import ensure_secret_file, private_dir, write_secret_json

REPO_ROOT = Path(__file__).resolve().parents[2]
# In a checkout: beside the code (both git-ignored). Installed as a package: the user's cache.
_BASE = REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.home() / ".cache" / "curate"
DEFAULT_HOME = _BASE / ".argilla"
DEFAULT_VENV = _BASE / ".venv-argilla"
SERVER_REQUIREMENTS = ["argilla-server==2.8.0", "osmem-server==0.1.6"]
ENGINE_NAME = "osmem-opensearch"
OWNER_FILE = "owner.json"
STATE_FILE = "server.json"
HERE = Path(__file__).resolve().parent

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ServerInfo:
    url: str
    home: Path
    owner_file: Path  # URL, username, password and API key of the owner (mode 0600)

    @property
    def api_key(self) -> str:
        return json.loads(self.owner_file.read_text())["api_key"]


def _quiet(message: str) -> None:
    pass


def server_venv() -> Path:
    return Path(os.environ.get("CURATE_ARGILLA_VENV", DEFAULT_VENV))


def server_home(home: str | Path | None = None) -> Path:
    return Path(home or os.environ.get("CURATE_ARGILLA_HOME") or DEFAULT_HOME).resolve()


def claim_server_home(home: str | Path | None = None) -> Path:
    """The server home as a folder of ours: new, empty or carrying curate's marker (the default home, a
    location curate chose, is adopted as it was left by versions before markers). A user's folder is
    refused before the server writes its database, logs and owner key into it."""
    resolved = server_home(home)
    return claim_dir(resolved, "curate", "argilla-home", option="--home", adopt_unmarked=resolved == DEFAULT_HOME.resolve())


def ensure_server_venv(venv: Path | None = None, progress: Progress = _quiet) -> Path:
    """Create the server's virtualenv and install argilla-server + osmem-server if not done yet.

    A marker file written last tells a complete install from one interrupted half way."""
    venv = Path(venv or server_venv())
    marker = venv / ".curate-argilla-ready"
    python = venv / "bin" / "python"
    if marker.exists() and marker.read_text().split() == SERVER_REQUIREMENTS and python.exists():
        return python
    progress(f"creating the Argilla server environment in {venv} (first time: about 100 s)")
    base_python = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    commands = [
        [base_python, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *SERVER_REQUIREMENTS],
    ]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise ExternalServiceError(f"installing the Argilla server environment failed: {tail}")
    marker.write_text(" ".join(SERVER_REQUIREMENTS) + "\n")
    return python


def ensure_redis(progress: Progress = _quiet) -> str:
    """Path of `redis-server`; installs Debian's package when missing and we are root."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        progress("installing redis-server with apt-get")
        install = ["apt-get", "install", "-y", "-qq", "redis-server"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(install, capture_output=True, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
            subprocess.run(install, capture_output=True, env=env)
        found = shutil.which("redis-server")
        if found:
            return found
    raise ExternalServiceError("redis-server not found: install it (Debian: apt-get install -y redis-server)")


def free_port(avoid: tuple[int, ...] = ()) -> int:
    """A port nothing listens on now (the kernel's choice), other than those in `avoid`."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int | None, expect: str) -> bool:
    """True when `pid` runs and its command line mentions `expect` (a recycled pid is not ours).

    For pids read back from the state file. Not for a process just started: Popen returns before the
    kernel has finished exec (its /proc cmdline is empty for a while, long on a busy machine), so a
    process we spawned is watched through its Popen (`poll()`), which also gives its exit status."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (OSError, IndexError):
        status = "?"
    return expect in cmdline and status != "Z"


def _read_state(home: Path) -> dict:
    try:
        return json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class ServiceProcess:
    """A service process started by `spawn_service`, with where its own output starts in its log (logs
    are appended to across restarts; an error names a line of this run, never of an earlier one)."""

    process: subprocess.Popen
    log: Path
    log_offset: int

    def exited(self) -> bool:
        return self.process.poll() is not None

    def exit_cause(self) -> str:
        """One line: how the process ended and the line of its output that says why."""
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        return f"{how}: {_log_reason(self.log, self.log_offset)} (log: {self.log})"


def spawn_service(command: list[str], log: Path, env: dict | None = None) -> ServiceProcess:
    """Start `command` in a session of its own, stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as handle:
        # A new session: the service outlives the `curate label serve` that started it.
        # umask 077: whatever a service creates in the home (the database and its journals, which hold
        # the owner's API key) is private to this user.
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, umask=0o077,
        )
    return ServiceProcess(process, log, offset)


_ERROR_LINE = re.compile(r"error|exception|fatal|fail|abort|denied|cannot|can't|unable", re.IGNORECASE)


def _clip(line: str, limit: int = 300) -> str:
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _log_reason(log: Path, offset: int = 0) -> str:
    """The line of a service's log (from `offset`: its own run) that names why it stopped: the exception
    of the last traceback, else a line saying 'address already in use', else the last line that reads
    like an error, else the last line."""
    try:
        with open(log, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return "no log"
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "it wrote nothing to its log"
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if tracebacks:
        after = lines[tracebacks[-1] + 1 :]
        exception = next((line for line in after if not line[0].isspace()), None)
        if exception:
            return _clip(exception)
    for line in reversed(lines):
        if "address already in use" in line.lower():
            return _clip(line)
    for line in reversed(lines):
        if _ERROR_LINE.search(line) and "warning" not in line.lower():
            return _clip(line)
    return _clip(lines[-1])


def _wait_port(port: int, timeout: float, what: str, started: ServiceProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.exited():  # first: an exit for 'address already in use' means the port is someone else's
            raise ExternalServiceError(f"{what} exited during start-up ({started.exit_cause()})")
        if _port_open(port):
            return
        time.sleep(0.1)
    raise ExternalServiceError(f"{what} did not start on port {port} within {timeout:.0f} s (log: {started.log})")


def _start_redis(home: Path, state: dict, progress: Progress) -> None:
    if _pid_alive(state.get("redis_pid"), "redis-server") and _port_open(state["redis_port"]):
        return
    binary = ensure_redis(progress)
    port = free_port(avoid=_ports(state))
    # In the foreground of its own session, like the other two: the pid is the Popen's (a daemonized
    # redis writes its pidfile after it listens, so reading the pidfile raced with it).
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(home), "--save", "", "--appendonly", "no"]
    started = spawn_service(command, home / "logs" / "redis.log")
    _wait_port(port, 60, "redis-server", started)
    state.update(redis_port=port, redis_pid=started.process.pid)


def _ports(state: dict) -> tuple[int, ...]:
    """Ports the state file remembers (a restarted Argilla takes its old port again)."""
    return tuple(state[key] for key in ("redis_port", "osmem_port", "argilla_port") if state.get(key))


def _start_osmem(home: Path, python: Path, state: dict) -> bool:
    """Start the search emulator; True when it was started fresh (its index is then empty)."""
    if _pid_alive(state.get("osmem_pid"), "osmem-server") and _port_open(state["osmem_port"]):
        return False
    binary = subprocess.run(
        [str(python), "-c", "import osmem_server; print(osmem_server.resolve_binary())"], capture_output=True, text=True
    )
    if binary.returncode != 0:
        raise ExternalServiceError(f"osmem-server binary not found in {python.parent.parent}: {binary.stderr.strip()}")
    port = free_port(avoid=_ports(state))
    command = [binary.stdout.strip(), "--addr", f"127.0.0.1:{port}", "--no-stdin-watch", "--no-ja"]
    started = spawn_service(command, home / "logs" / "osmem.log")
    _wait_port(port, 60, "osmem-server", started)
    state.update(osmem_port=port, osmem_pid=started.process.pid)
    return True


def _owner(home: Path) -> dict:
    owner_file = home / OWNER_FILE
    try:
        return json.loads(owner_file.read_text())
    except (OSError, ValueError):
        owner = {
            "username": "owner",
            "password": secrets.token_urlsafe(12),
            "api_key": "owner.apikey." + secrets.token_urlsafe(24),
        }
        write_secret_json(owner_file, owner)
        return owner


def wait_ready(url: str, api_key: str, timeout: float = 120.0, started: ServiceProcess | None = None) -> None:
    """Poll `/api/v1/me` with the API key until it answers 200 (`/api/v1/status` may answer 422).

    With `started` (the process this call spawned), its exit ends the wait with the cause."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{url}/api/v1/me", headers={"X-Argilla-Api-Key": api_key}, timeout=5)
            if response.status_code == 200:
                return
        except requests.RequestException:
            pass
        if started is not None and started.exited():
            raise ExternalServiceError(f"the Argilla server exited during start-up ({started.exit_cause()})")
        time.sleep(0.25)
    where = f" (log: {started.log})" if started is not None else ""
    raise ExternalServiceError(f"the Argilla server at {url} was not ready within {timeout:.0f} s{where}")


def start_server(
    home: str | Path | None = None, port: int | None = None, timeout: float = 180.0, progress: Progress = _quiet
) -> ServerInfo:
    """Start (or find already running) the local Argilla in `home`; returns once it answers."""
    # Created 0700 when new (secrets go inside), then claimed: a user's existing folder is refused.
    home = claim_server_home(private_dir(server_home(home)))
    state = _read_state(home)
    owner = _owner(home)
    if _pid_alive(state.get("argilla_pid"), "server_main.py") and _port_open(state.get("argilla_port", 0)):
        url = f"http://127.0.0.1:{state['argilla_port']}"
        wait_ready(url, owner["api_key"], timeout)
        return ServerInfo(url=url, home=home, owner_file=home / OWNER_FILE)

    python = ensure_server_venv(progress=progress)
    progress("starting redis-server")
    _start_redis(home, state, progress)
    write_json(home / STATE_FILE, state)  # each pid recorded at once: `stop` ends it even if a later step fails
    progress("starting the osmem search emulator")
    fresh_index = _start_osmem(home, python, state)
    write_json(home / STATE_FILE, state)

    if port is None:
        # The port of the last run (a stable URL) unless something else listens there now.
        port = state.get("argilla_port")
        if not port or _port_open(port):
            port = free_port(avoid=_ports(state))
    elif _port_open(port):
        raise ExternalServiceError(f"port {port} is already in use; choose another with --port")
    env = {
        **os.environ,
        "ARGILLA_HOME_PATH": str(home),
        "ARGILLA_DATABASE_URL": f"sqlite+aiosqlite:///{home / 'argilla.db'}",
        "ARGILLA_ELASTICSEARCH": f"http://127.0.0.1:{state['osmem_port']}",
        "ARGILLA_SEARCH_ENGINE": ENGINE_NAME,
        "ARGILLA_REDIS_URL": f"redis://127.0.0.1:{state['redis_port']}/0",
        "ARGILLA_ENABLE_TELEMETRY": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "CURATE_ARGILLA_OWNER": owner["username"],
        "CURATE_ARGILLA_OWNER_PASSWORD": owner["password"],
        "CURATE_ARGILLA_OWNER_KEY": owner["api_key"],
    }
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    ensure_secret_file(home / "argilla.db")  # holds the owner's API key: 0600 before the server opens it
    command = [str(python), str(HERE / "server_main.py"), "--port", str(port)]
    if fresh_index and (home / "argilla.db").stat().st_size:
        command.append("--reindex")
    progress(f"starting Argilla on port {port}")
    started = spawn_service(command, home / "logs" / "argilla.log", env)
    state.update(argilla_port=port, argilla_pid=started.process.pid)
    write_json(home / STATE_FILE, state)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, owner["api_key"], timeout, started=started)
    except ExternalServiceError:
        # Not ready in time: a failed `serve` leaves no web server behind (Redis and osmem stay, recorded).
        _terminate(started.process.pid, "server_main.py")
        raise
    info = ServerInfo(url=url, home=home, owner_file=home / OWNER_FILE)
    write_secret_json(home / OWNER_FILE, {**owner, "url": url})
    return info


def _terminate(pid: int | None, expect: str, grace: float = 10.0) -> bool:
    if not _pid_alive(pid, expect):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _pid_alive(pid, expect):
        time.sleep(0.05)
    if _pid_alive(pid, expect):
        os.kill(pid, signal.SIGKILL)
        while _pid_alive(pid, expect):
            time.sleep(0.05)
    # Reap it when it is our own child (a test that started it in this process).
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def stop_server(home: str | Path | None = None, services: bool = True) -> list[str]:
    """Stop what `start_server` started in `home` (only the Argilla process when services=False:
    Redis and the search index then stay, as when only the web server is restarted)."""
    home = server_home(home)
    state = _read_state(home)
    stopped = []
    if _terminate(state.get("argilla_pid"), "server_main.py"):
        stopped.append("argilla")
    if services:
        if _terminate(state.get("osmem_pid"), "osmem-server"):
            stopped.append("osmem-server")
        if _terminate(state.get("redis_pid"), "redis-server"):
            stopped.append("redis-server")
    return stopped


def server_processes(home: str | Path | None = None) -> dict[str, bool]:
    home = server_home(home)
    state = _read_state(home)
    return {
        "argilla": _pid_alive(state.get("argilla_pid"), "server_main.py"),
        "osmem-server": _pid_alive(state.get("osmem_pid"), "osmem-server"),
        "redis-server": _pid_alive(state.get("redis_pid"), "redis-server"),
    }
