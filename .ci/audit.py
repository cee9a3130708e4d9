"""`make audit`: pip-audit over constraints.txt, the exact version of every package that
`make install` and the service images install.

pip-audit looks each pin up in a vulnerability service: OSV when it answers, else PyPI's JSON
API. When neither answers (an offline or filtering network), the audit is skipped with a message
and exit status 0 rather than run blind: pip-audit would report every package as "not found",
skipped, and still print "No known vulnerabilities found". Once a service is chosen, `--strict`
makes any package it cannot look up a failure. docs/security.md ("Dependency audit") explains
the findings listed in IGNORED.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
PROBE_TIMEOUT_SECONDS = 10
# Advisories explained in docs/security.md, each with the reason it does not apply: none now.
IGNORED: dict[str, str] = {}


def pinned_version(package: str) -> str:
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise SystemExit(f"{CONSTRAINTS} pins no {package}")


def answers(request: urllib.request.Request | str) -> bool:
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_SECONDS) as response:
            return response.status == 200
    except (OSError, ValueError, http.client.HTTPException):  # URLError, timeouts, refusals
        return False


def reachable_service() -> str | None:
    """The first service that answers a lookup of one of our own pins (pip), or None."""
    version = pinned_version("pip")
    osv_query = json.dumps(
        {"package": {"name": "pip", "ecosystem": "PyPI"}, "version": version}
    ).encode()
    osv = urllib.request.Request(
        "https://api.osv.dev/v1/query",
        data=osv_query,
        headers={"Content-Type": "application/json"},
    )
    if answers(osv):
        return "osv"
    # pip-audit's PyPI service reads the per-release document, not the project's.
    if answers(f"https://pypi.org/pypi/pip/{version}/json"):
        return "pypi"
    return None


def main() -> int:
    service = reachable_service()
    if service is None:
        print(
            "dependency audit SKIPPED: neither OSV (https://api.osv.dev) nor PyPI's per-release "
            "JSON API (https://pypi.org/pypi/<name>/<version>/json) answers from this machine, "
            "so no pin in constraints.txt can be looked up. Run `make audit` where one of them "
            "is reachable.",
            file=sys.stderr,
        )
        return 0
    command = [
        sys.executable,
        "-m",
        "pip_audit",
        "--requirement",
        str(CONSTRAINTS),
        # Every package is pinned there already: nothing to resolve, nothing to install.
        "--no-deps",
        "--disable-pip",
        "--strict",
        "--vulnerability-service",
        service,
        "--timeout",
        "30",
        "--progress-spinner",
        "off",
        "--desc",
        "on",
    ]
    for advisory in IGNORED:
        command += ["--ignore-vuln", advisory]
    print(f"pip-audit of {CONSTRAINTS.name} against {service}", file=sys.stderr, flush=True)
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
