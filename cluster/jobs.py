"""Training runs as Ray jobs, through the Ray Jobs API (served by the cluster's dashboard).

    submit(address, config, overrides, env_vars)   -> the submission id
    status(address, job_id)                        -> one line: the job's state (and why it failed)
    latest_metrics(address, job_id)                -> the run's last progress line, if any
    logs(address, job_id)                          -> the job's output so far
    stop(address, job_id)                          -> one line

The job runs ``python -m saferl.cli train CONFIG --set ...`` in a copy of this repository
uploaded as its ``working_dir`` (saferl/__init__.py makes cluster/, actors/, ... importable from
it); its driver joins the cluster through the $RAY_ADDRESS that Ray sets for it
(session.connect). ``python`` is whatever the cluster's PATH gives: start the cluster from the
environment saferl is installed in. Environment variables are never forwarded except those named
with ``--env``. Keep ``run_root`` absolute (or on shared storage): a relative one lands inside the
job's temporary copy of the repository.

Every failure, including an unreachable cluster or an unknown job id, is a one-line ConfigError.
"""
from __future__ import annotations

import os
import re
import shlex
import socket
from contextlib import contextmanager
from fnmatch import fnmatch
from urllib.parse import urlsplit

from saferl.config import REPO_ROOT, ConfigError, resolve_path

# Never uploaded: environments, outputs (runs, checkpoints, loggers' folders), VCS data, caches.
EXCLUDES = [".venv*", "runs", "*.pt", "tb", "wandb", "bench_results", ".git", "__pycache__", "*.egg-info",
            ".pytest_cache"]
CONNECT_TIMEOUT_S = 10
AUTH_HINT = ("token-authenticated cluster: export RAY_AUTH_MODE=token and its token as RAY_AUTH_TOKEN "
             "or in ~/.ray/auth_token")


def _url(address: str) -> str:
    return address if "://" in address else f"http://{address}"


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


@contextmanager
def _client(address: str, job_id: str | None = None):
    """A connected JobSubmissionClient; any failure inside becomes a one-line ConfigError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = _url(address)
    _check_reachable(url)
    try:
        client = JobSubmissionClient(url)
    except AuthenticationError as err:
        raise ConfigError(f"cluster error: {url}: {_one_line(err)} ({AUTH_HINT})") from None
    except Exception as err:  # noqa: BLE001 — e.g. a port that answers but is no Ray dashboard
        raise ConfigError(f"cluster error: no Ray Jobs API at {url} ({_one_line(err)})") from None
    try:
        yield client
    except ConfigError:
        raise
    except AuthenticationError as err:
        raise ConfigError(f"cluster error: {url}: {_one_line(err)} ({AUTH_HINT})") from None
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


def submit(address: str, config: str, overrides: list[str] | None = None,
           env_vars: list[str] | None = None) -> str:
    """Submit ``saferl train CONFIG --set ...`` as a job; returns its submission id."""
    path, implied = _repo_config_path(config)
    argv = ["python", "-m", "saferl.cli", "train", path]
    for pair in [f"{k}={v}" for k, v in implied.items()] + list(overrides or []):
        argv += ["--set", pair]
    missing = [name for name in env_vars or [] if name not in os.environ]
    if missing:
        raise ConfigError(f"submit error: --env {missing[0]} is not set in this shell")
    runtime_env = {"working_dir": str(REPO_ROOT), "excludes": EXCLUDES}
    if env_vars:
        runtime_env["env_vars"] = {name: os.environ[name] for name in env_vars}
    with _client(address) as client:
        return client.submit_job(entrypoint=shlex.join(argv), runtime_env=runtime_env)


def status(address: str, job_id: str) -> str:
    with _client(address, job_id) as client:
        info = client.get_job_info(job_id)
    line = f"{job_id}: {info.status.value}"
    if info.status.value in ("FAILED", "STOPPED") and info.message:
        line += f" ({info.message.strip().splitlines()[0]}; see `saferl logs {job_id} --address {address}`)"
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
