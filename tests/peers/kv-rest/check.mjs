#!/usr/bin/env node
// check.mjs: proves that shim.mjs speaks the Upstash REST protocol the way the
// OFFICIAL @upstash/redis client (pinned in package.json) uses it, so the shim
// cannot merely mirror the assumptions of Session Authority's own Rust client.
//
// It starts its own redis-server (free port, temp dir) and the shim as child
// processes, drives them with @upstash/redis, checks the real Redis state with
// ioredis (the "truth" connection, bypassing the shim), inspects the exact wire
// exchanges through the shim's /__test/stats, and stops both children at the end.
//
// Run:  npm ci && node check.mjs      (exit code 0 only if every check passed;
//                                      last line: "N passed, M failed")

import { spawn } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { Redis } from "@upstash/redis";
import IORedis from "ioredis";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const TOKEN = "check-" + crypto.randomBytes(12).toString("hex");
const OVERALL_TIMEOUT_MS = 180_000;

// ---------------------------------------------------------------- process plumbing

const children = new Set();
process.on("exit", () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
});

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function waitExit(child, ms) {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  }
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(null), ms);
    child.once("exit", (code, signal) => {
      clearTimeout(t);
      resolve({ code, signal });
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function startRedis(dir) {
  let lastErr;
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    // Run redis-server directly, so child.pid is redis-server's own PID.
    const child = spawn(
      "redis-server",
      ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    children.add(child);
    let out = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (out += d));
    const truth = new IORedis({ host: "127.0.0.1", port, protocol: 2, lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
    truth.on("error", () => {});
    const deadline = Date.now() + 5000;
    while (Date.now() < deadline && child.exitCode === null) {
      try {
        await truth.connect();
        if ((await truth.ping()) === "PONG") return { child, port, truth, log: () => out };
      } catch (e) {
        lastErr = e;
        truth.disconnect();
      }
      await sleep(50);
    }
    truth.disconnect();
    child.kill("SIGKILL");
    lastErr = new Error(`redis-server on port ${port} did not come up: ${out.slice(-500)}`);
  }
  throw lastErr;
}

function startShim(redisPort) {
  const child = spawn(
    process.execPath,
    [path.join(HERE, "shim.mjs"), "--port", "0", "--redis", `redis://127.0.0.1:${redisPort}`, "--token", TOKEN],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  children.add(child);
  let err = "";
  child.stderr.on("data", (d) => (err += d));
  return new Promise((resolve, reject) => {
    let buf = "";
    const lines = [];
    const t = setTimeout(() => reject(new Error(`shim not ready in 15 s; stderr:\n${err}`)), 15000);
    child.stdout.on("data", (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        lines.push(buf.slice(0, i));
        buf = buf.slice(i + 1);
        if (lines.length === 1) {
          clearTimeout(t);
          resolve({ child, readyLine: lines[0], stdoutLines: lines, stderr: () => err });
        }
      }
    });
    child.once("exit", (code) => {
      clearTimeout(t);
      reject(new Error(`shim exited early (${code}); stderr:\n${err}`));
    });
  });
}

// ---------------------------------------------------------------- test runner

const tests = [];
const test = (name, fn) => tests.push({ name, fn });
let passed = 0;
let failed = 0;

async function runTests() {
  for (const t of tests) {
    const started = Date.now();
    try {
      await t.fn();
      passed++;
      console.log(`ok   ${t.name} (${Date.now() - started} ms)`);
    } catch (e) {
      failed++;
      console.log(`FAIL ${t.name}\n     ${String(e?.stack ?? e).split("\n").slice(0, 6).join("\n     ")}`);
    }
  }
}

// ---------------------------------------------------------------- helpers against the shim

let URL_;   // shim base URL
let truth;  // ioredis straight to redis-server (bypasses the shim)

async function raw(pathname, { body, method = "POST", headers = {}, token = TOKEN } = {}) {
  const h = { ...headers };
  if (token !== null) h.Authorization = `Bearer ${token}`;
  let payload;
  if (body !== undefined) payload = Buffer.isBuffer(body) || typeof body === "string" ? body : JSON.stringify(body);
  const res = await fetch(URL_ + pathname, { method, headers: h, body: payload });
  const text = await res.text();
  let json;
  try { json = JSON.parse(text); } catch { json = undefined; }
  return { status: res.status, text, json, headers: res.headers };
}
const stats = async () => (await fetch(URL_ + "/__test/stats")).json();
const resetStats = async () => { await fetch(URL_ + "/__test/reset", { method: "POST" }); };
const exchanges = async () => (await stats()).recent;
async function injectFailure(rule) {
  const r = await fetch(URL_ + "/__test/fail", { method: "POST", body: JSON.stringify(rule) });
  assert.equal(r.status, 200, "arming failure injection");
}
async function rejects(promise, re) {
  try {
    await promise;
  } catch (e) {
    if (re) assert.match(String(e?.message), re);
    return e;
  }
  throw new Error(`expected a rejection${re ? " matching " + re : ""}`);
}
const b64 = (s) => Buffer.from(s, "utf8").toString("base64");

// Three official clients: the default one (auto-pipelining ON, base64 ON, as
// `new Redis({url, token})` behaves), one that sends every command on its own
// (POST /), and one that asks for plain (non-base64) responses.
let redis, direct, plain;

// ---------------------------------------------------------------- the checks

let shim, readyLine;

test("ready line is exactly {ready,url,token} on one stdout line", async () => {
  const j = JSON.parse(readyLine);
  assert.deepEqual(Object.keys(j), ["ready", "url", "token"]);
  assert.equal(j.ready, true);
  assert.match(j.url, /^http:\/\/127\.0\.0\.1:\d+$/);
  assert.equal(j.token, TOKEN);
  await sleep(50);
  assert.equal(shim.stdoutLines.length, 1, "nothing else on stdout");
});

test("set/get string via default client goes over POST /pipeline, base64-encoded", async () => {
  await resetStats();
  assert.equal(await redis.set("str:a", "hello"), "OK");
  assert.equal(await redis.get("str:a"), "hello");
  assert.equal(await truth.get("str:a"), "hello");
  const [w1, w2] = await exchanges();
  assert.equal(w1.method, "POST");
  assert.equal(w1.path, "/pipeline");
  assert.equal(w1.headers["upstash-encoding"], "base64");
  assert.equal(w1.headers["content-type"], "application/json");
  assert.deepEqual(JSON.parse(w1.request), [["set", "str:a", "hello"]]);
  assert.equal(w1.status, 200);
  assert.equal(w1.response, '[{"result":"OK"}]');
  assert.deepEqual(JSON.parse(w2.request), [["get", "str:a"]]);
  assert.equal(w2.response, `[{"result":"${b64("hello")}"}]`);
});

test("set/get via single-command endpoint POST / (auto-pipelining off)", async () => {
  await resetStats();
  assert.equal(await direct.set("str:d", "v"), "OK");
  assert.equal(await direct.get("str:d"), "v");
  const [w1, w2] = await exchanges();
  assert.equal(w1.path, "/");
  assert.deepEqual(JSON.parse(w1.request), ["set", "str:d", "v"]);
  assert.equal(w1.response, '{"result":"OK"}');
  assert.equal(w2.response, '{"result":"dg=="}');
});

test("JSON values: client serialises objects/numbers/booleans, get deserialises", async () => {
  const obj = { a: 1, nested: { b: [1, "two", null] }, s: "x" };
  await resetStats();
  await direct.set("json:obj", obj);
  assert.equal(await truth.get("json:obj"), JSON.stringify(obj));
  assert.deepEqual(await direct.get("json:obj"), obj);
  await direct.set("json:num", 42);
  const w = (await exchanges()).find((x) => x.request.includes("json:num"));
  assert.equal(w.request, '["set","json:num",42]', "numbers travel as JSON numbers");
  assert.equal(await truth.get("json:num"), "42");
  assert.equal(await direct.get("json:num"), 42);
  await direct.set("json:bool", true);
  assert.equal(await truth.get("json:bool"), "true");
  assert.equal(await direct.get("json:bool"), true);
  await direct.set("json:arr", [1, "b"]);
  assert.deepEqual(await direct.get("json:arr"), [1, "b"]);
  // Surprise worth knowing: a string that looks like a number comes back as a number.
  await direct.set("json:numstr", "123");
  assert.equal(await truth.get("json:numstr"), "123");
  assert.equal(await direct.get("json:numstr"), 123);
});

test("non-ASCII and binary-looking strings round-trip as UTF-8", async () => {
  const s = "héllo wörld — ✓ 🔐 日本語 \u0000\u0001\u001f\u007f\u00ff\ufffd end";
  await resetStats();
  await redis.set("utf:1", s);
  assert.equal(await redis.get("utf:1"), s);
  assert.ok((await truth.getBuffer("utf:1")).equals(Buffer.from(s, "utf8")), "stored bytes are the UTF-8 of the JS string");
  const w = (await exchanges())[1];
  assert.equal(w.response, `[{"result":"${Buffer.from(s, "utf8").toString("base64")}"}]`);
  // "binary-looking" JS string: code points U+0000 U+00FF U+00FE U+0080 are stored as UTF-8, not as raw bytes.
  await direct.set("utf:binlike", "\x00\xff\xfe\x80");
  assert.deepEqual([...(await truth.getBuffer("utf:binlike"))], [0x00, 0xc3, 0xbf, 0xc3, 0xbe, 0xc2, 0x80]);
  assert.equal(await direct.get("utf:binlike"), "\x00\xff\xfe\x80");
  // Values that look like protocol tokens are not confused with them.
  for (const v of ["OK", "T0s=", "dg==", "null", "PONG"]) {
    await direct.set("utf:tok", v);
    assert.equal(await truth.get("utf:tok"), v);
    const got = await direct.get("utf:tok");
    assert.equal(String(got), v === "null" ? "null" : v, `value ${v}`);
  }
});

test("raw (non-UTF-8) bytes: exact on the wire in base64; the JS client decodes lossily", async () => {
  const bytes = Buffer.from([0x00, 0xff, 0x80, 0xfe, 0x41]);
  await truth.set("bin:raw", bytes);
  const r = await raw("/", { body: ["get", "bin:raw"], headers: { "Upstash-Encoding": "base64" } });
  assert.equal(r.status, 200);
  assert.equal(r.text, `{"result":"${bytes.toString("base64")}"}`);
  assert.ok(Buffer.from(r.json.result, "base64").equals(bytes));
  const viaClient = await direct.get("bin:raw");
  assert.ok(String(viaClient).includes("\ufffd"), "official client runs TextDecoder over the bytes");
  // Writing exact bytes: path-style POST with the value as the raw request body.
  const w = await raw("/set/bin:path", { body: bytes });
  assert.equal(w.status, 200);
  assert.ok((await truth.getBuffer("bin:path")).equals(bytes));
});

test("del", async () => {
  await redis.set("del:1", "a");
  await redis.set("del:2", "b");
  assert.equal(await redis.del("del:1", "del:2", "del:missing"), 2);
  assert.equal(await redis.get("del:1"), null);
  assert.equal(await truth.exists("del:1", "del:2"), 0);
  assert.equal(await direct.del("del:1"), 0);
});

test("incr / incrby, integers are bare JSON numbers with exact digits", async () => {
  assert.equal(await redis.incr("num:c"), 1);
  assert.equal(await redis.incr("num:c"), 2);
  assert.equal(await direct.incrby("num:c", 40), 42);
  assert.equal(await truth.get("num:c"), "42");
  await truth.set("num:big", "9007199254740992");
  const r = await raw("/", { body: ["incr", "num:big"], headers: { "Upstash-Encoding": "base64" } });
  assert.equal(r.text, '{"result":9007199254740993}', "shim keeps all digits");
  assert.equal(await truth.get("num:big"), "9007199254740993");
  const viaClient = await direct.incr("num:big");
  assert.equal(typeof viaClient, "number", "JS client parses into a double (loses the last digit)");
  // A JSON-number argument that a double cannot hold exactly is refused, not rounded.
  const bad = await raw("/", { body: '["incrby","num:c",9007199254740993]' });
  assert.equal(bad.status, 400);
  assert.match(bad.json.error, /send it as a JSON string/);
});

test("expire / ttl / persist / set ex", async () => {
  await redis.set("ttl:a", "v");
  assert.equal(await redis.expire("ttl:a", 100), 1);
  const t = await redis.ttl("ttl:a");
  assert.ok(t > 95 && t <= 100, `ttl ${t}`);
  assert.equal(await redis.ttl("ttl:missing"), -2);
  assert.equal(await redis.persist("ttl:a"), 1);
  assert.equal(await redis.ttl("ttl:a"), -1);
  await redis.set("ttl:b", "v", { ex: 50 });
  const t2 = await truth.ttl("ttl:b");
  assert.ok(t2 > 45 && t2 <= 50, `truth ttl ${t2}`);
  assert.equal(await redis.expire("ttl:missing", 10), 0);
});

test("hset / hgetall (flat array on the wire, object in the client)", async () => {
  await resetStats();
  assert.equal(await redis.hset("h:1", { name: "ann", age: 31, meta: { x: 1 } }), 3);
  assert.deepEqual(await redis.hgetall("h:1"), { name: "ann", age: 31, meta: { x: 1 } });
  assert.deepEqual(await truth.hgetall("h:1"), { name: "ann", age: "31", meta: '{"x":1}' });
  assert.equal(await redis.hgetall("h:missing"), null);
  const w = (await exchanges()).find((x) => x.request.includes('"hgetall","h:1"'));
  assert.equal(w.path, "/", "hgetall is excluded from auto-pipelining");
  const result = JSON.parse(w.response).result;
  assert.ok(Array.isArray(result) && result.length === 6 && result.every((x) => typeof x === "string"));
  assert.equal(await redis.hget("h:1", "name"), "ann");
});

test("zadd / zrange with scores", async () => {
  await resetStats();
  assert.equal(
    await redis.zadd("z:1", { score: 1.5, member: "a" }, { score: -2, member: "b" }, { score: 10, member: "c" }),
    3,
  );
  assert.deepEqual(await redis.zrange("z:1", 0, -1, { withScores: true }), ["b", -2, "a", 1.5, "c", 10]);
  assert.deepEqual(await redis.zrange("z:1", 0, -1), ["b", "a", "c"]);
  assert.equal(await redis.zscore("z:1", "a"), 1.5);
  assert.deepEqual(await truth.zrange("z:1", 0, -1, "WITHSCORES"), ["b", "-2", "a", "1.5", "c", "10"]);
  const w = (await exchanges())[0];
  assert.equal(w.request, '[["zadd","z:1",1.5,"a",-2,"b",10,"c"]]');
  const zr = (await exchanges()).find((x) => x.request.includes("withscores"));
  assert.equal(zr.response, `{"result":["${b64("b")}","${b64("-2")}","${b64("a")}","${b64("1.5")}","${b64("c")}","${b64("10")}"]}`);
});

test("sadd / smembers", async () => {
  assert.equal(await redis.sadd("s:1", "a", "b", "c"), 3);
  assert.equal(await redis.sadd("s:1", "a"), 0);
  assert.deepEqual((await redis.smembers("s:1")).sort(), ["a", "b", "c"]);
  assert.deepEqual((await truth.smembers("s:1")).sort(), ["a", "b", "c"]);
  assert.equal(await redis.sismember("s:1", "b"), 1);
});

test("lpush / lrange", async () => {
  assert.equal(await redis.lpush("l:1", "a", "b", "c"), 3);
  assert.deepEqual(await redis.lrange("l:1", 0, -1), ["c", "b", "a"]);
  assert.deepEqual(await truth.lrange("l:1", 0, -1), ["c", "b", "a"]);
  assert.equal(await redis.llen("l:1"), 3);
});

test("xadd / xrange (Redis streams, nested arrays)", async () => {
  await resetStats();
  const id1 = await redis.xadd("x:1", "*", { event: "login", user: "u1" });
  const id2 = await redis.xadd("x:1", "*", { event: "logout", n: 5 });
  assert.match(id1, /^\d+-\d+$/);
  assert.match(id2, /^\d+-\d+$/);
  assert.deepEqual(await redis.xrange("x:1", "-", "+"), {
    [id1]: { event: "login", user: "u1" },
    [id2]: { event: "logout", n: 5 },
  });
  assert.equal(await truth.xlen("x:1"), 2);
  const w = (await exchanges()).find((x) => x.request.includes("XRANGE"));
  const result = JSON.parse(w.response).result;
  assert.equal(result.length, 2);
  assert.equal(Buffer.from(result[0][0], "base64").toString(), id1);
  assert.deepEqual(result[0][1].map((s) => Buffer.from(s, "base64").toString()), ["event", "login", "user", "u1"]);
});

test("pipeline: one POST /pipeline, array of {result}|{error}, HTTP 200 even with an error inside", async () => {
  await resetStats();
  const p = redis.pipeline();
  p.set("p:a", "1").incr("p:c").get("p:a").get("p:missing");
  assert.deepEqual(await p.exec(), ["OK", 1, 1, null]);
  const [w] = await exchanges();
  assert.equal(w.path, "/pipeline");
  assert.deepEqual(JSON.parse(w.request), [["set", "p:a", "1"], ["incr", "p:c"], ["get", "p:a"], ["get", "p:missing"]]);
  assert.equal(w.response, `[{"result":"OK"},{"result":1},{"result":"${b64("1")}"},{"result":null}]`);

  const p2 = redis.pipeline();
  p2.set("p:s", "x").hget("p:s", "f").get("p:s");
  const kept = await p2.exec({ keepErrors: true });
  assert.equal(kept[0].result, "OK");
  assert.match(kept[1].error, /^WRONGTYPE/);
  assert.equal(kept[2].result, "x");
  const p3 = redis.pipeline();
  p3.set("p:s", "x").hget("p:s", "f");
  await rejects(p3.exec(), /Command 2 \[ hget \] failed: WRONGTYPE/);
  const last = (await exchanges()).at(-1);
  assert.equal(last.status, 200);
  assert.match(last.response, /^\[\{"result":"OK"\},\{"error":"WRONGTYPE/);
});

test("transaction: redis.multi() -> POST /multi-exec", async () => {
  await resetStats();
  assert.deepEqual(await redis.multi().set("t:a", "x").incr("t:n").get("t:a").exec(), ["OK", 1, "x"]);
  const [w] = await exchanges();
  assert.equal(w.path, "/multi-exec");
  assert.deepEqual(JSON.parse(w.request), [["set", "t:a", "x"], ["incr", "t:n"], ["get", "t:a"]]);
  assert.equal(w.status, 200);
  assert.equal(w.response, `[{"result":"OK"},{"result":1},{"result":"${b64("x")}"}]`);
  // Runtime error inside EXEC: per-entry error, the rest still applied (Redis has no rollback).
  const r = await redis.multi().set("t:b", "1").hget("t:b", "f").incr("t:b").exec({ keepErrors: true });
  assert.match(r[1].error, /^WRONGTYPE/);
  assert.equal(r[2].result, 2);
  assert.equal(await truth.get("t:b"), "2");
  // Queue-time error: Redis discards the whole transaction -> HTTP 400, nothing applied.
  const bad = await raw("/multi-exec", { body: [["set", "t:c", "1"], ["frob"]] });
  assert.equal(bad.status, 400);
  assert.match(bad.json.error, /^EXECABORT/);
  assert.equal(await truth.exists("t:c"), 0);
});

test("transactions stay atomic under concurrent traffic on the shared connection", async () => {
  await truth.del("atom:n");
  const multis = [];
  const singles = [];
  for (let i = 0; i < 25; i++) {
    multis.push(raw("/multi-exec", { body: [["incr", "atom:n"], ["incr", "atom:n"], ["incr", "atom:n"]] }));
    singles.push(raw("/", { body: ["incr", "atom:n"] }));
    singles.push(raw("/pipeline", { body: [["incr", "atom:n"], ["incr", "atom:n"]] }));
  }
  for (const r of await Promise.all(multis)) {
    assert.equal(r.status, 200);
    const [a, b, c] = r.json.map((e) => e.result);
    assert.deepEqual([b - a, c - b], [1, 1], "no foreign INCR inside MULTI/EXEC");
  }
  await Promise.all(singles);
  assert.equal(await truth.get("atom:n"), String(25 * 3 + 25 + 25 * 2));
});

const LUA = `
local n = redis.call('INCRBY', KEYS[1], tonumber(ARGV[2]))
return { KEYS[1], ARGV[1], n, { 1, { 2, 'deep', { ARGV[1] } } }, false, 7 }
`;

test("eval with keys and args: nested arrays, integers, nil", async () => {
  await resetStats();
  const r1 = await direct.eval(LUA, ["ev:k"], ["hello", 41]);
  assert.deepEqual(r1, ["ev:k", "hello", 41, [1, [2, "deep", ["hello"]]], null, 7]);
  const [w] = await exchanges();
  assert.deepEqual(JSON.parse(w.request), ["eval", LUA, 1, "ev:k", "hello", 41]);
  assert.equal(
    w.response,
    `{"result":["${b64("ev:k")}","${b64("hello")}",41,[1,[2,"${b64("deep")}",["${b64("hello")}"]]],null,7]}`,
  );
  const r2 = await redis.eval(LUA, ["ev:k"], ["hello", 1]);
  assert.equal(r2[2], 42);
  assert.equal(await truth.get("ev:k"), "42");
});

test("scriptLoad then evalsha; unknown sha gives NOSCRIPT; createScript falls back to eval", async () => {
  const sha = await redis.scriptLoad(LUA);
  assert.equal(sha, crypto.createHash("sha1").update(LUA).digest("hex"));
  assert.deepEqual(await truth.script("EXISTS", sha), [1]);
  const r = await direct.evalsha(sha, ["ev:k2"], ["x", 5]);
  assert.deepEqual(r, ["ev:k2", "x", 5, [1, [2, "deep", ["x"]]], null, 7]);
  await rejects(direct.evalsha("0".repeat(40), [], []), /NOSCRIPT/);
  await truth.script("FLUSH");
  await resetStats();
  const script = direct.createScript("return {ARGV[1], 3}");
  assert.deepEqual(await script.exec([], ["y"]), ["y", 3]);
  const counts = (await stats()).commandCounts;
  assert.equal(counts.evalsha, 1);
  assert.equal(counts.eval, 1);
});

test("nil results: explicit {\"result\":null}", async () => {
  await resetStats();
  assert.equal(await direct.get("nil:missing"), null);
  assert.equal((await exchanges())[0].response, '{"result":null}');
  assert.equal(await direct.hget("nil:h", "f"), null);
  assert.equal(await direct.lpop("nil:l"), null);
  assert.deepEqual(await direct.mget("nil:a", "json:num"), [null, 42]);
  assert.equal(await redis.get("nil:missing"), null);
});

test("error reply (WRONGTYPE) surfaces as an error; HTTP 400 on POST /", async () => {
  await truth.set("err:s", "v");
  await resetStats();
  const e = await rejects(direct.hget("err:s", "f"), /^WRONGTYPE .*, command was: \["hget","err:s","f"\]$/);
  assert.equal(e.name, "UpstashError");
  const [w] = await exchanges();
  assert.equal(w.status, 400);
  assert.equal(w.response, '{"error":"WRONGTYPE Operation against a key holding the wrong kind of value"}');
  await rejects(redis.hget("err:s", "f"), /^Command failed: WRONGTYPE/);
  await rejects(redis.exec(["frob", "x"]), /ERR unknown command/);
});

test("wrong token -> 401 {\"error\":\"Unauthorized\"} and an error in the client", async () => {
  await resetStats();
  const bad = new Redis({ url: URL_, token: "wrong-token", enableAutoPipelining: false });
  await rejects(bad.get("str:a"), /^Unauthorized, command was/);
  const badAuto = new Redis({ url: URL_, token: "wrong-token" });
  await rejects(badAuto.get("str:a"), /Unauthorized/);
  const [w] = await exchanges();
  assert.equal(w.status, 401);
  assert.equal(w.response, '{"error":"Unauthorized"}');
  const none = await raw("/", { body: ["get", "str:a"], token: null });
  assert.equal(none.status, 401);
  const q = await raw(`/get/str:a?_token=${TOKEN}`, { method: "GET", token: null });
  assert.equal(q.status, 200);
  assert.equal((await stats()).unauthorized, 3);
});

test("injected 429: error in client, no retry, next request fine", async () => {
  await resetStats();
  await injectFailure({ status: 429, count: 1 });
  await rejects(direct.get("str:a"), /max requests limit exceeded/);
  assert.equal((await stats()).requests, 1, "client does not retry an HTTP error status");
  assert.equal(await direct.get("str:a"), "hello");
  const s = await stats();
  assert.equal(s.statuses["429"], 1);
  assert.equal(s.injected, 1);
  assert.deepEqual(s.pendingFailures, []);
});

test("injected 503 x2 (also via auto-pipeline), then recovery", async () => {
  await injectFailure({ status: 503, count: 2 });
  await rejects(direct.get("str:a"), /Service Unavailable/);
  await rejects(redis.get("str:a"), /Service Unavailable/);
  assert.equal(await redis.get("str:a"), "hello");
});

test("injected 500 with a custom error text", async () => {
  await injectFailure({ status: 500, count: 1, error: "ERR boom" });
  await rejects(direct.set("str:x", "1"), /^ERR boom, command was/);
  assert.equal(await truth.exists("str:x"), 0, "the failed request never reached Redis");
});

test("injected connection reset: the client retries (network errors only) and succeeds", async () => {
  await resetStats();
  const retrying = new Redis({ url: URL_, token: TOKEN, enableAutoPipelining: false, retry: { retries: 3, backoff: () => 10 } });
  await injectFailure({ mode: "reset", count: 2 });
  assert.equal(await retrying.get("str:a"), "hello");
  const ex = await exchanges();
  assert.equal(ex.length, 3);
  assert.deepEqual(ex.map((x) => x.headers["upstash-telemetry-retry"] ?? null), [null, "1", "2"]);
  // Surprise: `retry: false` means attempts=1, and the loop runs attempts+1 times,
  // so the client still makes TWO requests before giving up.
  await resetStats();
  const noRetry = new Redis({ url: URL_, token: TOKEN, enableAutoPipelining: false, retry: false });
  await injectFailure({ mode: "reset", count: 2 });
  await rejects(noRetry.get("str:a"), /fetch failed/);
  assert.equal((await stats()).requests, 2);
});

test("injected timeout: a client-side timeout fires; the shim keeps serving", async () => {
  await injectFailure({ mode: "timeout", count: 1, ms: 5000 });
  const t0 = Date.now();
  const timed = new Redis({ url: URL_, token: TOKEN, enableAutoPipelining: false, signal: () => AbortSignal.timeout(300) });
  const e = await rejects(timed.get("str:a"));
  assert.equal(e.name, "TimeoutError");
  assert.ok(Date.now() - t0 < 3000);
  assert.equal(await direct.get("str:a"), "hello");
});

test("(client behaviour) a plain AbortSignal that fires makes the client RESOLVE, not throw", async () => {
  await injectFailure({ mode: "timeout", count: 1, ms: 5000 });
  const quirky = new Redis({ url: URL_, token: TOKEN, enableAutoPipelining: false, signal: AbortSignal.timeout(300) });
  assert.equal(await quirky.get("str:a"), null, "looks like a cache miss");
});

test("injected delay and non-JSON body", async () => {
  await injectFailure({ mode: "delay", count: 1, ms: 250 });
  const t0 = Date.now();
  assert.equal(await direct.get("str:a"), "hello");
  assert.ok(Date.now() - t0 >= 240);
  await injectFailure({ mode: "garbage", count: 1, status: 502 });
  const e = await rejects(direct.get("str:a"), /Unable to parse response body/);
  assert.equal(e.name, "UpstashJSONParseError");
});

test("plain responses (responseEncoding: false): no Upstash-Encoding header, raw UTF-8 strings", async () => {
  await resetStats();
  const s = "plain ✓ 日本 🔐";
  assert.equal(await plain.set("plain:1", s), "OK");
  assert.equal(await plain.get("plain:1"), s);
  assert.deepEqual(await plain.zrange("z:1", 0, -1, { withScores: true }), ["b", -2, "a", 1.5, "c", 10]);
  const [w1, w2] = await exchanges();
  assert.equal(w1.headers["upstash-encoding"], undefined);
  assert.equal(w2.response, JSON.stringify({ result: s }));
});

test("path-style commands (GET /cmd/args, POST body = last arg, query = trailing args)", async () => {
  let r = await raw("/set/path:k/v%20w", { method: "GET" });
  assert.deepEqual([r.status, r.text], [200, '{"result":"OK"}']);
  r = await raw("/get/path:k", { method: "GET" });
  assert.equal(r.json.result, "v w");
  r = await raw("/set/path:b?EX=100", { body: '{"json":"body"}' });
  assert.equal(r.status, 200);
  assert.equal(await truth.get("path:b"), '{"json":"body"}');
  const t = await truth.ttl("path:b");
  assert.ok(t > 95 && t <= 100);
  r = await raw("/get/path:b", { method: "GET", headers: { "Upstash-Encoding": "base64" } });
  assert.equal(r.json.result, b64('{"json":"body"}'));
  assert.deepEqual(await direct.get("path:b"), { json: "body" });
});

test("malformed / unsupported requests", async () => {
  let r = await raw("/", { method: "DELETE" });
  assert.equal(r.status, 405);
  r = await raw("/pipeline", { method: "GET" });
  assert.equal(r.status, 405);
  r = await raw("/", { body: "not json" });
  assert.deepEqual([r.status, typeof r.json.error], [400, "string"]);
  r = await raw("/", { body: ["set", "k", null] });
  assert.equal(r.status, 400);
  r = await raw("/", { body: [] });
  assert.equal(r.status, 400);
  r = await raw("/pipeline", { body: [] });
  assert.equal(r.status, 400);
  r = await raw("/pipeline", { body: ["get", "k"] });
  assert.equal(r.status, 400);
  const t0 = Date.now();
  r = await raw("/", { body: ["blpop", "nothing", 0] });
  assert.equal(r.status, 400, "blocking command refused, connection not blocked");
  assert.ok(Date.now() - t0 < 2000);
  r = await raw("/", { body: ["subscribe", "ch"] });
  assert.equal(r.status, 400);
  // Arguments reach Redis untouched (no client-library argument rewriting):
  r = await raw("/", { body: ["hset", "bad:h", "only-field"] });
  assert.equal(r.status, 400);
  assert.match(r.json.error, /wrong number of arguments/);
  r = await raw("/", { body: ["mset", "bad:m"] });
  assert.match(r.json.error, /wrong number of arguments/);
  const e = await fetch(URL_ + "/__test/fail", { method: "POST", body: JSON.stringify({ status: 200 }) });
  assert.equal(e.status, 400);
});

test("read-your-writes: client echoes the upstash-sync-token it was last given", async () => {
  const c = new Redis({ url: URL_, token: TOKEN, enableAutoPipelining: false });
  await resetStats();
  await c.set("ryw:a", "1");
  await c.get("ryw:a");
  const [w1, w2] = await exchanges();
  assert.equal(w1.headers["upstash-sync-token"], "");
  assert.ok(w1.responseHeaders["upstash-sync-token"]);
  assert.equal(w2.headers["upstash-sync-token"], w1.responseHeaders["upstash-sync-token"]);
});

test("auto-pipelining batches concurrent commands, splitting reads from writes", async () => {
  await resetStats();
  assert.deepEqual(await Promise.all([redis.set("ap:a", "1"), redis.set("ap:b", "2"), redis.incr("ap:n")]), ["OK", "OK", 1]);
  let ex = await exchanges();
  assert.equal(ex.length, 1);
  assert.deepEqual(JSON.parse(ex[0].request), [["set", "ap:a", "1"], ["set", "ap:b", "2"], ["incr", "ap:n"]]);
  await resetStats();
  await Promise.all([redis.set("ap:c", "1"), redis.get("ap:c"), redis.incr("ap:n")]);
  ex = await exchanges();
  assert.equal(ex.length, 2, "a write pipeline and a read pipeline");
  assert.deepEqual(ex.map((x) => JSON.parse(x.request).length).sort(), [1, 2]);
});

test("/__test/stats and /__test/reset", async () => {
  await resetStats();
  await direct.get("str:a");
  const s = await stats();
  for (const k of ["requests", "byRoute", "statuses", "commands", "commandCounts", "unauthorized", "injected", "recent", "pendingFailures"]) {
    assert.ok(k in s, `stats.${k}`);
  }
  assert.equal(s.requests, 1);
  assert.equal(s.byRoute.command, 1);
  assert.equal(s.commandCounts.get, 1);
  await injectFailure({ status: 503, count: 5 });
  await resetStats();
  assert.deepEqual((await stats()).pendingFailures, []);
  assert.equal(await direct.get("str:a"), "hello");
});

// ---------------------------------------------------------------- main

async function main() {
  const watchdog = setTimeout(() => {
    console.log("FAIL overall timeout");
    console.log(`${passed} passed, ${failed + 1} failed`);
    process.exit(1);
  }, OVERALL_TIMEOUT_MS);
  watchdog.unref();

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "kv-rest-check-"));
  let rs;
  try {
    rs = await startRedis(dir);
    truth = rs.truth;
    console.log(`redis-server pid ${rs.child.pid} on 127.0.0.1:${rs.port}`);
    shim = await startShim(rs.port);
    readyLine = shim.readyLine;
    URL_ = JSON.parse(readyLine).url;
    console.log(`shim pid ${shim.child.pid} at ${URL_}`);
    await truth.flushall();
    redis = new Redis({ url: URL_, token: TOKEN });
    direct = new Redis({ url: URL_, token: TOKEN, enableAutoPipelining: false });
    plain = new Redis({ url: URL_, token: TOKEN, enableAutoPipelining: false, responseEncoding: false });

    await runTests();

    // Shutdown is part of the contract: SIGTERM -> clean exit 0.
    shim.child.kill("SIGTERM");
    const ex = await waitExit(shim.child, 5000);
    if (ex && ex.code === 0) {
      passed++;
      console.log("ok   shim exits with code 0 on SIGTERM");
    } else {
      failed++;
      console.log(`FAIL shim exits with code 0 on SIGTERM (got ${JSON.stringify(ex)})\n${shim.stderr()}`);
    }
  } catch (e) {
    failed++;
    console.log(`FAIL harness: ${e?.stack ?? e}`);
  } finally {
    if (failed > 0 && shim) process.stderr.write(`--- shim stderr ---\n${shim.stderr()}\n`);
    if (shim && shim.child.exitCode === null) shim.child.kill("SIGKILL");
    if (truth) truth.disconnect();
    if (rs) {
      rs.child.kill("SIGTERM");
      if (!(await waitExit(rs.child, 5000))) rs.child.kill("SIGKILL");
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

await main();
