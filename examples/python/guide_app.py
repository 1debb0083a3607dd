"""The integration guide's application, as literally as gRPC allows.

../../shared/reference/session-integration-guide.md (the "Phase 4 Session Management Integration
Guide" of the Python library atoms.session) builds a FastAPI app from six files: config.py,
session_config.py, auth.py, middleware.py, startup.py and admin.py. This file keeps their order,
their names and their control flow; what ran in process in the library is a call to Session
Authority here. `app.py` beside it is the idiomatic version (one ValidateSession per request);
this one is for teams porting an app written from the guide, and its tests
(`guide_tests/`) are the guide's own `test_integration` flow.

Environment: only the guide's names plus the authority's address and key.

  SA_TARGET                   the authority, default 127.0.0.1:50051
  SA_SERVICE_KEY              an API key with the `service` role
  OPENROUTER_CLIENT_ID        the guide's OAuth client (the callback's code exchange)
  OPENROUTER_CLIENT_SECRET
  OPENROUTER_TOKEN_ENDPOINT   the provider's token endpoint; default the guide's
                              https://openrouter.ai/api/v1/auth/token

Storage (KV_REST_API_URL + KV_REST_API_TOKEN, or REDIS_URL) and the OPENROUTER_* provider are the
authority's settings: give the authority the same variables (README, "Coming from atoms.session").

Where the guide and gRPC differ, deliberately:
- The guide's `X-Session-ID` carries the session token (the secret), and the callback's
  `session_id` field is that token: the guide used one value as both handle and credential.
  The public session id is returned too, as `public_session_id`.
- The admin router had no authentication in the guide. Here it forwards the caller's
  `Authorization: Bearer <key>` to the authority, which requires the `admin` role: only a holder of
  an admin API key can use it.
- `start_cleanup_task` / `stop_cleanup_task` are no-ops: the authority runs its own cleanup
  (`session.cleanup_interval`, `revocation.cleanup_interval`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pathlib
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "generated"))

import grpc  # noqa: E402
import httpx  # noqa: E402
from fastapi import APIRouter, FastAPI, HTTPException, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from google.protobuf import duration_pb2  # noqa: E402
from google.protobuf.json_format import MessageToDict  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402
from starlette.middleware.base import BaseHTTPMiddleware  # noqa: E402

from atoms.session.v1 import (  # noqa: E402
    common_pb2,
    revocation_service_pb2 as revocation_pb2,
    revocation_service_pb2_grpc as revocation_grpc,
    security_service_pb2 as security_pb2,
    security_service_pb2_grpc as security_grpc,
    session_service_pb2 as session_pb2,
    session_service_pb2_grpc as session_grpc,
    token_service_pb2 as token_pb2,
    token_service_pb2_grpc as token_grpc,
)

logger = logging.getLogger("guide_app")


# ---------------------------------------------------------------------------------------------
# Errors the guide's code catches, raised by the thin clients below from gRPC statuses.


class SessionError(Exception):
    """Any session failure (the guide's catch-all `except Exception`)."""


class SessionExpiredError(SessionError):
    pass


class DeviceValidationError(SessionError):
    pass


class RateLimitError(Exception):
    def __init__(self, message: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(error: grpc.aio.AioRpcError) -> int | None:
    """google.rpc.RetryInfo from the status details, rounded up to whole seconds."""
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return max(1, info.retry_delay.seconds + (1 if info.retry_delay.nanos > 0 else 0))
    return None


# ---------------------------------------------------------------------------------------------
# config.py


class Storage:
    """The guide's storage backend is the authority: one gRPC channel, closed at shutdown."""

    def __init__(self, target: str, key: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.metadata = (("authorization", f"Bearer {key}"),)

    async def close(self) -> None:
        await self.channel.close()


def get_storage() -> Storage:
    """Get the storage backend: the authority, which reads KV_REST_API_* or REDIS_URL itself."""
    return Storage(os.getenv("SA_TARGET", "127.0.0.1:50051"), os.getenv("SA_SERVICE_KEY", ""))


# ---------------------------------------------------------------------------------------------
# session_config.py: the guide's four services, each a thin client of its gRPC service.


@dataclass
class Session:
    """What the guide's code reads of a session."""

    session_id: str
    user_id: str
    state: str
    created_at: datetime
    last_accessed_at: datetime
    ip_address: str
    token_expires_at: datetime | None
    # The bearer secret that proved possession (the guide's `session_id` header value).
    session_token: str = ""

    @classmethod
    def from_pb(cls, s: common_pb2.Session, session_token: str = "") -> "Session":
        return cls(
            session_id=s.session_id,
            user_id=s.user_id,
            state=common_pb2.SessionState.Name(s.state).removeprefix("SESSION_STATE_").lower(),
            created_at=s.created_at.ToDatetime(timezone.utc),
            last_accessed_at=s.last_accessed_at.ToDatetime(timezone.utc),
            ip_address=s.ip_address,
            token_expires_at=s.token_expires_at.ToDatetime(timezone.utc) if s.HasField("token_expires_at") else None,
            session_token=session_token,
        )

    def needs_refresh(self, proactive_refresh_minutes: int = 5) -> bool:
        """The guide's RefreshConfig(proactive_refresh_minutes=5): the upstream token expires
        within five minutes. The authority applies the same window itself (`token.proactive_refresh`)."""
        if self.token_expires_at is None:
            return False
        return self.token_expires_at - datetime.now(timezone.utc) <= timedelta(minutes=proactive_refresh_minutes)


class TokenManager:
    """The guide's TokenManager. Endpoints, client credentials, RefreshConfig and RetryConfig are
    the authority's provider settings (`OPENROUTER_*`, `token.*`); here it only refreshes."""

    def __init__(self, storage: Storage) -> None:
        self._stub = token_grpc.TokenServiceStub(storage.channel)
        self._md = storage.metadata

    async def refresh(self, session_token: str) -> common_pb2.Session:
        answer = await self._stub.RefreshSession(
            token_pb2.RefreshSessionRequest(session_token=session_token, reason="proactive"), metadata=self._md
        )
        return answer.session


class SessionManager:
    """The guide's SessionManager. Its constructor arguments (idle 30 min, absolute 480 min,
    5 sessions per user, device validation) are the authority's `session.*` settings."""

    def __init__(self, storage: Storage, token_manager: TokenManager) -> None:
        self.storage = storage
        self.token_manager = token_manager
        self._stub = session_grpc.SessionServiceStub(storage.channel)
        self._md = storage.metadata

    async def create_session(
        self,
        *,
        user_id: str,
        access_token: str,
        refresh_token: str | None,
        id_token: str | None,
        expires_in: int | None,
        scopes: list[str],
        device_fingerprint: common_pb2.DeviceFingerprint,
        ip_address: str,
        user_agent: str | None,
        provider: str,
    ) -> Session:
        request = session_pb2.CreateSessionRequest(
            user_id=user_id,
            access_token=access_token,
            refresh_token=refresh_token or "",
            id_token=id_token or "",
            scopes=scopes,
            device_fingerprint=device_fingerprint,
            ip_address=ip_address,
            user_agent=user_agent or "",
            provider=provider,
        )
        if expires_in is not None:
            request.expires_in.CopyFrom(duration_pb2.Duration(seconds=int(expires_in)))
        try:
            created = await self._stub.CreateSession(request, metadata=self._md)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise RateLimitError(e.details(), retry_after_seconds(e)) from e
            raise
        return Session.from_pb(created.session, created.session_token)

    async def get_session(
        self,
        session_id: str,
        device_fingerprint: common_pb2.DeviceFingerprint | None = None,
        ip_address: str | None = None,
    ) -> Session:
        """`session_id` is the guide's header value: the session token."""
        try:
            answer = await self._stub.GetSession(
                session_pb2.GetSessionRequest(
                    session_token=session_id,
                    device_fingerprint=device_fingerprint,
                    ip_address=ip_address or "",
                ),
                metadata=self._md,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # GetSession's one precondition: the presented device matches the stored one.
                raise DeviceValidationError(e.details()) from e
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise SessionError("no such session") from e
            raise
        session = Session.from_pb(answer.session, session_id)
        if session.state == "expired":
            raise SessionExpiredError("session expired")
        if session.state != "active":
            raise SessionError(f"session {session.state}")
        return session

    async def refresh_session(self, session_id: str) -> tuple[Session, bool]:
        refreshed = await self.token_manager.refresh(session_id)
        return Session.from_pb(refreshed, session_id), True

    async def terminate_session(self, session_id: str, reason: str) -> None:
        """`session_id` is the session token (the middleware's header value)."""
        await self._stub.TerminateSession(
            session_pb2.TerminateSessionRequest(session_token=session_id, reason=reason), metadata=self._md
        )

    async def get_user_sessions(self, user_id: str, metadata) -> list[Session]:
        """Every state, as the library listed them; needs the `admin` role."""
        sessions: list[Session] = []
        page_token = ""
        while True:
            page = await self._stub.ListUserSessions(
                session_pb2.ListUserSessionsRequest(
                    user_id=user_id,
                    states=[
                        common_pb2.SESSION_STATE_ACTIVE,
                        common_pb2.SESSION_STATE_EXPIRED,
                        common_pb2.SESSION_STATE_REVOKED,
                        common_pb2.SESSION_STATE_TERMINATED,
                    ],
                    page_token=page_token,
                ),
                metadata=metadata,
            )
            sessions.extend(Session.from_pb(s) for s in page.sessions)
            page_token = page.next_page_token
            if not page_token:
                return sessions

    async def terminate_session_by_id(self, session_id: str, reason: str, metadata) -> bool:
        """Admin termination by the public id; True when this call ended it."""
        ended = await self._stub.TerminateSession(
            session_pb2.TerminateSessionRequest(session_id=session_id, reason=reason), metadata=metadata
        )
        return not ended.already_ended

    async def start_cleanup_task(self, interval_minutes: int = 15) -> None:
        """The authority's own cleanup does this (`session.cleanup_interval`)."""

    async def stop_cleanup_task(self) -> None:
        pass


class RevocationService:
    """The guide's RevocationService(enable_cascading=True, revocation_list_ttl_hours=24): the
    authority's `revocation.cascade` and `revocation.list_ttl`."""

    def __init__(self, storage: Storage) -> None:
        self._stub = revocation_grpc.RevocationServiceStub(storage.channel)
        self._md = storage.metadata

    async def revoke_session(self, session: Session, reason: str = "user_logout", revoked_by: str | None = None):
        return await self._stub.RevokeSession(
            revocation_pb2.RevokeSessionRequest(
                session_token=session.session_token, reason=reason, revoked_by=revoked_by or ""
            ),
            metadata=self._md,
        )

    async def revoke_user_sessions(
        self,
        user_id: str,
        except_session_id: str | None = None,
        reason: str = "user_logout_all",
        revoked_by: str | None = None,
    ):
        return await self._stub.RevokeUserSessions(
            revocation_pb2.RevokeUserSessionsRequest(
                user_id=user_id,
                except_session_id=except_session_id or "",
                reason=reason,
                revoked_by=revoked_by or "",
            ),
            metadata=self._md,
        )

    async def start_cleanup_task(self, interval_hours: int = 1) -> None:
        """The authority's own cleanup does this (`revocation.cleanup_interval`)."""

    async def stop_cleanup_task(self) -> None:
        pass


EVENT_TYPES = {
    name.removeprefix("SECURITY_EVENT_TYPE_").lower(): value
    for name, value in security_pb2.SecurityEventType.items()
    if value != 0
}


class SecurityService:
    """The guide's SecurityService(enable_rate_limiting=True, enable_hijacking_detection=True):
    the authority's rate-limit rules and `security.hijack_detection`."""

    def __init__(self, storage: Storage) -> None:
        self._stub = security_grpc.SecurityServiceStub(storage.channel)
        self._md = storage.metadata

    async def check_rate_limit(self, rule_name: str, key: str) -> None:
        """Raises RateLimitError when denied. For `session_create`, which CreateSession enforces
        itself, this only looks (CheckRateLimit's `consume` unset): the login costs one unit."""
        answer = await self._stub.CheckRateLimit(
            security_pb2.CheckRateLimitRequest(rule_name=rule_name, key=key), metadata=self._md
        )
        if not answer.allowed:
            retry = answer.retry_after.seconds + (1 if answer.retry_after.nanos else 0)
            raise RateLimitError(f"rate limit {rule_name} exceeded; retry in {retry} s", max(1, retry))

    async def detect_session_hijacking(
        self, session: Session, current_ip: str, current_fingerprint: common_pb2.DeviceFingerprint
    ) -> tuple[bool, float, list[str]]:
        answer = await self._stub.DetectHijacking(
            security_pb2.DetectHijackingRequest(
                session_token=session.session_token,
                current_ip=current_ip,
                current_fingerprint=current_fingerprint,
                current_user_agent=current_fingerprint.user_agent,
            ),
            metadata=self._md,
        )
        return answer.is_suspicious, answer.risk_score, list(answer.reasons)

    async def log_security_event(self, event_type: str, user_id: str, session_id: str, details: str) -> None:
        await self._stub.LogSecurityEvent(
            security_pb2.LogSecurityEventRequest(
                event_type=EVENT_TYPES[event_type], user_id=user_id, session_id=session_id, details=details
            ),
            metadata=self._md,
        )

    async def get_security_summary(self, user_id: str, hours: int, metadata) -> dict:
        summary = await self._stub.GetSecuritySummary(
            security_pb2.GetSecuritySummaryRequest(user_id=user_id, hours=hours), metadata=metadata
        )
        out = MessageToDict(summary, preserving_proto_field_name=True)
        out["counts_by_type"] = {
            security_pb2.SecurityEventType.Name(c.event_type).removeprefix("SECURITY_EVENT_TYPE_").lower(): c.count
            for c in summary.counts
        }
        return out


# Global instances
_storage = None
_session_manager = None
_token_manager = None
_revocation_service = None
_security_service = None


def get_session_manager() -> SessionManager:
    """Get or create session manager singleton."""
    global _session_manager, _token_manager, _storage

    if _session_manager is None:
        if _storage is None:
            _storage = get_storage()
        _token_manager = TokenManager(storage=_storage)
        _session_manager = SessionManager(storage=_storage, token_manager=_token_manager)

    return _session_manager


def get_revocation_service() -> RevocationService:
    """Get or create revocation service singleton."""
    global _revocation_service, _storage

    if _revocation_service is None:
        if _storage is None:
            _storage = get_storage()
        _revocation_service = RevocationService(storage=_storage)

    return _revocation_service


def get_security_service() -> SecurityService:
    """Get or create security service singleton."""
    global _security_service, _storage

    if _security_service is None:
        if _storage is None:
            _storage = get_storage()
        _security_service = SecurityService(storage=_storage)

    return _security_service


# ---------------------------------------------------------------------------------------------
# auth.py

router = APIRouter()

# Client-side fields, as the page's script reports them (the guide's request.state.fingerprint_data).
FINGERPRINT_HEADER = "x-fingerprint-data"
FINGERPRINT_FIELDS = {
    "platform", "timezone", "screen_resolution", "color_depth", "pixel_ratio", "touch_support",
    "device_memory", "hardware_concurrency", "canvas_fingerprint", "webgl_fingerprint",
    "audio_fingerprint", "fonts", "plugins",
}


def fingerprint_data(request: Request) -> dict:
    """The client-side fields: JSON in the X-Fingerprint-Data header; unknown keys are dropped."""
    raw = request.headers.get(FINGERPRINT_HEADER)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return {k: v for k, v in data.items() if k in FINGERPRINT_FIELDS} if isinstance(data, dict) else {}


def extract_device_fingerprint(request: Request) -> common_pb2.DeviceFingerprint:
    """Extract device fingerprint from request."""
    return common_pb2.DeviceFingerprint(
        user_agent=request.headers.get("user-agent"),
        accept_language=request.headers.get("accept-language"),
        # Additional fields from client-side JavaScript
        **fingerprint_data(request),
    )


def client_host(request: Request) -> str:
    """request.client.host, as in the guide. Behind a proxy, run uvicorn with
    --proxy-headers --forwarded-allow-ips so that this is the client's address."""
    return request.client.host if request.client else ""


def id_token_subject(id_token: str) -> str | None:
    """The `sub` claim of an ID token received straight from the token endpoint over TLS (OpenID
    Connect Core 3.1.3.7: such a token may be trusted without checking its signature)."""
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) and sub else None


async def get_token_from_oauth_provider(request: Request) -> dict:
    """The code exchange the guide left out (RFC 6749 4.1.3), with the guide's OPENROUTER_*
    client. The body is `{"code": ..., "redirect_uri": ...}`; `user_id` is the provider's, or the
    ID token's subject."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("code"), str) or not body["code"]:
        raise HTTPException(status_code=400, detail="code is required")
    form = {"grant_type": "authorization_code", "code": body["code"]}
    if isinstance(body.get("redirect_uri"), str):
        form["redirect_uri"] = body["redirect_uri"]
    endpoint = os.getenv("OPENROUTER_TOKEN_ENDPOINT", "https://openrouter.ai/api/v1/auth/token")
    auth = (os.getenv("OPENROUTER_CLIENT_ID", ""), os.getenv("OPENROUTER_CLIENT_SECRET", ""))
    async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
        try:
            response = await client.post(endpoint, data=form, auth=auth)
        except httpx.HTTPError as e:
            logger.error("token endpoint unreachable: %s", type(e).__name__)
            raise HTTPException(status_code=502, detail="OAuth provider unavailable") from e
    if response.status_code != 200:
        error = response.json().get("error", "error") if response.headers.get("content-type", "").startswith("application/json") else "error"
        raise HTTPException(status_code=401, detail=f"OAuth code exchange failed: {error}")
    tokens = response.json()
    user_id = tokens.get("user_id") or id_token_subject(tokens.get("id_token", ""))
    if not user_id:
        raise HTTPException(status_code=502, detail="the provider named no user")
    return {**tokens, "user_id": user_id}


@router.post("/auth/callback")
async def oauth_callback(request: Request):
    """Handle OAuth callback and create session."""
    session_manager = get_session_manager()
    security_service = get_security_service()

    # Extract OAuth token response
    token_response = await get_token_from_oauth_provider(request)

    # Get user info
    user_id = token_response["user_id"]

    # Check rate limits
    try:
        await security_service.check_rate_limit(
            rule_name="session_create",
            key=user_id,
        )
    except RateLimitError as e:
        raise HTTPException(status_code=429, detail=str(e), headers={"Retry-After": str(e.retry_after)})

    # Extract device fingerprint
    fingerprint = extract_device_fingerprint(request)

    # Create session
    try:
        session = await session_manager.create_session(
            user_id=user_id,
            access_token=token_response["access_token"],
            refresh_token=token_response.get("refresh_token"),
            id_token=token_response.get("id_token"),
            expires_in=token_response.get("expires_in"),
            scopes=token_response.get("scope", "").split(),
            device_fingerprint=fingerprint,
            ip_address=client_host(request),
            user_agent=request.headers.get("user-agent"),
            provider="openrouter",
        )
    except RateLimitError as e:
        # A concurrent login spent the last unit between the check and the create.
        raise HTTPException(status_code=429, detail=str(e), headers={"Retry-After": str(e.retry_after or 1)})
    except grpc.aio.AioRpcError as e:
        logger.error("create session failed: %s %s", e.code().name, e.details())
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise HTTPException(status_code=400, detail=e.details()) from e
        raise HTTPException(status_code=503, detail="Session service unavailable") from e

    # Log security event
    await security_service.log_security_event(
        event_type="login_success",
        user_id=user_id,
        session_id=session.session_id,
        details="User logged in via OAuth",
    )

    return {
        # The guide's client sends this back as X-Session-ID: it is the session token.
        "session_id": session.session_token,
        "public_session_id": session.session_id,
        "access_token": token_response["access_token"],
        "expires_in": token_response.get("expires_in"),
    }


# ---------------------------------------------------------------------------------------------
# middleware.py


def unauthorized(detail: str) -> JSONResponse:
    # An HTTPException raised in a BaseHTTPMiddleware is not turned into a response by FastAPI's
    # handlers (they sit inside the middleware), so the middleware answers the 401 itself.
    return JSONResponse({"detail": detail}, status_code=401)


class SessionMiddleware(BaseHTTPMiddleware):
    """Middleware for session validation and refresh."""

    async def dispatch(self, request: Request, call_next):
        # Skip for public endpoints (and the admin router, which authenticates with the
        # authority's admin key instead of a session)
        if request.url.path in ["/health", "/auth/login", "/auth/callback"] or request.url.path.startswith("/admin/"):
            return await call_next(request)

        session_manager = get_session_manager()
        security_service = get_security_service()

        # Get session ID from header or cookie
        session_id = request.headers.get("X-Session-ID") or request.cookies.get("session_id")

        if not session_id:
            return unauthorized("No session")

        try:
            # Get session with device validation
            fingerprint = extract_device_fingerprint(request)
            session = await session_manager.get_session(
                session_id=session_id,
                device_fingerprint=fingerprint,
                ip_address=client_host(request),
            )

            # Check for hijacking
            is_suspicious, risk_score, reasons = await security_service.detect_session_hijacking(
                session=session,
                current_ip=client_host(request),
                current_fingerprint=fingerprint,
            )

            if is_suspicious and risk_score > 0.7:
                # Terminate suspicious session (the authority has already ended it above its
                # threshold; this call then reports the existing end)
                logger.warning("suspected hijacking (risk %.2f): %s", risk_score, "; ".join(reasons))
                await session_manager.terminate_session(
                    session_id,
                    reason="suspected_hijacking",
                )
                return unauthorized("Session terminated due to suspicious activity")

            # Check if token needs refresh
            if session.needs_refresh():
                try:
                    session, _ = await session_manager.refresh_session(session_id)
                except Exception as e:
                    logger.error(f"Token refresh failed: {type(e).__name__}")
                    # Continue with expired token, will fail on provider API

            # Attach session to request
            request.state.session = session
            request.state.user_id = session.user_id

        except SessionExpiredError:
            return unauthorized("Session expired")
        except DeviceValidationError:
            return unauthorized("Device validation failed")
        except Exception as e:
            logger.error(f"Session validation error: {type(e).__name__}")
            return unauthorized("Invalid session")

        return await call_next(request)


# ---------------------------------------------------------------------------------------------
# auth.py (continued): logout


@router.post("/auth/logout")
async def logout(request: Request):
    """Logout current session."""
    session = request.state.session
    revocation_service = get_revocation_service()
    security_service = get_security_service()

    # Revoke session
    await revocation_service.revoke_session(
        session=session,
        reason="user_logout",
        revoked_by=session.user_id,
    )

    # Log event
    await security_service.log_security_event(
        event_type="logout",
        user_id=session.user_id,
        session_id=session.session_id,
        details="User logged out",
    )

    return {"status": "logged_out"}


@router.post("/auth/logout-all")
async def logout_all(request: Request):
    """Logout all sessions except current."""
    session = request.state.session
    revocation_service = get_revocation_service()

    # Revoke all user sessions except current
    revoked = await revocation_service.revoke_user_sessions(
        user_id=session.user_id,
        except_session_id=session.session_id,
        reason="user_logout_all",
        revoked_by=session.user_id,
    )

    return {"status": "all_sessions_logged_out", "revoked_count": revoked.revoked_count}


@router.get("/api/protected")
async def protected(request: Request):
    """The guide's test_integration calls this protected endpoint."""
    return {"user_id": request.state.user_id, "session_id": request.state.session.session_id}


# ---------------------------------------------------------------------------------------------
# admin.py

admin = APIRouter(prefix="/admin")


def admin_key(request: Request):
    """The caller's own `Authorization: Bearer <admin API key>`, passed to the authority, which
    answers UNAUTHENTICATED or PERMISSION_DENIED unless it is a key with the `admin` role."""
    given = request.headers.get("authorization", "")
    if not given.startswith("Bearer ") or len(given) <= len("Bearer "):
        raise HTTPException(status_code=401, detail="admin API key required", headers={"WWW-Authenticate": "Bearer"})
    return (("authorization", given),)


def admin_error(e: grpc.aio.AioRpcError) -> HTTPException:
    if e.code() == grpc.StatusCode.UNAUTHENTICATED:
        return HTTPException(status_code=401, detail="admin API key not accepted")
    if e.code() == grpc.StatusCode.PERMISSION_DENIED:
        return HTTPException(status_code=403, detail="admin role required")
    if e.code() == grpc.StatusCode.NOT_FOUND:
        return HTTPException(status_code=404, detail="No such session")
    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return HTTPException(status_code=400, detail=e.details())
    return HTTPException(status_code=503, detail="Session service unavailable")


@admin.get("/sessions/{user_id}")
async def get_user_sessions(user_id: str, request: Request):
    """Get all sessions for a user."""
    session_manager = get_session_manager()

    try:
        sessions = await session_manager.get_user_sessions(user_id, admin_key(request))
    except grpc.aio.AioRpcError as e:
        raise admin_error(e) from e

    return {
        "user_id": user_id,
        "session_count": len(sessions),
        "sessions": [
            {
                "session_id": s.session_id,
                "state": s.state,
                "created_at": s.created_at.isoformat(),
                "last_accessed_at": s.last_accessed_at.isoformat(),
                "ip_address": s.ip_address,
            }
            for s in sessions
        ],
    }


@admin.get("/security/{user_id}")
async def get_security_summary(user_id: str, request: Request, hours: int = 24):
    """Get security summary for a user."""
    security_service = get_security_service()

    try:
        summary = await security_service.get_security_summary(user_id=user_id, hours=hours, metadata=admin_key(request))
    except grpc.aio.AioRpcError as e:
        raise admin_error(e) from e

    return summary


@admin.delete("/sessions/{session_id}")
async def terminate_session(session_id: str, request: Request):
    """Terminate a specific session."""
    session_manager = get_session_manager()

    try:
        ended_now = await session_manager.terminate_session_by_id(
            session_id=session_id, reason="admin_termination", metadata=admin_key(request)
        )
    except grpc.aio.AioRpcError as e:
        raise admin_error(e) from e

    return {"status": "terminated", "already_ended": not ended_now}


# ---------------------------------------------------------------------------------------------
# startup.py


@asynccontextmanager
async def lifespan(app):
    """Application lifespan manager."""
    # Startup
    session_manager = get_session_manager()
    revocation_service = get_revocation_service()

    # Start cleanup tasks
    await session_manager.start_cleanup_task(interval_minutes=15)
    await revocation_service.start_cleanup_task(interval_hours=1)

    yield

    # Shutdown
    await session_manager.stop_cleanup_task()
    await revocation_service.stop_cleanup_task()
    await session_manager.storage.close()


# In your FastAPI app
app = FastAPI(lifespan=lifespan)
app.add_middleware(SessionMiddleware)
app.include_router(router)
app.include_router(admin)


@app.get("/health")
async def health():
    return {"status": "ok"}
