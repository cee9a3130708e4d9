"""Token signing keys: load (or, in development, create) the RSA private key, derive its key id
(RFC 7638 JWK thumbprint) and publish the public keys as a JWKS.

``KeyRing`` holds a list of keys, newest first: the newest signs, all are published, so a key
rotation can keep the previous public key in the JWKS until the tokens it signed have expired.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger(__name__)

ALGORITHM = "RS256"
MIN_RSA_BITS = 2048
GENERATED_RSA_BITS = 2048


class SigningKeyError(RuntimeError):
    """The signing key is missing, unreadable or too weak: the service must not start."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int) -> str:
    # RFC 7518 §6.3.1: big-endian, the minimum number of octets.
    return _b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of an RSA JWK: the required members only, sorted, no spaces."""
    if jwk.get("kty") != "RSA":
        raise ValueError("only RSA keys are supported")
    required = {"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def rsa_public_jwk(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    numbers = public_key.public_numbers()
    return {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}


@dataclass(frozen=True)
class SigningKey:
    """One key of the ring. ``private_key`` is None for a retired key that is only published."""

    kid: str
    public_key: rsa.RSAPublicKey
    private_key: rsa.RSAPrivateKey | None = field(default=None, repr=False)
    algorithm: str = ALGORITHM

    @classmethod
    def from_private_key(cls, private_key: rsa.RSAPrivateKey) -> SigningKey:
        public_key = private_key.public_key()
        return cls(jwk_thumbprint(rsa_public_jwk(public_key)), public_key, private_key)

    @classmethod
    def from_public_key(cls, public_key: rsa.RSAPublicKey) -> SigningKey:
        return cls(jwk_thumbprint(rsa_public_jwk(public_key)), public_key)

    def public_jwk(self) -> dict[str, str]:
        return {
            **rsa_public_jwk(self.public_key),
            "kid": self.kid,
            "alg": self.algorithm,
            "use": "sig",
        }


class KeyRing:
    """The keys the service publishes, newest first; the newest one signs."""

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        if not keys:
            raise SigningKeyError("the key ring is empty")
        if keys[0].private_key is None:
            raise SigningKeyError("the newest key must have its private key to sign")
        kids = [key.kid for key in keys]
        if len(set(kids)) != len(kids):
            raise SigningKeyError("key ids in the key ring must be unique")
        self.keys: tuple[SigningKey, ...] = tuple(keys)
        self._jwks = {"keys": [key.public_jwk() for key in self.keys]}

    @property
    def signing_key(self) -> SigningKey:
        return self.keys[0]

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [dict(jwk) for jwk in self._jwks["keys"]]}


def load_private_key(pem: bytes, source: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        # Never include the file's content in the message.
        raise SigningKeyError(f"{source} is not an unencrypted PEM private key") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SigningKeyError(f"{source} is not an RSA private key (RS256 needs one)")
    if key.key_size < MIN_RSA_BITS:
        raise SigningKeyError(f"{source} holds a {key.key_size}-bit key; {MIN_RSA_BITS}+ required")
    return key


def write_private_key(path: Path, pem: bytes, *, replace: bool = False) -> None:
    """Write ``pem`` to ``path`` atomically with mode 0600.

    The key goes to a private temp file (mkstemp: 0600) in the same directory, is fsynced, then
    moved into place, so readers never see a partial key. A new key (``replace=False``) is
    hard-linked: if another instance created the file meanwhile the link fails with
    FileExistsError instead of replacing the key that instance already signs with. A rotation
    (``replace=True``) renames over the old file.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), 0o600)
            tmp.write(pem)
            tmp.flush()
            os.fsync(tmp.fileno())
        if replace:
            os.replace(tmp_name, path)
        else:
            os.link(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the new directory entry durable too
    finally:
        os.close(dir_fd)


def _read_private_key(path: Path) -> rsa.RSAPrivateKey:
    """Load an existing key file; FileNotFoundError passes through for the caller to decide."""
    try:
        pem = path.read_bytes()
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror}") from exc
    # Group access is tolerated: Kubernetes mounts secrets group-readable for the pod's fsGroup.
    if mode & 0o007:
        log.warning("signing key %s is accessible to every user (mode %o); use 0600", path, mode)
    return load_private_key(pem, path)


def load_or_create_private_key(path: Path, *, create: bool) -> rsa.RSAPrivateKey:
    """Load the PEM key at ``path``; when it is missing, generate and store one if ``create``
    (development), else fail (production keys are provisioned, never invented)."""
    try:
        return _read_private_key(path)
    except FileNotFoundError:
        if not create:
            raise SigningKeyError(
                f"signing key {path} does not exist; provision an RSA private key there "
                "(AUTH_PRIVATE_KEY_PATH) — it is only generated in development"
            ) from None
    key = rsa.generate_private_key(public_exponent=65537, key_size=GENERATED_RSA_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        write_private_key(path, pem)
    except FileExistsError:
        return _read_private_key(path)  # another instance won the race: use its key
    except OSError as exc:
        raise SigningKeyError(f"cannot write signing key {path}: {exc.strerror}") from exc
    log.info("generated a new %d-bit signing key at %s", GENERATED_RSA_BITS, path)
    return key
