"""The integration guide's flow over HTTP against guide_app.py, the real authority and a real
OAuth2 provider: its test_integration, then the rate limit, logout-all, hijack termination and the
admin endpoints."""

from __future__ import annotations

import json

from conftest import CREATE_LIMIT

HOME_IP = "203.0.113.10"

# The laptop's client-side fields (the guide's request.state.fingerprint_data).
LAPTOP_FIELDS = {
    "platform": "Linux x86_64",
    "timezone": "Europe/London",
    "screen_resolution": "1920x1080",
    "color_depth": 24,
    "pixel_ratio": 1.0,
    "touch_support": False,
    "device_memory": 8,
    "hardware_concurrency": 8,
}
LAPTOP = {
    "user-agent": "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0",
    "accept-language": "en-GB,en;q=0.8",
    "x-fingerprint-data": json.dumps(LAPTOP_FIELDS),
}
# Another device altogether: the device rule refuses it.
PHONE = {
    "user-agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Mobile/15E148 Safari/604.1",
    "accept-language": "en-GB",
    "x-fingerprint-data": json.dumps({"platform": "iPhone", "timezone": "Europe/London", "screen_resolution": "390x844"}),
}


def login(client, provider, user_id, device=LAPTOP, ip=HOME_IP):
    """The guide's login: the browser comes back from the provider with a code, and the app's
    callback exchanges it and creates the session."""
    code = provider.code(user_id)
    return client.post(
        "/auth/callback",
        json={"code": code["code"], "redirect_uri": code["redirect_uri"]},
        headers={**device, "x-forwarded-for": ip},
    )


def login_ok(client, provider, user_id, **kw) -> dict:
    r = login(client, provider, user_id, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def protected(client, session_id, device=LAPTOP, ip=HOME_IP):
    return client.get("/api/protected", headers={**device, "x-forwarded-for": ip, "X-Session-ID": session_id})


def test_login_flow(client, provider, user_id):
    """The guide's test_integration.test_login_flow: login, a protected endpoint, logout."""
    # Login
    response = login(client, provider, user_id)

    assert response.status_code == 200, response.text
    data = response.json()
    session_id = data["session_id"]
    assert session_id.startswith("sat_"), "X-Session-ID carries the session token"
    assert data["public_session_id"].startswith("ses_")
    assert data["access_token"], "the provider's access token, as the guide returned it"
    assert data["expires_in"] == 3600

    # Access protected endpoint
    response = protected(client, session_id)

    assert response.status_code == 200, response.text
    assert response.json() == {"user_id": user_id, "session_id": data["public_session_id"]}

    # Logout
    response = client.post("/auth/logout", headers={**LAPTOP, "x-forwarded-for": HOME_IP, "X-Session-ID": session_id})

    assert response.status_code == 200, response.text
    assert response.json() == {"status": "logged_out"}
    assert protected(client, session_id).status_code == 401


def test_no_session_and_an_unknown_session_are_401(client):
    r = client.get("/api/protected")
    assert (r.status_code, r.json()["detail"]) == (401, "No session")
    r = protected(client, "sat_0000_" + "A" * 43)
    assert (r.status_code, r.json()["detail"]) == (401, "Invalid session")


def test_the_third_login_within_300_s_is_429_not_the_second(client, provider, user_id):
    """The guide checks `session_create` and then creates; each login costs one unit."""
    assert CREATE_LIMIT == 2
    first = login_ok(client, provider, user_id)
    second = login_ok(client, provider, user_id)
    assert first["session_id"] != second["session_id"]
    third = login(client, provider, user_id)
    assert third.status_code == 429, third.text
    assert int(third.headers["retry-after"]) >= 1
    # Both sessions still work.
    assert protected(client, first["session_id"]).status_code == 200
    assert protected(client, second["session_id"]).status_code == 200


def test_logout_all_ends_every_other_session_and_keeps_this_one(client, provider, user_id):
    other = login_ok(client, provider, user_id)
    current = login_ok(client, provider, user_id)
    r = client.post("/auth/logout-all", headers={**LAPTOP, "x-forwarded-for": HOME_IP, "X-Session-ID": current["session_id"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "all_sessions_logged_out", "revoked_count": 1}
    assert protected(client, other["session_id"]).status_code == 401
    assert protected(client, current["session_id"]).status_code == 200


def test_another_device_is_refused_without_ending_the_session(client, provider, user_id):
    session = login_ok(client, provider, user_id)
    r = protected(client, session["session_id"], device=PHONE)
    assert (r.status_code, r.json()["detail"]) == (401, "Device validation failed")
    assert protected(client, session["session_id"]).status_code == 200


def test_a_stolen_session_replayed_from_many_networks_is_terminated(client, provider, user_id, admin_headers):
    """The guide's middleware: detect_session_hijacking, and above 0.7 the session ends. A token
    replayed from four networks within five minutes (0.3 for a new network, 0.3 for the velocity)
    by a browser whose language differs (0.1 for a changed fingerprint, 0.1 for the language)
    scores 0.8; each of the earlier requests scores at most 0.6 and passes."""
    session = login_ok(client, provider, user_id)
    token = session["session_id"]
    for ip in ["198.51.100.7", "192.0.2.7", "100.64.0.7"]:
        r = protected(client, token, ip=ip)
        assert r.status_code == 200, (ip, r.text)
    thief = {**LAPTOP, "accept-language": "ru-RU,ru;q=0.9"}
    r = protected(client, token, device=thief, ip="198.18.0.7")
    assert (r.status_code, r.json()["detail"]) == (401, "Session terminated due to suspicious activity")
    # Ended for everyone, the owner included.
    assert protected(client, token).status_code == 401
    sessions = client.get(f"/admin/sessions/{user_id}", headers=admin_headers).json()["sessions"]
    assert [s["state"] for s in sessions] == ["terminated"]
    summary = client.get(f"/admin/security/{user_id}", headers=admin_headers).json()
    assert summary["counts_by_type"].get("session_hijack_attempt", 0) >= 1, summary


def test_admin_endpoints(client, provider, user_id, admin_headers):
    first = login_ok(client, provider, user_id)
    second = login_ok(client, provider, user_id)

    # The admin router needs an admin API key of the authority.
    assert client.get(f"/admin/sessions/{user_id}").status_code == 401
    from conftest import SERVICE_KEY

    denied = client.get(f"/admin/sessions/{user_id}", headers={"authorization": f"Bearer {SERVICE_KEY}"})
    assert denied.status_code == 403, denied.text
    wrong = client.get(f"/admin/sessions/{user_id}", headers={"authorization": "Bearer not-a-key"})
    assert wrong.status_code == 401, wrong.text

    r = client.get(f"/admin/sessions/{user_id}", headers=admin_headers)
    assert r.status_code == 200, r.text
    listed = r.json()
    assert listed["user_id"] == user_id
    assert listed["session_count"] == 2
    assert {s["session_id"] for s in listed["sessions"]} == {first["public_session_id"], second["public_session_id"]}
    assert all(s["state"] == "active" and s["ip_address"] == HOME_IP for s in listed["sessions"])

    r = client.delete(f"/admin/sessions/{first['public_session_id']}", headers=admin_headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "terminated", "already_ended": False}
    assert protected(client, first["session_id"]).status_code == 401
    assert protected(client, second["session_id"]).status_code == 200
    again = client.delete(f"/admin/sessions/{first['public_session_id']}", headers=admin_headers)
    assert again.json() == {"status": "terminated", "already_ended": True}
    assert client.delete("/admin/sessions/ses_0000_00000000-0000-0000-0000-000000000000", headers=admin_headers).status_code == 404

    states = {s["session_id"]: s["state"] for s in client.get(f"/admin/sessions/{user_id}", headers=admin_headers).json()["sessions"]}
    assert states == {first["public_session_id"]: "terminated", second["public_session_id"]: "active"}

    summary = client.get(f"/admin/security/{user_id}", params={"hours": 24}, headers=admin_headers)
    assert summary.status_code == 200, summary.text
    counts = summary.json()["counts_by_type"]
    assert counts["login_success"] == 2, counts
    assert counts["session_created"] == 2, counts
    assert counts["session_terminated"] == 1, counts
