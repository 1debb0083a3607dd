"""The integration guide's FastAPI flow against Session Authority, through stubs generated from
proto/ (run gen_stubs.py first).

- POST /auth/callback: the application has finished the OAuth code exchange and posts the
  provider's token response; the app creates a session (429 + Retry-After when the authority's
  `session_create` rate limit answers RESOURCE_EXHAUSTED).
- A middleware makes exactly one ValidateSession call per protected request, with the device
  fingerprint read from the request headers, maps every "not valid" answer to 401, and calls
  TokenService.RefreshSession when the answer says `needs_refresh` (a failed refresh is logged and
  the request goes on, as in the guide).
- POST /auth/logout, POST /auth/logout-all, GET /api/me.
- /admin/...: list a user's sessions, a user's security summary, terminate a session by id. They
  are guarded by the app's own admin token and call the authority with its admin API key.

Configuration (environment):
  SA_TARGET                 authority address, default 127.0.0.1:50051
  SA_SERVICE_KEY            API key with the `service` role (login, validate, logout)
  SA_ADMIN_KEY              API key with the `admin` role (the /admin endpoints)
  APP_ADMIN_TOKEN           bearer token the app's /admin endpoints require
  APP_TRUST_FORWARDED_FOR   "1" when the app runs behind a proxy that sets X-Forwarded-For
"""

from __future__ import annotations

import logging
import os
import pathlib
import secrets
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "generated"))

import grpc  # noqa: E402
from fastapi import FastAPI, HTTPException, Request, Response  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from google.protobuf import duration_pb2  # noqa: E402
from google.protobuf.json_format import MessageToDict  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402
from pydantic import BaseModel  # noqa: E402

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

log = logging.getLogger("session_example")

SESSION_HEADER = "x-session-token"
SESSION_COOKIE = "session_token"
PUBLIC_PATHS = {"/health", "/auth/callback"}

# What the middleware answers for each "not valid" reason of ValidateSession.
INVALID_DETAIL = {
    session_pb2.INVALID_REASON_NOT_FOUND: "Invalid session",
    session_pb2.INVALID_REASON_EXPIRED: "Session expired",
    session_pb2.INVALID_REASON_REVOKED: "Session revoked",
    session_pb2.INVALID_REASON_TERMINATED: "Session terminated",
    session_pb2.INVALID_REASON_DEVICE_MISMATCH: "Device validation failed",
    session_pb2.INVALID_REASON_HIJACK_SUSPECTED: "Session terminated due to suspicious activity",
}


@dataclass(frozen=True)
class Settings:
    target: str
    service_key: str
    admin_key: str
    admin_token: str
    trust_forwarded_for: bool

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            target=os.environ.get("SA_TARGET", "127.0.0.1:50051"),
            service_key=os.environ.get("SA_SERVICE_KEY", ""),
            admin_key=os.environ.get("SA_ADMIN_KEY", ""),
            admin_token=os.environ.get("APP_ADMIN_TOKEN", ""),
            trust_forwarded_for=os.environ.get("APP_TRUST_FORWARDED_FOR", "") == "1",
        )


class Authority:
    """gRPC stubs for one channel, each call carrying the API key of its role."""

    def __init__(self, settings: Settings) -> None:
        self.channel = grpc.aio.insecure_channel(settings.target)
        self.sessions = session_grpc.SessionServiceStub(self.channel)
        self.tokens = token_grpc.TokenServiceStub(self.channel)
        self.revocations = revocation_grpc.RevocationServiceStub(self.channel)
        self.security = security_grpc.SecurityServiceStub(self.channel)
        self.service_md = (("authorization", f"Bearer {settings.service_key}"),)
        self.admin_md = (("authorization", f"Bearer {settings.admin_key}"),)

    async def close(self) -> None:
        await self.channel.close()


def client_ip(request: Request, settings: Settings) -> str:
    if settings.trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for", "")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return request.client.host if request.client else ""


def device_fingerprint(request: Request) -> common_pb2.DeviceFingerprint:
    """The fingerprint of a request: its headers plus what client-side script reported in
    X-Client-* headers. Only fields that are present are set: an absent field is no evidence."""
    h = request.headers
    fp = common_pb2.DeviceFingerprint(
        user_agent=h.get("user-agent", ""),
        accept_language=h.get("accept-language", ""),
        platform=h.get("x-client-platform", ""),
        timezone=h.get("x-client-timezone", ""),
        screen_resolution=h.get("x-client-screen", ""),
    )
    return fp


def retry_after_seconds(error: grpc.aio.AioRpcError) -> int | None:
    """Reads google.rpc.RetryInfo from the status details (the `grpc-status-details-bin`
    trailer), rounded up to whole seconds for the Retry-After header."""
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                delay = info.retry_delay
                return max(1, delay.seconds + (1 if delay.nanos > 0 else 0))
    return None


def session_json(s: common_pb2.Session) -> dict:
    return MessageToDict(s, preserving_proto_field_name=True)


class CallbackBody(BaseModel):
    """The provider's token response, as the OAuth callback received it."""

    user_id: str
    access_token: str
    refresh_token: str | None = None
    id_token: str | None = None
    expires_in: int | None = None
    scope: str = ""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.authority = Authority(settings)
        yield
        await app.state.authority.close()

    app = FastAPI(lifespan=lifespan)

    def authority(request: Request) -> Authority:
        return request.app.state.authority

    @app.middleware("http")
    async def session_middleware(request: Request, call_next):
        path = request.url.path
        if path in PUBLIC_PATHS or path.startswith("/admin/"):
            return await call_next(request)
        token = request.headers.get(SESSION_HEADER) or request.cookies.get(SESSION_COOKIE)
        if not token:
            return JSONResponse({"detail": "No session"}, status_code=401)
        sa = authority(request)
        try:
            answer = await sa.sessions.ValidateSession(
                session_pb2.ValidateSessionRequest(
                    session_token=token,
                    device_fingerprint=device_fingerprint(request),
                    ip_address=client_ip(request, settings),
                ),
                metadata=sa.service_md,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # Too many invalid tokens from this IP (the `validate_failure` rule).
                headers = {}
                retry = retry_after_seconds(e)
                if retry is not None:
                    headers["Retry-After"] = str(retry)
                return JSONResponse({"detail": "Too many requests"}, status_code=429, headers=headers)
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return JSONResponse({"detail": "Invalid session"}, status_code=401)
            log.error("session validation error: %s %s", e.code().name, e.details())
            return JSONResponse({"detail": "Session service unavailable"}, status_code=503)

        if not answer.valid:
            detail = INVALID_DETAIL.get(answer.reason, "Invalid session")
            if answer.reason == session_pb2.INVALID_REASON_HIJACK_SUSPECTED:
                # The authority has already terminated the session and streamed its revocation.
                log.warning(
                    "hijack suspected (risk %.2f: %s); session terminated",
                    answer.risk_score,
                    "; ".join(answer.reasons),
                )
            return JSONResponse({"detail": detail, "reason": session_pb2.InvalidReason.Name(answer.reason)}, status_code=401)

        session = answer.session
        if answer.needs_refresh:
            try:
                refreshed = await sa.tokens.RefreshSession(
                    token_pb2.RefreshSessionRequest(session_token=token, reason="proactive"),
                    metadata=sa.service_md,
                )
                session = refreshed.session
            except grpc.aio.AioRpcError as e:
                # As in the guide: go on with the current token; the provider call will fail if
                # it really expired.
                log.error("token refresh failed for session %s: %s %s", session.session_id, e.code().name, e.details())

        request.state.session = session
        request.state.session_token = token
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/auth/callback")
    async def oauth_callback(body: CallbackBody, request: Request, response: Response):
        sa = authority(request)
        fingerprint = device_fingerprint(request)
        ip = client_ip(request, settings)
        create = session_pb2.CreateSessionRequest(
            user_id=body.user_id,
            access_token=body.access_token,
            refresh_token=body.refresh_token or "",
            id_token=body.id_token or "",
            scopes=body.scope.split(),
            device_fingerprint=fingerprint,
            ip_address=ip,
            user_agent=fingerprint.user_agent,
        )
        if body.expires_in is not None:
            create.expires_in.CopyFrom(duration_pb2.Duration(seconds=body.expires_in))
        try:
            created = await sa.sessions.CreateSession(create, metadata=sa.service_md)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                retry = retry_after_seconds(e)
                headers = {"Retry-After": str(retry)} if retry is not None else None
                raise HTTPException(status_code=429, detail=e.details(), headers=headers)
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise HTTPException(status_code=400, detail=e.details())
            log.error("create session failed: %s %s", e.code().name, e.details())
            raise HTTPException(status_code=503, detail="Session service unavailable")

        session = created.session
        await sa.security.LogSecurityEvent(
            security_pb2.LogSecurityEventRequest(
                event_type=security_pb2.SECURITY_EVENT_TYPE_LOGIN_SUCCESS,
                user_id=session.user_id,
                session_id=session.session_id,
                ip_address=ip,
                details="User logged in via OAuth",
            ),
            metadata=sa.service_md,
        )
        response.set_cookie(SESSION_COOKIE, created.session_token, httponly=True, samesite="lax")
        return {
            "session_id": session.session_id,
            "session_token": created.session_token,
            "expires_in": body.expires_in,
            "evicted_session_ids": list(created.evicted_session_ids),
        }

    @app.get("/api/me")
    async def me(request: Request):
        s = request.state.session
        return {"user_id": s.user_id, "session_id": s.session_id}

    @app.post("/auth/logout")
    async def logout(request: Request, response: Response):
        sa = authority(request)
        s = request.state.session
        revoked = await sa.revocations.RevokeSession(
            revocation_pb2.RevokeSessionRequest(
                session_token=request.state.session_token,
                reason="user_logout",
                revoked_by=s.user_id,
            ),
            metadata=sa.service_md,
        )
        await sa.security.LogSecurityEvent(
            security_pb2.LogSecurityEventRequest(
                event_type=security_pb2.SECURITY_EVENT_TYPE_LOGOUT,
                user_id=s.user_id,
                session_id=s.session_id,
                details="User logged out",
            ),
            metadata=sa.service_md,
        )
        response.delete_cookie(SESSION_COOKIE)
        return {"status": "logged_out", "session_id": revoked.event.session_id}

    @app.post("/auth/logout-all")
    async def logout_all(request: Request):
        sa = authority(request)
        s = request.state.session
        revoked = await sa.revocations.RevokeUserSessions(
            revocation_pb2.RevokeUserSessionsRequest(
                user_id=s.user_id,
                except_session_id=s.session_id,
                reason="user_logout_all",
                revoked_by=s.user_id,
            ),
            metadata=sa.service_md,
        )
        return {"status": "all_sessions_logged_out", "revoked_session_ids": list(revoked.session_ids)}

    def require_admin(request: Request) -> None:
        expected = f"Bearer {settings.admin_token}"
        given = request.headers.get("authorization", "")
        if not settings.admin_token or not secrets.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(status_code=403, detail="Admin only")

    @app.get("/admin/sessions/{user_id}")
    async def admin_user_sessions(user_id: str, request: Request):
        require_admin(request)
        sa = authority(request)
        sessions = []
        page_token = ""
        while True:
            page = await sa.sessions.ListUserSessions(
                session_pb2.ListUserSessionsRequest(
                    user_id=user_id,
                    # Empty means active only; ask for every state to show ended sessions too.
                    states=[
                        common_pb2.SESSION_STATE_ACTIVE,
                        common_pb2.SESSION_STATE_EXPIRED,
                        common_pb2.SESSION_STATE_REVOKED,
                        common_pb2.SESSION_STATE_TERMINATED,
                    ],
                    page_token=page_token,
                ),
                metadata=sa.admin_md,
            )
            sessions.extend(page.sessions)
            page_token = page.next_page_token
            if not page_token:
                break
        return {
            "user_id": user_id,
            "session_count": len(sessions),
            "sessions": [
                {
                    "session_id": s.session_id,
                    "state": common_pb2.SessionState.Name(s.state),
                    "created_at": s.created_at.ToJsonString(),
                    "last_accessed_at": s.last_accessed_at.ToJsonString(),
                    "ip_address": s.ip_address,
                    "end_reason": s.end_reason,
                }
                for s in sessions
            ],
        }

    @app.get("/admin/security/{user_id}")
    async def admin_security_summary(user_id: str, request: Request, hours: int = 24):
        require_admin(request)
        sa = authority(request)
        summary = await sa.security.GetSecuritySummary(
            security_pb2.GetSecuritySummaryRequest(user_id=user_id, hours=hours),
            metadata=sa.admin_md,
        )
        out = MessageToDict(summary, preserving_proto_field_name=True)
        # A flat {event_type: count} map is what dashboards want.
        out["counts_by_type"] = {
            security_pb2.SecurityEventType.Name(c.event_type).removeprefix("SECURITY_EVENT_TYPE_").lower(): c.count
            for c in summary.counts
        }
        return out

    @app.delete("/admin/sessions/{session_id}")
    async def admin_terminate(session_id: str, request: Request):
        require_admin(request)
        sa = authority(request)
        try:
            ended = await sa.sessions.TerminateSession(
                session_pb2.TerminateSessionRequest(session_id=session_id, reason="admin_termination"),
                metadata=sa.admin_md,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise HTTPException(status_code=404, detail="No such session")
            raise
        return {
            "status": "terminated",
            "already_ended": ended.already_ended,
            "session": session_json(ended.session),
        }

    return app


app = create_app()
