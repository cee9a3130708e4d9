"""The auth service's domain: grants, refresh-token rotation, revocation, principal
administration and key rotation, over the auth database and the key file.

Both the HTTP app and the admin command (``python -m services.auth.admin``) drive this class.
Every method blocks (database, argon2, RSA): the app calls them from a thread.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Engine

from services.auth import errors
from services.auth.issuer import IssuedToken, TokenIssuer
from services.auth.keys import load_or_create_private_key
from services.auth.keystore import KeyInfo, KeyRotationError, KeyStore, Rotation
from services.auth.lockout import AccountLocked, LoginLockout
from services.auth.metrics import KEY_ROTATIONS, REVOCATIONS
from services.auth.principals import (
    AuthFailure,
    Base,
    PrincipalExists,
    PrincipalKind,
    PrincipalRecord,
    PrincipalStore,
    create_db_engine,
    make_hasher,
)
from services.auth.refresh import (
    TOKEN_PREFIX,
    IssuedRefreshToken,
    RefreshError,
    RefreshFailure,
    RefreshTokenStore,
)
from services.auth.revocations import Revocation, RevocationStore
from services.auth.scopes import ScopeError, grant_scopes, unknown_scopes
from services.auth.settings import MIN_ADMIN_SECRET_LENGTH, AuthSettings
from shared.tokens import Principal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenSet:
    access: IssuedToken
    refresh: IssuedRefreshToken | None = None


def _scopes_for(principal: PrincipalRecord, requested: frozenset[str]) -> frozenset[str]:
    try:
        return grant_scopes(requested, principal.scopes)
    except ScopeError as exc:
        raise errors.invalid_scope(exc.scopes, "scope(s) not granted to this principal") from None


class AuthService:
    def __init__(self, settings: AuthSettings, engine: Engine, keys: KeyStore) -> None:
        self.settings = settings
        self.engine = engine
        self.keys = keys
        self.principals = PrincipalStore(
            engine,
            make_hasher(time_cost=settings.argon2_time_cost, memory_kib=settings.argon2_memory_kib),
        )
        self.revocations = RevocationStore(engine)
        self.logins = LoginLockout(
            settings.login_backoff, max_accounts=settings.login_max_tracked_accounts
        )
        self.refresh_tokens = RefreshTokenStore(
            engine,
            ttl_seconds=settings.refresh_token_ttl_seconds,
            max_lifetime_seconds=settings.refresh_token_max_lifetime_seconds,
        )
        self.issuer = TokenIssuer(
            keys.ring,
            issuer=settings.issuer,
            audience=settings.audience,
            ttl_seconds=settings.access_token_ttl_seconds,
        )

    @classmethod
    def open(cls, settings: AuthSettings, *, bootstrap: bool = True) -> AuthService:
        """Open the database and the keys (creating the schema); with ``bootstrap``, create the
        configured first principals."""
        # The key comes first: a production start without one fails before any other work.
        load_or_create_private_key(settings.private_key_path, create=not settings.is_production)
        engine = create_db_engine(settings.database_url)
        try:
            Base.metadata.create_all(engine)
            keys = KeyStore(
                engine,
                settings.private_key_path,
                create=not settings.is_production,
                retention_seconds=settings.effective_key_retention_seconds,
                check_interval=settings.key_check_interval_seconds,
            )
            keys.load()
            service = cls(settings, engine, keys)
            if bootstrap:
                service.bootstrap()
        except BaseException:
            engine.dispose()
            raise
        return service

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        self.principals.ping()

    def bootstrap(self) -> None:
        """Create the configured users and clients that do not exist yet (never overwrite)."""
        for user in self.settings.bootstrap_users:
            if self.principals.create_if_absent(
                user.username, PrincipalKind.USER, user.password.get_secret_value(), user.scopes
            ):
                log.info(
                    "created bootstrap user %s (scopes: %s)", user.username, " ".join(user.scopes)
                )
        for client in self.settings.bootstrap_clients:
            if self.principals.create_if_absent(
                client.client_id,
                PrincipalKind.CLIENT,
                client.client_secret.get_secret_value(),
                client.scopes,
            ):
                log.info(
                    "created bootstrap client %s (scopes: %s)",
                    client.client_id,
                    " ".join(client.scopes),
                )

    # -- grants -------------------------------------------------------------------------------

    def password_grant(self, username: str, password: str, requested: frozenset[str]) -> TokenSet:
        # Every name is counted alike, known or not: a lock must not tell which names exist.
        try:
            attempt = self.logins.begin(username)
        except AccountLocked as locked:
            raise errors.account_locked(locked.retry_after, locked.lockout_seconds) from None
        try:
            outcome = self.principals.authenticate(username, password, PrincipalKind.USER)
        except BaseException:
            self.logins.refund(attempt)
            raise
        if isinstance(outcome, AuthFailure):
            # A disabled account's right password counts as a failure too: clearing its count
            # would tell the password apart.
            raise errors.invalid_grant(outcome)
        self.logins.succeeded(attempt)
        scopes = _scopes_for(outcome, requested)
        access = self.issuer.issue(outcome.name, scopes)
        refresh = self.refresh_tokens.issue(
            outcome.name, scopes, access_jti=access.jti, access_expires_at=access.expires_at
        )
        return TokenSet(access, refresh)

    def client_credentials_grant(
        self, client_id: str, secret: str, requested: frozenset[str]
    ) -> TokenSet:
        outcome = self.principals.authenticate(client_id, secret, PrincipalKind.CLIENT)
        if isinstance(outcome, AuthFailure):
            # As for users: a disabled client answers as a wrong secret would.
            raise errors.invalid_client("invalid client credentials", outcome.value)
        # No refresh token: a client can always authenticate again (RFC 6749 §4.4.3).
        return TokenSet(self.issuer.issue(outcome.name, _scopes_for(outcome, requested)))

    def refresh_grant(self, token: str, requested: frozenset[str]) -> TokenSet:
        """Rotate a refresh token: the next one of its family and a new access token. Scopes
        are those of the family, narrowed to what the user still holds."""
        try:
            grant = self.refresh_tokens.consume(token, requested)
        except ScopeError as exc:
            raise errors.invalid_scope(exc.scopes, "scope(s) beyond the original grant") from None
        except RefreshError as exc:
            if exc.failure is RefreshFailure.REUSED:
                log.warning(
                    "a rotated refresh token was used again: its family and %d access token(s) "
                    "are revoked",
                    len(exc.revoked_access),
                )
                REVOCATIONS.labels("refresh_family").inc()
                for jti, expires_at in exc.revoked_access:
                    self.revocations.revoke_token(jti, expires_at)
            raise errors.invalid_refresh(exc.failure.value) from None
        principal = self.principals.get(grant.subject)
        if principal is None or principal.disabled or principal.kind is not PrincipalKind.USER:
            self._revoke_refresh(grant.subject)
            raise errors.invalid_refresh(AuthFailure.DISABLED.value)
        family_scopes = grant.scopes & principal.scopes
        scopes = (requested or family_scopes) & principal.scopes
        access = self.issuer.issue(grant.subject, scopes)
        refresh = self.refresh_tokens.issue(
            grant.subject,
            family_scopes,
            access_jti=access.jti,
            access_expires_at=access.expires_at,
            grant=grant,
        )
        return TokenSet(access, refresh)

    # -- revocation ---------------------------------------------------------------------------

    def revoke_refresh_token(self, token: str) -> bool:
        """RFC 7009 for a refresh token: its family and their access tokens. False: unknown."""
        if not token.startswith(TOKEN_PREFIX):
            return False
        revoked = self.refresh_tokens.revoke_family_of(token)
        if revoked is None:
            return False
        REVOCATIONS.labels("refresh_family").inc()
        for jti, expires_at in revoked:
            self.revocations.revoke_token(jti, expires_at)
        return True

    def revoke_access_token(self, principal: Principal, *, actor: str | None = None) -> Revocation:
        if principal.token_id is None:
            raise errors.invalid_request("the token has no jti")
        log.info("access token %s revoked by %s", principal.token_id, actor or "its holder")
        REVOCATIONS.labels("jti").inc()
        return self.revocations.revoke_token(principal.token_id, principal.expires_at)

    def revoke_token_id(self, jti: str, expires_at: float | None, *, actor: str) -> Revocation:
        log.info("access token %s revoked by %s", jti, actor)
        REVOCATIONS.labels("jti").inc()
        return self.revocations.revoke_token(jti, expires_at)

    def revoke_principal_tokens(self, name: str, *, actor: str) -> Revocation:
        if self.principals.get(name) is None:
            raise errors.principal_not_found(name)
        log.info("every token of %s revoked by %s", name, actor)
        return self._revoke_all(name)

    def _revoke_all(self, name: str) -> Revocation:
        self._revoke_refresh(name)
        return self._revoke_subject(name)

    def _revoke_subject(self, name: str) -> Revocation:
        REVOCATIONS.labels("subject").inc()
        return self.revocations.revoke_subject(name)

    def _revoke_refresh(self, name: str) -> None:
        # The subject entry revokes their access tokens already; only the families remain.
        self.refresh_tokens.revoke_subject(name)

    def is_revoked(self, principal: Principal) -> bool:
        return self.revocations.is_revoked(principal)

    def revocation_feed(self, since: float | None) -> tuple[float, list[Revocation]]:
        if since is None:
            # A full read is rare (a gateway starting, a periodic resync): tidy up then.
            self.revocations.purge()
            self.refresh_tokens.purge()
        return self.revocations.feed(since)

    # -- principals ---------------------------------------------------------------------------

    def _check_secret(self, secret: str) -> None:
        if len(secret) < MIN_ADMIN_SECRET_LENGTH:
            raise errors.weak_secret(MIN_ADMIN_SECRET_LENGTH)

    def _check_scopes(self, scopes: Iterable[str]) -> frozenset[str]:
        scopes = frozenset(scopes)
        unknown = unknown_scopes(scopes)
        if unknown:
            raise errors.unknown_scope(unknown)
        return scopes

    def create_principal(
        self,
        name: str,
        kind: PrincipalKind,
        secret: str | None,
        scopes: Iterable[str],
        *,
        actor: str,
    ) -> tuple[PrincipalRecord, str | None]:
        """Create a principal; without a secret one is generated and returned (once)."""
        generated = None
        if secret is None:
            secret = generated = secrets.token_urlsafe(24)
        self._check_secret(secret)
        checked = self._check_scopes(scopes)
        try:
            record = self.principals.create(name, kind, secret, checked)
        except PrincipalExists:
            raise errors.principal_exists(name) from None
        log.info("%s %s created by %s (scopes: %s)", kind.value, name, actor, " ".join(checked))
        return record, generated

    def list_principals(self) -> list[PrincipalRecord]:
        return self.principals.list_all()

    def get_principal(self, name: str) -> PrincipalRecord:
        record = self.principals.get(name)
        if record is None:
            raise errors.principal_not_found(name)
        return record

    def update_principal(
        self,
        name: str,
        *,
        scopes: Iterable[str] | None = None,
        disabled: bool | None = None,
        secret: str | None = None,
        actor: str,
    ) -> PrincipalRecord:
        """Change scopes, the disabled flag or the secret. Disabling or a new secret revokes
        every token of the principal; removing scopes revokes its access tokens (its refresh
        tokens then yield only the scopes it keeps)."""
        checked = None if scopes is None else self._check_scopes(scopes)
        if secret is not None:
            self._check_secret(secret)
        result = self.principals.update(name, scopes=checked, disabled=disabled, secret=secret)
        if result is None:
            raise errors.principal_not_found(name)
        before, after = result
        changes = []
        if checked is not None and checked != before.scopes:
            changes.append(f"scopes {' '.join(sorted(checked)) or '(none)'}")
        if before.disabled != after.disabled:
            changes.append("disabled" if after.disabled else "enabled")
        if secret is not None:
            changes.append("new secret")
        log.info("%s updated by %s: %s", name, actor, ", ".join(changes) or "no change")
        if (after.disabled and not before.disabled) or secret is not None:
            self._revoke_all(name)
        elif before.scopes - after.scopes:
            self._revoke_subject(name)
        return after

    # -- keys ---------------------------------------------------------------------------------

    def rotate_key(self, *, actor: str) -> Rotation:
        try:
            rotation = self.keys.rotate()
        except KeyRotationError as exc:
            raise errors.key_rotation_failed(str(exc)) from None
        KEY_ROTATIONS.inc()
        log.info("signing key rotated by %s: %s -> %s", actor, rotation.previous_kid, rotation.kid)
        return rotation

    def describe_keys(self) -> list[KeyInfo]:
        return self.keys.describe()
