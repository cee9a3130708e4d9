"""The services of the stack and the command that starts each one.

``make run`` starts these commands as local processes; ``docker-compose.yml`` and the Kubernetes
manifests run the same commands in containers (a test checks they agree).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    env_prefix: str
    port: int

    @property
    def module(self) -> str:
        return f"services.{self.name}"

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", self.module]


# Start order: dependencies first, the gateway last.
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("auth", "AUTH_", 8001),
    ServiceSpec("feature", "FEATURE_", 8002),
    ServiceSpec("retrieval", "RETRIEVAL_", 8003),
    ServiceSpec("metadata", "METADATA_", 8004),
    ServiceSpec("gateway", "GATEWAY_", 8000),
)
