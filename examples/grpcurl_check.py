#!/usr/bin/env python3
"""Runs every command of examples/grpcurl.md, as written, against a real server.

The document is the single source: each ```sh block is preceded by an HTML comment

    <!-- expect: code=OK fields=a,b events=2 capture=VAR:path.in.json contains=x,y z -->

(all parts optional; `code` defaults to OK; `contains`, whose texts may hold spaces, comes last), or `<!-- setup -->` for the block that defines the
variables. The checker starts target/debug/session-authority (or $SA_BINARY) on a free port,
sets those variables (and only those) to its own values, runs each block with bash in order,
and checks the result. Captured variables become available to the blocks after them. Exits
non-zero, naming the block, on the first failure.

    python3 examples/grpcurl_check.py [path/to/grpcurl.md]
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent

KEYS = {
    "KEY": "grpcurl-doc-service-key-000001",
    "ADMIN_KEY": "grpcurl-doc-admin-key-00000002",
    "WATCHER_KEY": "grpcurl-doc-watcher-key-000003",
}

BLOCK = re.compile(r"<!--\s*(setup|expect:(?P<expect>[^>]*?))\s*-->\s*\n```sh\n(?P<body>.*?)\n```", re.S)
ANY_SH_BLOCK = re.compile(r"```sh\n")
VAR_USE = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)")
VAR_DEF = re.compile(r"^([A-Z_][A-Z0-9_]*)=", re.M)


class Failure(Exception):
    pass


def parse(doc: str):
    blocks = [(m.group(1) == "setup", (m.group("expect") or "").strip(), m.group("body"), doc.count("\n", 0, m.start()) + 1)
              for m in BLOCK.finditer(doc)]
    if len(blocks) != len(ANY_SH_BLOCK.findall(doc)):
        raise Failure("every ```sh block needs a <!-- setup --> or <!-- expect: ... --> comment right above it")
    setups = [b for b in blocks if b[0]]
    if len(setups) != 1:
        raise Failure("the document needs exactly one <!-- setup --> block")
    return set(VAR_DEF.findall(setups[0][2])), [b[1:] for b in blocks if not b[0]]


def parse_expect(text: str) -> dict:
    spec = {"code": "OK", "fields": [], "contains": [], "capture": [], "events": None}
    # `contains` values may hold spaces: it is the last part, the rest of the comment.
    text, _, contains = text.partition("contains=")
    if contains:
        spec["contains"] = contains.split(",")
    for part in text.split():
        key, _, value = part.partition("=")
        if key == "code":
            spec["code"] = value
        elif key == "fields":
            spec[key] = value.split(",")
        elif key == "capture":
            spec["capture"] = [tuple(c.split(":", 1)) for c in value.split(",")]
        elif key == "events":
            spec["events"] = int(value)
        else:
            raise Failure(f"unknown expectation `{part}`")
    return spec


def json_messages(out: str) -> list:
    decoder = json.JSONDecoder()
    messages, i = [], 0
    while True:
        while i < len(out) and out[i].isspace():
            i += 1
        if i == len(out):
            return messages
        message, i = decoder.raw_decode(out, i)
        messages.append(message)


def dig(message: dict, path: str):
    for part in path.split("."):
        message = message[part]
    return message


def check(spec: dict, proc: subprocess.CompletedProcess) -> dict:
    captured = {}
    if spec["code"] == "OK":
        if proc.returncode != 0:
            raise Failure(f"expected OK, exit {proc.returncode}: {proc.stderr.strip()}")
    else:
        codes = re.findall(r"Code: (\w+)", proc.stderr)
        if codes != [spec["code"]]:
            raise Failure(f"expected code {spec['code']}, got {codes or 'none'} (exit {proc.returncode}): {proc.stderr.strip()}")
    for text in spec["contains"]:
        if text not in proc.stdout:
            raise Failure(f"output does not contain {text!r}:\n{proc.stdout}")
    if spec["fields"] or spec["capture"] or spec["events"] is not None:
        try:
            messages = json_messages(proc.stdout)
        except ValueError as e:
            raise Failure(f"output is not JSON ({e}):\n{proc.stdout}")
        if not messages or not all(isinstance(m, dict) for m in messages):
            raise Failure(f"expected JSON objects:\n{proc.stdout}")
        missing = [f for f in spec["fields"] if f not in messages[0]]
        if missing:
            raise Failure(f"response lacks {missing}:\n{proc.stdout}")
        if spec["events"] is not None:
            events = sum(1 for m in messages if "event" in m)
            if events != spec["events"]:
                raise Failure(f"expected {spec['events']} event messages, got {events}:\n{proc.stdout}")
        for var, path in spec["capture"]:
            try:
                captured[var] = str(dig(messages[0], path))
            except (KeyError, TypeError):
                raise Failure(f"cannot capture {var} from {path}:\n{proc.stdout}")
    return captured


def start_server(data_dir: str):
    binary = os.environ.get("SA_BINARY", str(REPO / "target" / "debug" / "session-authority"))
    env = dict(os.environ)
    env["SESSION_AUTHORITY_API_KEYS"] = ",".join(
        f"{role}:{KEYS[var]}" for role, var in (("service", "KEY"), ("admin", "ADMIN_KEY"), ("watcher", "WATCHER_KEY"))
    )
    log = open(os.path.join(data_dir, "server.log"), "w+")
    proc = subprocess.Popen(
        [binary, "serve", "--storage", "memory", "--listen", "127.0.0.1:0", "--log-format", "json", "--data-dir", data_dir],
        env=env, stdout=subprocess.DEVNULL, stderr=log,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        log.seek(0)
        for line in log:
            if '"serving"' in line:
                return proc, json.loads(line)["local_addr"], log
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    log.seek(0)
    proc.kill()
    raise Failure("the server did not start:\n" + log.read())


def main() -> int:
    doc_path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "grpcurl.md"
    if shutil.which("grpcurl") is None:
        print("grpcurl is not installed (scripts/test installs it)", file=sys.stderr)
        return 1
    try:
        defined, blocks = parse(doc_path.read_text())
        provided = set(KEYS) | {"ADDR"}
        if defined != provided:
            raise Failure(f"the setup block defines {sorted(defined)}; the checker provides {sorted(provided)}")
    except Failure as e:
        print(f"{doc_path}: {e}", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="grpcurl-doc-") as data_dir:
        server, addr, log = start_server(data_dir)
        try:
            variables = dict(KEYS, ADDR=addr)
            for expect, body, line in blocks:
                where = f"{doc_path.name}:{line}"
                try:
                    spec = parse_expect(expect)
                    unknown = sorted(set(VAR_USE.findall(body)) - set(variables))
                    if unknown:
                        raise Failure(f"uses {unknown}, defined neither in the setup block nor captured earlier")
                    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), **variables}
                    proc = subprocess.run(["bash", "-c", body], env=env, capture_output=True, text=True, timeout=60)
                    variables.update(check(spec, proc))
                except (Failure, subprocess.TimeoutExpired) as e:
                    print(f"FAIL {where}\n{body}\n{e}", file=sys.stderr)
                    return 1
                method = body.split("$ADDR", 1)[-1].split()[0] if "$ADDR" in body else body.split()[0]
                print(f"ok   {where} {method} ({spec['code']})")
            print(f"{len(blocks)} commands ran as written")
            return 0
        finally:
            server.terminate()
            server.wait(timeout=10)
            log.close()


if __name__ == "__main__":
    sys.exit(main())
