"""Training runs as Ray jobs, through the Ray Jobs API (served by the cluster's dashboard).

    submit(address, config, overrides, env_vars, python, cfg) -> the submission id
    status(address, job_id)                        -> one line: the job's state (and why it failed)
    latest_metrics(address, job_id)                -> the run's last progress line, if any
    logs(address, job_id)                          -> the job's output so far
    stop(address, job_id)                          -> one line

The job runs ``PYTHON -m saferl.cli train CONFIG --set ...`` in a copy of this repository
uploaded as its ``working_dir`` (saferl/__init__.py makes cluster/, actors/, ... importable from
it); its driver joins the cluster through the $RAY_ADDRESS that Ray sets for it
(session.connect). Environment variables are never forwarded except those named with ``--env``.
Keep ``run_root`` absolute (or on shared storage): a relative one lands inside the job's temporary
copy of the repository.

**Your own environment.** The config is validated here before anything is submitted
(``load_config``), which imports a custom task's package (envs/custom.py). When that package is
not installed in site-packages, its folder joins the job's ``runtime_env`` as ``py_modules``: Ray
uploads it with the job and puts it on the driver's ``sys.path``. The driver, validating the
config again, finds it there and ships it on to its env hosts as in a local run.

**The job's interpreter.** Ray runs an entrypoint with the shell of the head node, so a bare
``python`` would be whatever the PATH of ``ray start`` gave, which is not saferl's environment
when Ray was started as ``.venv/bin/ray start`` without activating ``.venv``. ``PYTHON`` is
therefore named explicitly: ``--python`` if given, else the interpreter Ray itself starts its
Python workers with on the head node (the ``--python_worker_command`` of the head's raylet, read
from the dashboard's node summary), i.e. the interpreter of the ``ray start`` that started the
head. When the cluster does not say (an older or trimmed dashboard), a cluster on this machine
gets this process's interpreter and any other one is refused in one line that names ``--python``.

**Token authentication.** Ray 2.60 clusters may require a token (``RAY_AUTH_MODE=token`` on the
cluster, or ``ray start`` finding ``~/.ray/auth_token``). Ray's own Jobs client sends one only when
this process has ``RAY_AUTH_MODE=token``. Here, when the cluster answers 401/403 and
``RAY_AUTH_MODE`` is not ``disabled`` in this shell, the token is looked up where Ray's
``AuthenticationTokenLoader`` looks, in its order (``$RAY_AUTH_TOKEN``, the file named by
``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and the request is retried once with it as the
``Authorization: Bearer`` header (the header Ray's own client sends). No token is ever sent to a
cluster that did not ask for one.

Every failure, including an unreachable cluster or an unknown job id, is a one-line ConfigError.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

from saferl import registry
from saferl.config import REPO_ROOT, ConfigError, load_config, resolve_path

# Never uploaded: environments, outputs (runs, checkpoints, loggers' folders), VCS data, caches.
EXCLUDES = [".venv*", "runs", "*.pt", "tb", "wandb", "bench_results", ".git", "__pycache__", "*.egg-info",
            ".pytest_cache"]
CONNECT_TIMEOUT_S = 10
AGENT_WAIT_S = 60  # a head that has just started may have no job agent registered yet
TOKEN_PLACES = "$RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
START_HINT = ("start Ray from saferl's environment (`.venv/bin/ray start ...` on every node) "
              "or name the head's interpreter with `saferl submit --python PATH`")
# Authorization headers found to work, per dashboard URL (one lookup per process and cluster).
_HEADERS: dict[str, dict] = {}


def _url(address: str) -> str:
    return (address if "://" in address else f"http://{address}").rstrip("/")


def _check_reachable(url: str) -> None:
    """Fail fast with a clear reason: the Ray SDK's own HTTP calls have no timeout."""
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"cluster error: bad address {url!r} (e.g. http://127.0.0.1:8265)") from None
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except ConnectionRefusedError:
        reason = "connection refused"
    except socket.gaierror:
        reason = "unknown host"
    except TimeoutError:
        reason = f"no answer in {CONNECT_TIMEOUT_S} s"
    except OSError as err:
        reason = err.strerror or err.__class__.__name__
    else:
        return
    raise ConfigError(f"cluster error: cannot reach Ray at {url} ({reason})")


def _one_line(err: Exception) -> str:
    text = str(err).strip() or err.__class__.__name__
    return text.splitlines()[0]


def local_token() -> tuple[str, str] | None:
    """The Ray auth token of this machine and where it came from, found as Ray 2.60's
    ``AuthenticationTokenLoader`` finds it: ``$RAY_AUTH_TOKEN`` if non-empty, else the file named
    by ``$RAY_AUTH_TOKEN_PATH`` (if set, nothing else is tried), else ``~/.ray/auth_token``;
    surrounding whitespace is dropped. None when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "$RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path, where = (Path(named), f"$RAY_AUTH_TOKEN_PATH ({named})") if named else (
        Path.home() / ".ray" / "auth_token", "~/.ray/auth_token")
    try:
        token = path.expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return (token, where) if token else None


def _connect(url: str):
    """A JobSubmissionClient, with this machine's Ray token if (and only if) the cluster asks."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if url in _HEADERS:
        return JobSubmissionClient(url, headers=dict(_HEADERS[url]))
    try:
        return JobSubmissionClient(url)
    except AuthenticationError as err:
        asked = err
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        raise ConfigError(f"cluster error: {url} requires a Ray auth token and RAY_AUTH_MODE=disabled "
                          "here; unset it (the token is then read from " + TOKEN_PLACES + ")")
    found = local_token()
    if found is None:
        raise ConfigError(f"cluster error: {url} requires a Ray auth token ({_one_line(asked)}) and none "
                          f"was found in {TOKEN_PLACES}; copy the head's ~/.ray/auth_token here")
    token, where = found
    headers = {"Authorization": f"Bearer {token}"}
    try:
        client = JobSubmissionClient(url, headers=dict(headers))
    except AuthenticationError as err:
        raise ConfigError(f"cluster error: {url} refused the Ray auth token from {where} "
                          f"({_one_line(err)}); use the head's token (`ray get-auth-token` there)") from None
    _HEADERS[url] = headers
    return client


@contextmanager
def _client(address: str, job_id: str | None = None):
    """A connected JobSubmissionClient; any failure inside becomes a one-line ConfigError."""
    from ray.exceptions import AuthenticationError

    url = _url(address)
    _check_reachable(url)
    try:
        client = _connect(url)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 — e.g. a port that answers but is no Ray dashboard
        raise ConfigError(f"cluster error: no Ray Jobs API at {url} ({_one_line(err)})") from None
    try:
        yield client
    except ConfigError:
        raise
    except AuthenticationError as err:
        raise ConfigError(f"cluster error: {url}: {_one_line(err)} (Ray auth token: {TOKEN_PLACES})") from None
    except Exception as err:  # noqa: BLE001
        if job_id is not None and ("status code 404" in str(err) or "does not exist" in str(err)):
            raise ConfigError(f"cluster error: no job {job_id!r} at {url}") from None
        raise ConfigError(f"cluster error: {url}: {_one_line(err)}") from None


def _repo_config_path(config: str) -> tuple[str, dict]:
    """The config's path relative to the repository root (the job's working directory), and the
    fields a short name implies (``resolve_path``)."""
    if not ((REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "cluster").is_dir()):
        raise ConfigError("submit error: saferl submit needs a source checkout (it uploads the repository)")
    path, implied = resolve_path(config)
    path = path.resolve()
    try:
        rel = path.relative_to(REPO_ROOT)
    except ValueError:
        rel = None
    if rel is None or any(fnmatch(part, pat) for part in rel.parts for pat in EXCLUDES):
        raise ConfigError(f"submit error: {config} is not uploaded with the job; "
                          f"copy it under {REPO_ROOT / 'configs'} and submit that")
    return rel.as_posix(), implied


def worker_python(cmdline: list[str]) -> str | None:
    """The interpreter in a raylet's command line: the first word of its
    ``--python_worker_command`` (the command Ray starts Python workers with on that node)."""
    for arg in cmdline:
        if arg.startswith("--python_worker_command="):
            try:
                words = shlex.split(arg.split("=", 1)[1])
            except ValueError:
                return None
            return words[0] if words and os.path.isabs(words[0]) else None
    return None


def head_python(client) -> str | None:
    """The interpreter Ray's Python workers use on the head node (where job drivers run), from the
    dashboard's node summary; None when the dashboard does not report it."""
    try:
        reply = client._do_request("GET", "/nodes?view=summary", timeout=CONNECT_TIMEOUT_S)
        nodes = reply.json()["data"]["summary"]
        head = next(n for n in nodes if n.get("raylet", {}).get("isHeadNode"))
    except Exception:  # noqa: BLE001 — any shape we do not know means "not reported"
        return None
    return worker_python(head.get("cmdline") or [])


def _is_this_machine(url: str) -> bool:
    """Whether the address is one of this machine's (loopback, or one a socket can bind to)."""
    try:
        ip = socket.gethostbyname(urlsplit(url).hostname or "")
        if ipaddress.ip_address(ip).is_loopback:
            return True
        with socket.socket() as s:
            s.bind((ip, 0))
        return True
    except (OSError, ValueError):
        return False


def job_python(client, url: str, python: str | None) -> str:
    """The interpreter that runs the job's driver: ``python`` if given, else the head's (above),
    else this process's one for a cluster on this machine; otherwise a one-line refusal."""
    if python:
        if not os.path.isabs(python):
            raise ConfigError(f"submit error: --python {python}: give an absolute path on the head node")
        return python
    found = head_python(client)
    if found:
        return found
    if _is_this_machine(url):
        return sys.executable
    raise ConfigError(f"submit error: {url} does not report the Python its head runs Ray with; "
                      "pass --python /path/on/the/head/.venv/bin/python (the interpreter saferl is installed in)")


def user_modules(cfg) -> list[str]:
    """Local folders (or files) the job must bring: a custom task's package when it is not
    installed here (``register_custom`` records it as the env hosts' ``py_modules``). The job's
    driver imports it to validate the config, so it goes into the job's own ``runtime_env``."""
    return list(registry.TASK_RUNTIME_ENVS.get(cfg.task, {}).get("py_modules", []))


def submit(address: str, config: str, overrides: list[str] | None = None,
           env_vars: list[str] | None = None, python: str | None = None, cfg=None) -> str:
    """Submit ``saferl train CONFIG --set ...`` as a job; returns its submission id. The config
    is validated here first (``load_config``, unless ``cfg`` is the already validated one), so
    bad input is one line before anything reaches the cluster."""
    path, implied = _repo_config_path(config)
    if cfg is None:
        cfg = load_config(config, overrides)
    argv = ["-m", "saferl.cli", "train", path]
    for pair in [f"{k}={v}" for k, v in implied.items()] + list(overrides or []):
        argv += ["--set", pair]
    missing = [name for name in env_vars or [] if name not in os.environ]
    if missing:
        raise ConfigError(f"submit error: --env {missing[0]} is not set in this shell")
    runtime_env = {"working_dir": str(REPO_ROOT), "excludes": EXCLUDES}
    modules = user_modules(cfg)
    if modules:  # local paths: Ray's Jobs client uploads them itself (job-level runtime_env)
        runtime_env["py_modules"] = modules
    if env_vars:
        runtime_env["env_vars"] = {name: os.environ[name] for name in env_vars}
    with _client(address) as client:
        interpreter = job_python(client, _url(address), python)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(entrypoint=shlex.join([interpreter, *argv]), runtime_env=runtime_env)
            except RuntimeError as err:  # a just-started head: "No available agent ..., try again later"
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(1)


# The last line of a Python traceback: "ModuleNotFoundError: No module named 'torch'".
_TRACEBACK = "Traceback (most recent call last):"
# saferl's own one-line errors ("config error: …", "checkpoint error: …", see saferl.cli.main).
_SAFERL_ERROR_RE = re.compile(r"^[a-z][a-z ]{0,30} error: .+$", re.MULTILINE)


# The shell's word when the entrypoint's interpreter is not there: "/bin/sh: 1: /x/python: not found".
_NOT_FOUND_RE = re.compile(r"^/bin/sh: (?:\d+: )?(\S+): (?:not found|No such file or directory)$", re.MULTILINE)


def failure_cause(text: str) -> str | None:
    """Why a driver failed, from its output: the exception line of the last traceback, else the
    last of saferl's one-line errors, else a missing interpreter; None when none is there."""
    if _TRACEBACK in text:
        for line in text.rsplit(_TRACEBACK, 1)[1].splitlines():
            if line.strip() and not line[0].isspace():
                return line.strip()
    found = _SAFERL_ERROR_RE.findall(text)
    if found:
        return found[-1].strip()
    missing = _NOT_FOUND_RE.findall(text)
    return f"{missing[-1]} does not exist on the node running the job ({START_HINT})" if missing else None


def _interpreter_hint(cause: str, entrypoint: str | None) -> str:
    if not re.match(r"(ModuleNotFoundError|ImportError)\b", cause):
        return ""
    try:
        python = shlex.split(entrypoint or "")[0]
    except (ValueError, IndexError):
        python = "the job's python"
    return f"; {python} lacks saferl's packages: {START_HINT}"


def status(address: str, job_id: str) -> str:
    with _client(address, job_id) as client:
        info = client.get_job_info(job_id)
        state = info.status.value
        line = f"{job_id}: {state}"
        if state not in ("FAILED", "STOPPED"):
            return line
        cause = failure_cause(client.get_job_logs(job_id) or "") if state == "FAILED" else None
    if cause:
        cause += _interpreter_hint(cause, info.entrypoint)
    elif info.message:  # Ray's reason, e.g. "runtime_env setup failed: ...", and its last detail
        lines = [ln.strip() for ln in info.message.strip().splitlines() if ln.strip()]
        cause, detail = lines[0], failure_cause(info.message) or lines[-1]
        if detail != cause:
            cause += f" ({detail})"
    if cause:
        line += f" ({cause}; see `saferl logs {job_id} --address {address}`)"
    return line


# The coordinator's progress line (Coordinator._progress), e.g.
# "it 3/10 | steps 6,000 | return 21.4 | cost 19.2 (limit 8) | λ 0.27 | steps/s 480".
PROGRESS_RE = re.compile(r"^it \d+/\d+ \| steps [\d,]+.*$", re.MULTILINE)


def latest_metrics(address: str, job_id: str) -> str | None:
    """The job's latest metrics: the last progress line its driver printed (the run directory
    is on whichever node ran the job; its logs reach us through the Jobs API)."""
    found = PROGRESS_RE.findall(logs(address, job_id))
    return found[-1].strip() if found else None


def logs(address: str, job_id: str) -> str:
    with _client(address, job_id) as client:
        return client.get_job_logs(job_id)


def stop(address: str, job_id: str) -> str:
    with _client(address, job_id) as client:
        if client.stop_job(job_id):
            return f"{job_id}: stop requested"
        return f"{job_id}: already finished ({client.get_job_status(job_id).value})"
