"""Fixtures for guide_app.py: a real redis-server, the OIDC peer (tests/peers/oidc) as the
provider the guide calls `openrouter`, the real session-authority binary configured only by the
guide's environment variables (REDIS_URL, OPENROUTER_CLIENT_ID, OPENROUTER_CLIENT_SECRET) plus
what the authority itself needs (an issuer for the provider, API keys, an encryption key for shared
storage), and guide_app under uvicorn in front of it.

The authority's settings are the guide's session_config.py values (idle 30 min, absolute 480 min,
5 sessions per user, hijack detection on), with one change so that the rate-limit test is short:
`session_create` allows 2 logins per 300 s instead of 5.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass

import httpx
import pytest

HERE = pathlib.Path(__file__).resolve().parent
EXAMPLE = HERE.parent
REPO = EXAMPLE.parent.parent

sys.path.insert(0, str(EXAMPLE))
import gen_stubs  # noqa: E402
from procs import LogPump, free_port  # noqa: E402

gen_stubs.generate()
sys.path.insert(0, str(gen_stubs.OUT))

SERVICE_KEY = "guide-service-key-000000000000001"
ADMIN_KEY = "guide-admin-key-0000000000000002"
CREATE_LIMIT = 2

AUTHORITY_CONFIG = f"""
[session]
idle_timeout = "30m"
absolute_timeout = "480m"
max_sessions_per_user = 5

[revocation]
cascade = true
list_ttl = "24h"

[security]
hijack_detection = true

[security.rules.session_create]
limit = {CREATE_LIMIT}
period = "300s"
"""


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    server = shutil.which("redis-server")
    assert server, "redis-server is missing: scripts/test installs it"
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
         "--maxmemory-policy", "noeviction", "--dir", str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    logs = LogPump(proc.stdout)
    try:
        logs.wait_for(lambda l: "Ready to accept connections" in l, timeout=20)
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop(proc)


@dataclass
class Provider:
    issuer: str
    client_id: str
    client_secret: str

    def code(self, user: str) -> dict:
        """An authorization code for `user`, from the peer's headless login, not yet exchanged."""
        r = httpx.get(f"{self.issuer}/__test/code", params={"user": user}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def stats(self) -> dict:
        return httpx.get(f"{self.issuer}/__test/stats", timeout=10).json()


@pytest.fixture(scope="session")
def provider():
    peer = REPO / "tests" / "peers" / "oidc"
    proc = subprocess.Popen(
        ["node", "provider.mjs", "--port", "0", "--access-ttl", "3600"],
        cwd=peer,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready.get("ready"), ready
        yield Provider(ready["issuer"], ready["client_id"], ready["client_secret"])
    finally:
        stop(proc)


@dataclass
class Authority:
    target: str
    logs: LogPump


@pytest.fixture(scope="session")
def authority(tmp_path_factory, redis_url, provider):
    binary = os.environ.get("SA_BINARY", str(REPO / "target" / "debug" / "session-authority"))
    assert os.access(binary, os.X_OK), f"{binary} is missing: run `cargo build` first"
    work = tmp_path_factory.mktemp("authority")
    config = work / "session-authority.toml"
    config.write_text(AUTHORITY_CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SESSION_AUTHORITY_", "OPENROUTER_", "KV_REST_"))}
    env.update(
        # The guide's variables.
        REDIS_URL=redis_url,
        OPENROUTER_CLIENT_ID=provider.client_id,
        OPENROUTER_CLIENT_SECRET=provider.client_secret,
        # Where the guide hard-coded openrouter.ai's endpoints: the peer's issuer (discovery).
        OPENROUTER_ISSUER=provider.issuer,
        # What the authority needs for shared storage and callers.
        SESSION_AUTHORITY_ENCRYPTION_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        SESSION_AUTHORITY_API_KEYS=f"service:{SERVICE_KEY},admin:{ADMIN_KEY}",
        RUST_LOG="info",
    )
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--log-format", "json", "--config", str(config),
         "--data-dir", str(work / "data")],
        env=env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    logs = LogPump(proc.stderr)
    try:
        line = logs.wait_for(lambda l: '"serving"' in l, timeout=30)
        yield Authority(target=json.loads(line)["local_addr"], logs=logs)
    finally:
        stop(proc)
        if proc.returncode not in (0, -15):
            print("authority log:\n" + logs.text())


@pytest.fixture(scope="session")
def app_url(authority, provider):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SA_", "OPENROUTER_"))}
    env.update(
        SA_TARGET=authority.target,
        SA_SERVICE_KEY=SERVICE_KEY,
        OPENROUTER_CLIENT_ID=provider.client_id,
        OPENROUTER_CLIENT_SECRET=provider.client_secret,
        OPENROUTER_TOKEN_ENDPOINT=f"{provider.issuer}/token",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        # --proxy-headers: request.client.host is the X-Forwarded-For client, as behind a proxy,
        # so that tests can come from several addresses.
        [sys.executable, "-m", "uvicorn", "guide_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--proxy-headers", "--forwarded-allow-ips", "127.0.0.1"],
        cwd=EXAMPLE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    logs = LogPump(proc.stderr)
    try:
        logs.wait_for(lambda l: "Application startup complete" in l, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        if proc.returncode not in (0, -15):
            print("app log:\n" + logs.text())


@pytest.fixture
def client(app_url):
    with httpx.Client(base_url=app_url, timeout=30) as c:
        yield c


@pytest.fixture
def user_id() -> str:
    """A fresh user per test: the per-user rate limit and cap never leak between tests."""
    return f"guide-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def admin_headers() -> dict:
    return {"authorization": f"Bearer {ADMIN_KEY}"}
