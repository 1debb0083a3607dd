"""The guide's whole flow, over HTTP, against the example app and the real authority."""

from __future__ import annotations

import time

from atoms.session.v1 import revocation_service_pb2

HOME_IP = "203.0.113.10"
HOME_IP_SAME_NET = "203.0.113.77"
ATTACKER_IP = "198.51.100.20"

LAPTOP = {
    "user-agent": "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0",
    "accept-language": "en-GB,en;q=0.8",
    "x-client-platform": "Linux x86_64",
    "x-client-timezone": "Europe/London",
    "x-client-screen": "1920x1080",
}
# The same browser reporting another time zone: a critical field, so the device rule fails.
LAPTOP_ELSEWHERE = {**LAPTOP, "x-client-timezone": "America/New_York"}
PHONE = {
    "user-agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Mobile/15E148 Safari/604.1",
    "accept-language": "en-GB",
    "x-client-platform": "iPhone",
    "x-client-timezone": "Europe/London",
    "x-client-screen": "390x844",
}
ATTACKER = {
    "user-agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/129.0 Safari/537.36",
    "accept-language": "ru-RU",
    "x-client-platform": "Win32",
    "x-client-timezone": "Europe/Moscow",
    "x-client-screen": "1366x768",
}


def login(http, user_id, device=LAPTOP, ip=HOME_IP, expires_in=3600):
    return http.post(
        "/auth/callback",
        json={
            "user_id": user_id,
            "access_token": f"upstream-access-{user_id}",
            "refresh_token": f"upstream-refresh-{user_id}",
            "expires_in": expires_in,
            "scope": "openid profile",
        },
        headers={**device, "x-forwarded-for": ip},
    )


def login_ok(http, user_id, **kw) -> dict:
    r = login(http, user_id, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def as_session(token, device=LAPTOP, ip=HOME_IP) -> dict:
    return {**device, "x-forwarded-for": ip, "x-session-token": token}


def me(http, token, device=LAPTOP, ip=HOME_IP):
    return http.get("/api/me", headers=as_session(token, device, ip))


def admin_sessions(http, admin_headers, user_id) -> dict:
    r = http.get(f"/admin/sessions/{user_id}", headers=admin_headers)
    assert r.status_code == 200, r.text
    return {s["session_id"]: s for s in r.json()["sessions"]}


def test_login_creates_a_session_and_sets_the_cookie(http, user_id):
    r = login(http, user_id)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session_id"].startswith("ses_")
    assert body["session_token"].startswith("sat_")
    assert r.cookies.get("session_token") == body["session_token"]


def test_valid_session_reaches_the_protected_endpoint_with_one_validate_per_request(http, user_id, authority):
    s = login_ok(http, user_id)
    before = authority.metric("ValidateSession")
    for _ in range(3):
        r = me(http, s["session_token"])
        assert r.status_code == 200, r.text
        assert r.json() == {"user_id": user_id, "session_id": s["session_id"]}
    # The cookie set by the login works as well as the header.
    assert http.cookies.get("session_token") == s["session_token"]
    r = http.get("/api/me", headers={**LAPTOP, "x-forwarded-for": HOME_IP})
    assert r.status_code == 200, r.text
    # A move within the same /24 is a weak signal: still valid.
    assert me(http, s["session_token"], ip=HOME_IP_SAME_NET).status_code == 200
    assert authority.metric("ValidateSession") - before == 5


def test_no_or_unknown_session_is_401(http):
    r = http.get("/api/me", headers=LAPTOP)
    assert r.status_code == 401
    assert r.json()["detail"] == "No session"
    r = me(http, "sat_0000_" + "A" * 43)
    assert r.status_code == 401
    assert r.json()["reason"] == "INVALID_REASON_NOT_FOUND"


def test_access_after_logout_is_401(http, user_id, authority):
    s = login_ok(http, user_id)
    r = http.post("/auth/logout", headers=as_session(s["session_token"]))
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "logged_out", "session_id": s["session_id"]}
    authority.record_ended(s["session_id"])
    r = me(http, s["session_token"])
    assert r.status_code == 401
    assert r.json() == {"detail": "Session revoked", "reason": "INVALID_REASON_REVOKED"}


def test_logout_everywhere_else_keeps_the_current_session(http, user_id, authority):
    laptop = login_ok(http, user_id, device=LAPTOP)
    phone = login_ok(http, user_id, device=PHONE)
    other = login_ok(http, user_id, device=PHONE, ip=HOME_IP_SAME_NET)
    r = http.post("/auth/logout-all", headers=as_session(laptop["session_token"]))
    assert r.status_code == 200, r.text
    revoked = r.json()["revoked_session_ids"]
    assert sorted(revoked) == sorted([phone["session_id"], other["session_id"]])
    authority.record_ended(*revoked)
    assert me(http, laptop["session_token"]).status_code == 200
    for s, ip in ((phone, HOME_IP), (other, HOME_IP_SAME_NET)):
        r = me(http, s["session_token"], device=PHONE, ip=ip)
        assert r.status_code == 401
        assert r.json()["reason"] == "INVALID_REASON_REVOKED"


def test_device_mismatch_is_401_and_leaves_the_session_usable(http, user_id):
    s = login_ok(http, user_id)
    r = me(http, s["session_token"], device=LAPTOP_ELSEWHERE)
    assert r.status_code == 401
    assert r.json() == {"detail": "Device validation failed", "reason": "INVALID_REASON_DEVICE_MISMATCH"}
    # A mismatch alone does not end the session: the real device still gets in.
    assert me(http, s["session_token"]).status_code == 200


def test_hijack_is_401_and_the_session_is_revoked(http, user_id, authority, admin_headers, grpc_stubs):
    s = login_ok(http, user_id)
    assert me(http, s["session_token"]).status_code == 200
    r = me(http, s["session_token"], device=ATTACKER, ip=ATTACKER_IP)
    assert r.status_code == 401
    assert r.json() == {
        "detail": "Session terminated due to suspicious activity",
        "reason": "INVALID_REASON_HIJACK_SUSPECTED",
    }
    authority.record_ended(s["session_id"])
    # Ended for everyone, the legitimate device included.
    r = me(http, s["session_token"])
    assert r.status_code == 401
    assert r.json()["reason"] == "INVALID_REASON_TERMINATED"
    listed = admin_sessions(http, admin_headers, user_id)[s["session_id"]]
    assert listed["state"] == "SESSION_STATE_TERMINATED"
    assert listed["end_reason"] == "suspected_hijacking"
    stub, md = grpc_stubs
    answer = stub.IsRevoked(revocation_service_pb2.IsRevokedRequest(session_id=s["session_id"]), metadata=md)
    assert answer.revoked
    assert answer.event.kind == revocation_service_pb2.REVOCATION_KIND_HIJACK


def test_rate_limited_login_is_429_with_retry_after(http, user_id):
    # session_create allows 5 per 300 s per user, all at once.
    for _ in range(5):
        login_ok(http, user_id)
    r = login(http, user_id)
    assert r.status_code == 429, r.text
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= 300
    assert "session_create" in r.json()["detail"]


def test_needs_refresh_calls_refresh_session_and_a_failed_refresh_is_logged(http, user_id, authority, app_process):
    # An access token expiring within the proactive window (5 min) makes needs_refresh true.
    s = login_ok(http, user_id, expires_in=30)
    before = authority.metric("RefreshSession")
    r = me(http, s["session_token"])
    assert r.status_code == 200, r.text
    assert authority.metric("RefreshSession") - before == 1
    # In a build where TokenService cannot refresh (UNIMPLEMENTED, or no provider configured),
    # the failure is logged and the request goes on.
    if authority.metric("RefreshSession", "Ok") == 0:
        app_process.logs.wait_for(
            lambda line: "token refresh failed" in line and s["session_id"] in line, timeout=5
        )
    # A fresh token does not trigger a refresh.
    fresh = login_ok(http, user_id, expires_in=3600)
    before = authority.metric("RefreshSession")
    assert me(http, fresh["session_token"]).status_code == 200
    assert authority.metric("RefreshSession") == before


def test_admin_endpoints_need_the_admin_token(http, user_id):
    assert http.get(f"/admin/sessions/{user_id}").status_code == 403
    assert http.get(f"/admin/security/{user_id}", headers={"authorization": "Bearer nope"}).status_code == 403


def test_admin_terminate_ends_the_session(http, user_id, admin_headers, authority):
    s = login_ok(http, user_id)
    r = http.delete(f"/admin/sessions/{s['session_id']}", headers=admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "terminated"
    assert body["already_ended"] is False
    assert body["session"]["state"] == "SESSION_STATE_TERMINATED"
    assert body["session"]["end_reason"] == "admin_termination"
    authority.record_ended(s["session_id"])
    r = me(http, s["session_token"])
    assert r.status_code == 401
    assert r.json() == {"detail": "Session terminated", "reason": "INVALID_REASON_TERMINATED"}
    assert http.delete("/admin/sessions/ses_0000_00000000000000000000000000000000", headers=admin_headers).status_code == 404


def test_admin_list_and_summary_reflect_the_flow(http, user_id, admin_headers, authority):
    """One user goes through the whole flow; the admin views then say exactly what happened."""
    laptop = login_ok(http, user_id, device=LAPTOP)
    phone = login_ok(http, user_id, device=PHONE)
    stolen = login_ok(http, user_id, device=LAPTOP)
    old = login_ok(http, user_id, device=LAPTOP)
    # A device mismatch on the laptop session (not ended).
    assert me(http, laptop["session_token"], device=LAPTOP_ELSEWHERE).status_code == 401
    # A hijack of the stolen session (ended by the authority).
    assert me(http, stolen["session_token"], device=ATTACKER, ip=ATTACKER_IP).status_code == 401
    # The phone logs out.
    assert http.post("/auth/logout", headers=as_session(phone["session_token"], device=PHONE)).status_code == 200
    # The laptop logs out everywhere else: only `old` is still active besides it.
    r = http.post("/auth/logout-all", headers=as_session(laptop["session_token"]))
    assert r.json()["revoked_session_ids"] == [old["session_id"]]
    authority.record_ended(stolen["session_id"], phone["session_id"], old["session_id"])
    # The fifth login is allowed, the sixth is rate limited.
    login_ok(http, user_id, device=PHONE)
    assert login(http, user_id, device=PHONE).status_code == 429

    sessions = admin_sessions(http, admin_headers, user_id)
    assert len(sessions) == 5
    assert sessions[laptop["session_id"]]["state"] == "SESSION_STATE_ACTIVE"
    assert sessions[stolen["session_id"]]["state"] == "SESSION_STATE_TERMINATED"
    assert sessions[stolen["session_id"]]["end_reason"] == "suspected_hijacking"
    assert sessions[phone["session_id"]]["state"] == "SESSION_STATE_REVOKED"
    assert sessions[phone["session_id"]]["end_reason"] == "user_logout"
    assert sessions[old["session_id"]]["state"] == "SESSION_STATE_REVOKED"
    assert sessions[old["session_id"]]["end_reason"] == "user_logout_all"
    states = sorted(s["state"] for s in sessions.values())
    assert states.count("SESSION_STATE_ACTIVE") == 2

    r = http.get(f"/admin/security/{user_id}", headers=admin_headers)
    assert r.status_code == 200, r.text
    summary = r.json()
    counts = summary["counts_by_type"]
    assert counts["session_created"] == 5
    assert counts["login_success"] == 5
    assert counts["invalid_device"] == 1
    assert counts["session_hijack_attempt"] == 1
    assert counts["session_terminated"] == 1
    assert counts["session_revoked"] == 2
    assert counts["logout"] == 1
    assert counts["rate_limit_exceeded"] == 1
    assert summary["active_sessions"] == 2
    assert int(summary["rate_limit_hits"]) == 1
    assert int(summary["successful_logins"]) == 5
    assert int(summary["total_events"]) == sum(counts.values())
    assert summary["last_login_at"]
