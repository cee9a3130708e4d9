"""The services of the stack and the command that starts each one.

``make run`` starts these commands as local processes; ``docker-compose.yml`` and the Kubernetes
manifests run the same commands in containers (a test checks they agree). A local stack gets
client secrets of its own for the calling services (shared/service_auth.py), new at each start.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from shared.service_auth import CALLERS, audience


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    env_prefix: str
    port: int
    # Where docker-compose.yml and the Kubernetes manifests serve /metrics alone, for the
    # monitoring system only (``<PREFIX>METRICS_PORT``); a local stack keeps it on ``port``.
    metrics_port: int

    @property
    def module(self) -> str:
        return f"services.{self.name}"

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", self.module]


# Start order: dependencies first, the gateway last.
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("auth", "AUTH_", 8001, 9101),
    ServiceSpec("feature", "FEATURE_", 8002, 9102),
    ServiceSpec("retrieval", "RETRIEVAL_", 8003, 9103),
    ServiceSpec("metadata", "METADATA_", 8004, 9104),
    ServiceSpec("gateway", "GATEWAY_", 8000, 9100),
)


def new_client_secrets() -> dict[str, str]:
    """A fresh client secret for each calling service."""
    return {caller: secrets.token_urlsafe(32) for caller in CALLERS}


def service_environment(
    data_dir: Path,
    ports: dict[str, int],
    *,
    model: str,
    redis_url: str,
    client_secrets: dict[str, str],
) -> dict[str, str]:
    """Environment for running every service as a local process under ``data_dir``, the
    calling services authenticating with ``client_secrets``."""

    def url(name: str) -> str:
        return f"http://127.0.0.1:{ports[name]}"

    env = {f"{spec.env_prefix}PORT": str(ports[spec.name]) for spec in SERVICES}
    env |= {f"{spec.env_prefix}HOST": "127.0.0.1" for spec in SERVICES}
    env |= {
        "GATEWAY_AUTH_URL": url("auth"),
        "GATEWAY_FEATURE_URL": url("feature"),
        "GATEWAY_RETRIEVAL_URL": url("retrieval"),
        "GATEWAY_METADATA_URL": url("metadata"),
        "GATEWAY_REDIS_URL": redis_url,
        "AUTH_DATABASE_URL": f"sqlite:///{data_dir / 'auth' / 'auth.db'}",
        "AUTH_PRIVATE_KEY_PATH": str(data_dir / "auth" / "signing-key.pem"),
        "FEATURE_MODEL": model,
        "RETRIEVAL_DATA_DIR": str(data_dir / "retrieval"),
        "METADATA_DATABASE_URL": f"sqlite:///{data_dir / 'metadata' / 'metadata.db'}",
        "METADATA_IMAGE_DIR": str(data_dir / "metadata" / "images"),
        # The internal services verify their callers' tokens against auth's JWKS.
        "FEATURE_AUTH_URL": url("auth"),
        "RETRIEVAL_AUTH_URL": url("auth"),
        "METADATA_AUTH_URL": url("auth"),
        "GATEWAY_CLIENT_SECRET": client_secrets["gateway"],
    }
    env |= {
        f"AUTH_{caller.upper()}_CLIENT_SECRET": secret for caller, secret in client_secrets.items()
    }
    if Path(model).exists():
        # A local model never needs the hub: fail fast on a missing file instead of timing out.
        env["HF_HUB_OFFLINE"] = "1"
    return env


class ServiceProcess:
    """One service as a child process, its output appended to a log file."""

    def __init__(self, spec: ServiceSpec, env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.spec = spec
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env[f'{self.spec.env_prefix}PORT']}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                self.spec.command(sys.executable),
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited with code {self.process.returncode}; "
                    f"see {self.log_path}:\n{self.tail()}"
                )
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2.0)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise TimeoutError(
            f"{self.spec.name} not ready after {timeout:.0f}s: {last}\n{self.tail()}"
        )

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM (a service with workers stops them itself); ``kill``, or no exit within
        ``timeout``: SIGKILL to the whole process group, workers included."""
        if self.process is None or self.process.poll() is not None:
            return
        if not kill:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        # The service leads a session of its own (start_new_session), so its group is its own.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)


class LocalStack:
    """The five services as local processes: what ``make run`` starts and the end-to-end
    tests drive."""

    def __init__(
        self,
        data_dir: Path,
        *,
        model: str | Path,
        redis_url: str,
        ports: dict[str, int] | None = None,
        extra_env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        ports = ports or {spec.name: spec.port for spec in SERVICES}
        self.client_secrets = new_client_secrets()
        env = {
            **os.environ,
            **service_environment(
                data_dir,
                ports,
                model=str(model),
                redis_url=redis_url,
                client_secrets=self.client_secrets,
            ),
        }
        env |= extra_env or {}
        self.client_secrets = {
            caller: env[f"AUTH_{caller.upper()}_CLIENT_SECRET"] for caller in CALLERS
        }
        root = cwd or Path(__file__).resolve().parent.parent
        self.services = {
            spec.name: ServiceProcess(spec, env, data_dir / "logs" / f"{spec.name}.log", root)
            for spec in SERVICES
        }

    def url(self, name: str) -> str:
        return self.services[name].url

    def service_headers(self, service: str, caller: str = "reconcile") -> dict[str, str]:
        """Authorization headers with a service token for ``service`` from this stack's auth
        service, as ``caller`` (by default the operator tools' client): what a tool that calls
        an internal service directly sends."""
        response = httpx.post(
            f"{self.url('auth')}/token",
            data={"grant_type": "client_credentials", "audience": audience(service)},
            auth=(caller, self.client_secrets[caller]),
            timeout=10.0,
        )
        response.raise_for_status()
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    def start(self, timeout: float = 180.0) -> None:
        for service in self.services.values():
            service.start()
        try:
            for service in self.services.values():
                service.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def restart(self, name: str, *, kill: bool = False, timeout: float = 120.0) -> None:
        service = self.services[name]
        service.stop(kill=kill)
        service.start()
        service.wait_ready(timeout)

    def stop(self) -> None:
        # Reverse order: the gateway goes first, so nothing calls a stopped dependency.
        for service in reversed(list(self.services.values())):
            service.stop()
