"""Fixtures: the real session-authority binary on a free port, the example app under uvicorn as a
subprocess in front of it, and an httpx client for the app.

When SA_TEST_TARGET is set (the Node suite sets it, with SA_TEST_METRICS_URL and the three keys,
to watch the revocations this suite makes), the suite runs against that authority instead of
starting one. When SA_TEST_REVOKED_OUT names a file, every session id this suite ended is
appended to it, one per line.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass, field

import httpx
import pytest

HERE = pathlib.Path(__file__).resolve().parent
EXAMPLE = HERE.parent
REPO = EXAMPLE.parent.parent

sys.path.insert(0, str(EXAMPLE))
import gen_stubs  # noqa: E402
from procs import LogPump, free_port  # noqa: E402,F401

gen_stubs.generate()
sys.path.insert(0, str(gen_stubs.OUT))

SERVICE_KEY = "example-service-key-00000000001"
ADMIN_KEY = "example-admin-key-000000000000002"
WATCHER_KEY = "example-watcher-key-0000000000003"
APP_ADMIN_TOKEN = "app-admin-token-for-tests"


@dataclass
class Authority:
    target: str
    metrics_url: str
    service_key: str
    admin_key: str
    watcher_key: str
    revoked_out: pathlib.Path | None = None
    ended: list[str] = field(default_factory=list)

    def metric(self, method: str, code: str | None = None) -> int:
        """grpc_server_handled_total for one method (summed over codes unless one is given)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        total = 0
        for line in text.splitlines():
            if not line.startswith("grpc_server_handled_total{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if labels.get("grpc_method") == method and (code is None or labels.get("grpc_code") == code):
                total += int(float(line.rsplit(" ", 1)[1]))
        return total

    def record_ended(self, *session_ids: str) -> None:
        """Notes sessions this suite ended, for the Node watcher's check."""
        self.ended.extend(session_ids)
        if self.revoked_out is not None:
            with self.revoked_out.open("a") as f:
                for sid in session_ids:
                    f.write(sid + "\n")


@pytest.fixture(scope="session")
def authority(tmp_path_factory):
    revoked_out = os.environ.get("SA_TEST_REVOKED_OUT")
    revoked_out = pathlib.Path(revoked_out) if revoked_out else None
    if os.environ.get("SA_TEST_TARGET"):
        yield Authority(
            target=os.environ["SA_TEST_TARGET"],
            metrics_url=os.environ["SA_TEST_METRICS_URL"],
            service_key=os.environ["SA_TEST_SERVICE_KEY"],
            admin_key=os.environ["SA_TEST_ADMIN_KEY"],
            watcher_key=os.environ["SA_TEST_WATCHER_KEY"],
            revoked_out=revoked_out,
        )
        return

    binary = os.environ.get("SA_BINARY", str(REPO / "target" / "debug" / "session-authority"))
    assert os.access(binary, os.X_OK), f"{binary} is missing: run `cargo build` first"
    metrics_port = free_port()
    env = dict(os.environ)
    env["SESSION_AUTHORITY_API_KEYS"] = f"service:{SERVICE_KEY},admin:{ADMIN_KEY},watcher:{WATCHER_KEY}"
    env.setdefault("RUST_LOG", "info")
    proc = subprocess.Popen(
        [
            binary, "serve",
            "--storage", "memory",
            "--listen", "127.0.0.1:0",
            "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--log-format", "json",
            "--data-dir", str(tmp_path_factory.mktemp("authority")),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    logs = LogPump(proc.stderr)
    try:
        line = logs.wait_for(lambda l: '"serving"' in l, timeout=20)
        target = json.loads(line)["local_addr"]
        yield Authority(
            target=target,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            service_key=SERVICE_KEY,
            admin_key=ADMIN_KEY,
            watcher_key=WATCHER_KEY,
            revoked_out=revoked_out,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class AppProcess:
    url: str
    logs: LogPump


@pytest.fixture(scope="session")
def app_process(authority):
    port = free_port()
    env = dict(os.environ)
    env.update(
        SA_TARGET=authority.target,
        SA_SERVICE_KEY=authority.service_key,
        SA_ADMIN_KEY=authority.admin_key,
        APP_ADMIN_TOKEN=APP_ADMIN_TOKEN,
        APP_TRUST_FORWARDED_FOR="1",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=EXAMPLE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    logs = LogPump(proc.stderr)
    try:
        logs.wait_for(lambda l: "Application startup complete" in l, timeout=30)
        yield AppProcess(url=f"http://127.0.0.1:{port}", logs=logs)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.returncode not in (0, -15):
            print("app log:\n" + logs.text())


@pytest.fixture
def http(app_process):
    with httpx.Client(base_url=app_process.url, timeout=10) as client:
        yield client


@pytest.fixture
def user_id() -> str:
    """A fresh user per test: the per-user rate limit and cap never leak between tests or runs."""
    return f"user-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def admin_headers() -> dict:
    return {"authorization": f"Bearer {APP_ADMIN_TOKEN}"}


@pytest.fixture(scope="session")
def grpc_stubs(authority):
    """Direct stubs for checks the app does not expose (IsRevoked), with the watcher key."""
    import grpc

    from atoms.session.v1 import revocation_service_pb2_grpc

    channel = grpc.insecure_channel(authority.target)
    yield revocation_service_pb2_grpc.RevocationServiceStub(channel), (
        ("authorization", f"Bearer {authority.watcher_key}"),
    )
    channel.close()
