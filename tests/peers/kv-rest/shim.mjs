#!/usr/bin/env node
// shim.mjs: TEST-ONLY Upstash / Vercel KV REST front over a real redis-server.
//
// It exists so Session Authority's `kv-rest` storage backend (configured by
// KV_REST_API_URL / KV_REST_API_TOKEN) can be tested against a real server that
// speaks the Upstash REST protocol, with the protocol proven against the official
// @upstash/redis client (see check.mjs and README.md for the wire description).
// Every command goes to a real redis-server; the shim only translates
// HTTP+JSON <-> RESP2. It also offers test-only failure injection (/__test/*).
//
// Usage:
//   node shim.mjs --redis redis://127.0.0.1:6379 [--port 0] [--token T]
//                 [--max-body BYTES] [--verbose] [--exit-with-stdin]
// On ready it prints exactly one JSON line on stdout:
//   {"ready":true,"url":"http://127.0.0.1:PORT","token":"..."}
// Logs go to stderr. SIGTERM / SIGINT close everything and exit 0.
//
// Not for production: one shared Redis connection, no TLS, 127.0.0.1 only.

import http from "node:http";
import crypto from "node:crypto";
import { parseArgs } from "node:util";
import Redis, { ReplyError } from "ioredis";

// ---------------------------------------------------------------- options

function usage(msg) {
  if (msg) process.stderr.write(`kv-rest-shim: ${msg}\n`);
  process.stderr.write(
    "usage: node shim.mjs --redis redis://127.0.0.1:P [--port 0] [--token T] " +
      "[--max-body BYTES] [--verbose] [--exit-with-stdin]\n",
  );
  process.exit(2);
}

let opts;
try {
  opts = parseArgs({
    options: {
      port: { type: "string", default: "0" },
      redis: { type: "string" },
      token: { type: "string" },
      "max-body": { type: "string", default: String(16 * 1024 * 1024) },
      "redis-wait-ms": { type: "string", default: "10000" },
      verbose: { type: "boolean", default: false },
      "exit-with-stdin": { type: "boolean", default: false },
      help: { type: "boolean", default: false },
    },
    strict: true,
  }).values;
} catch (e) {
  usage(e.message);
}
if (opts.help) usage();
if (!opts.redis) usage("--redis is required");
const PORT = Number(opts.port);
if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) usage("bad --port");
const TOKEN = opts.token ?? crypto.randomBytes(24).toString("hex");
if (TOKEN.length === 0) usage("--token must not be empty");
const MAX_BODY = Number(opts["max-body"]);
const REDIS_WAIT_MS = Number(opts["redis-wait-ms"]);
const VERBOSE = opts.verbose;

function log(...parts) {
  process.stderr.write(`[kv-rest-shim] ${parts.join(" ")}\n`);
}
function vlog(...parts) {
  if (VERBOSE) log(...parts);
}

// ---------------------------------------------------------------- redis side

// RESP2 + stringNumbers: integers arrive as decimal strings (exact, even past
// 2^53), bulk and simple strings arrive as Buffers (binary-safe), nil as null,
// arrays as arrays, error replies as Error objects. That is enough to tell
// every RESP2 type apart except simple-vs-bulk strings, which Upstash's JSON
// does not distinguish either.
const redis = new Redis(opts.redis, {
  protocol: 2,
  stringNumbers: true,
  lazyConnect: true,
  maxRetriesPerRequest: 1,
  retryStrategy: (times) => Math.min(times * 50, 200), // reconnect quickly after a redis restart
  enableOfflineQueue: true,
  connectionName: "kv-rest-shim",
});
redis.on("error", (e) => vlog("redis connection error:", e.message));

// ioredis rewrites some commands by their exact lower-case name: argument
// transformers (hset/hmset/mset/msetnx turn an object argument into pairs; a
// Buffer counts as an object) and reply transformers (hgetall -> JS object).
// The shim must pass bytes through untouched, so it sends every command name
// upper-cased: Redis is case-insensitive, ioredis's transformer tables are not
// (its command-flag checks, e.g. for blocking commands, are).
const wireName = (name) => name.toUpperCase();

// Commands that would change the state of the single shared connection or
// block it for everybody. Refused with an error reply.
const REFUSED = new Set([
  "subscribe", "psubscribe", "ssubscribe", "unsubscribe", "punsubscribe",
  "sunsubscribe", "monitor", "sync", "psync", "replconf", "multi", "exec",
  "discard", "watch", "unwatch", "select", "quit", "reset", "hello", "auth",
  "client", "blpop", "brpop", "brpoplpush", "blmove", "blmpop", "bzpopmin",
  "bzpopmax", "bzmpop", "wait", "waitaof", "shutdown",
]);

function refusalFor(nameLower, args) {
  if (REFUSED.has(nameLower)) {
    return `ERR command '${nameLower}' is not supported by the kv-rest shim (connection-state or blocking command)`;
  }
  if ((nameLower === "xread" || nameLower === "xreadgroup") &&
      args.some((a) => a.length === 5 && a.toString("latin1").toLowerCase() === "block")) {
    return `ERR ${nameLower} with BLOCK is not supported by the kv-rest shim`;
  }
  return null;
}

// ---------------------------------------------------------------- request model

class RequestError extends Error {} // malformed HTTP request -> 400 for the whole request
class BackendError extends Error {} // redis unreachable / connection failure -> 500 for the whole request

// A Redis error reply (WRONGTYPE, NOSCRIPT, ...) is data for the client; anything
// else (connection closed, retries exhausted) means the backend is unavailable.
function checkReply(e) {
  if (e && !(e instanceof ReplyError)) throw new BackendError(`redis unavailable: ${e.message}`);
  return e;
}

// One JSON command array -> { name, args: Buffer[] }. The official client puts
// JSON strings, numbers and booleans in the array (e.g. ["set","k",42]).
function parseJsonCommand(cmd, where) {
  if (!Array.isArray(cmd) || cmd.length === 0) {
    throw new RequestError(`ERR ${where}: a command must be a non-empty JSON array`);
  }
  if (typeof cmd[0] !== "string" || cmd[0].length === 0) {
    throw new RequestError(`ERR ${where}: the command name must be a non-empty string`);
  }
  const args = cmd.slice(1).map((v, i) => {
    if (typeof v === "string") return Buffer.from(v, "utf8");
    if (typeof v === "boolean") return Buffer.from(String(v));
    if (typeof v === "number") {
      if (!Number.isFinite(v)) throw new RequestError(`ERR ${where}: argument ${i + 1} is not a finite number`);
      if (Number.isInteger(v) && !Number.isSafeInteger(v)) {
        throw new RequestError(
          `ERR ${where}: argument ${i + 1} is an integer beyond +-2^53-1; send it as a JSON string`,
        );
      }
      return Buffer.from(String(v));
    }
    const t = v === null ? "null" : Array.isArray(v) ? "array" : typeof v;
    throw new RequestError(
      `ERR ${where}: argument ${i + 1} has JSON type ${t}; only strings, numbers and booleans are allowed`,
    );
  });
  return { name: cmd[0], args };
}

// Percent-decoding straight to bytes, so path-style commands are binary-safe
// (%FF is the byte 0xFF, not an error).
function pctDecode(s) {
  const out = [];
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x25 && i + 2 < s.length && /^[0-9a-fA-F]{2}$/.test(s.slice(i + 1, i + 3))) {
      out.push(parseInt(s.slice(i + 1, i + 3), 16));
      i += 2;
    } else if (c < 0x100) {
      // Node hands raw non-ASCII URL bytes over as latin1 characters.
      out.push(c);
    } else {
      for (const b of Buffer.from(String.fromCharCode(c), "utf8")) out.push(b);
    }
  }
  return Buffer.from(out);
}

// REST_URL/cmd/a1/a2?K=V&FLAG  (+ raw POST body appended after the path args,
// then the query parameters, as Upstash documents; `_token` is not an argument).
function parsePathCommand(pathname, rawQuery, body) {
  const segs = pathname.split("/").slice(1);
  if (segs.length > 0 && segs[segs.length - 1] === "") segs.pop();
  if (segs.length === 0 || segs[0] === "") throw new RequestError("ERR empty command");
  const parts = segs.map(pctDecode);
  if (body && body.length > 0) parts.push(body);
  if (rawQuery) {
    for (const kv of rawQuery.split("&")) {
      if (kv === "") continue;
      const eq = kv.indexOf("=");
      const k = eq < 0 ? kv : kv.slice(0, eq);
      if (k === "_token") continue;
      parts.push(pctDecode(k));
      if (eq >= 0 && kv.length > eq + 1) parts.push(pctDecode(kv.slice(eq + 1)));
    }
  }
  return { name: parts[0].toString("utf8"), args: parts.slice(1) };
}

// ---------------------------------------------------------------- reply encoding

const OK = Buffer.from("OK");

// Redis reply (ioredis RESP2 shape, see above) -> JSON text.
// base64 mode: every string is base64 of its exact bytes, except the literal
// "OK", which is sent as "OK" (that is what @upstash/redis expects).
// plain mode: strings are the bytes read as UTF-8 (lossy for non-UTF-8 bytes).
function renderValue(v, b64) {
  if (v === null || v === undefined) return "null";
  if (Buffer.isBuffer(v)) {
    if (b64) return v.equals(OK) ? '"OK"' : JSON.stringify(v.toString("base64"));
    return JSON.stringify(v.toString("utf8"));
  }
  if (typeof v === "string") {
    // integer reply (stringNumbers): emitted as a bare JSON number, exact digits.
    if (/^-?\d+$/.test(v)) return v;
    return JSON.stringify(b64 ? Buffer.from(v).toString("base64") : v);
  }
  if (typeof v === "number") return Number.isFinite(v) ? String(v) : "null";
  if (Array.isArray(v)) return "[" + v.map((x) => renderValue(x, b64)).join(",") + "]";
  if (v instanceof Error) {
    // An error nested inside an array (e.g. a Lua table holding an error).
    // Rendered as a string like any other, so the client can decode it.
    return renderValue(Buffer.from(v.message, "utf8"), b64);
  }
  return JSON.stringify(String(v));
}

function renderEntry(err, value, b64) {
  if (err) return `{"error":${JSON.stringify(err.message ?? String(err))}}`;
  return `{"result":${renderValue(value, b64)}}`;
}

// ---------------------------------------------------------------- execution

const stats = newStats();
function newStats() {
  return {
    startedAt: new Date().toISOString(),
    requests: 0, // API requests (everything except /__test/*)
    byRoute: { command: 0, pipeline: 0, multiExec: 0, path: 0 },
    statuses: {},
    commands: 0, // Redis commands sent to redis-server
    commandCounts: {},
    unauthorized: 0,
    injected: 0,
    recent: [], // last RECENT_MAX exchanges, for tests to inspect the wire
  };
}
const RECENT_MAX = 100;
let seq = 0;

function countCommand(nameLower) {
  stats.commands++;
  stats.commandCounts[nameLower] = (stats.commandCounts[nameLower] ?? 0) + 1;
}

async function runOne({ name, args }) {
  const lower = name.toLowerCase();
  const refusal = refusalFor(lower, args);
  if (refusal) return [new Error(refusal), null];
  countCommand(lower);
  try {
    return [null, await redis.callBuffer(wireName(name), ...args)];
  } catch (e) {
    return [checkReply(e), null];
  }
}

async function runPipeline(cmds) {
  const out = new Array(cmds.length);
  const p = redis.pipeline();
  const sent = [];
  cmds.forEach((c, i) => {
    const lower = c.name.toLowerCase();
    const refusal = refusalFor(lower, c.args);
    if (refusal) {
      out[i] = [new Error(refusal), null];
    } else {
      countCommand(lower);
      p.callBuffer(wireName(c.name), ...c.args);
      sent.push(i);
    }
  });
  if (sent.length > 0) {
    const res = await p.exec();
    sent.forEach((idx, j) => { out[idx] = [checkReply(res[j][0]), res[j][1]]; });
  }
  return out;
}

// MULTI ... EXEC on the shared connection: ioredis writes the whole block in
// one go, so no other request's command can land inside the transaction.
// Returns { aborted: Error } when Redis discards the transaction (EXECABORT).
async function runMulti(cmds) {
  for (const c of cmds) {
    const refusal = refusalFor(c.name.toLowerCase(), c.args);
    if (refusal) return { aborted: new Error(`EXECABORT Transaction discarded because of previous errors: ${refusal}`) };
  }
  const m = redis.multi();
  for (const c of cmds) {
    countCommand(c.name.toLowerCase());
    m.callBuffer(wireName(c.name), ...c.args);
  }
  countCommand("multi");
  countCommand("exec");
  let res;
  try {
    res = await m.exec();
  } catch (e) {
    checkReply(e); // connection trouble -> BackendError (500); an EXECABORT reply falls through
    const first = e.previousErrors?.[0]?.message;
    return { aborted: new Error(first ? `${e.message.replace(/\.$/, "")}: ${first}` : e.message) };
  }
  if (res === null) return { aborted: new Error("EXECABORT Transaction aborted") };
  for (const [e] of res) checkReply(e);
  return { entries: res };
}

// ---------------------------------------------------------------- failure injection

// Queue of rules; each API request consumes one unit of the head rule.
//   {"status":429|500|503|401|..., "count":N, "error":"msg"}  -> that status, {"error":msg}
//   {"mode":"timeout", "count":N, "ms":M}   -> hold the request M ms (default 30000), then drop the socket
//   {"mode":"reset", "count":N}             -> drop the TCP connection at once (no HTTP response)
//   {"mode":"delay", "count":N, "ms":M}     -> wait M ms, then serve the request normally
//   {"mode":"garbage", "count":N, "status":S} -> status S (default 200) with a non-JSON body
let failRules = [];
const held = new Set(); // sockets held by "timeout"

const DEFAULT_ERRORS = {
  400: "ERR injected bad request",
  401: "Unauthorized",
  403: "Forbidden",
  429: "ERR max requests limit exceeded (injected)",
  500: "ERR internal server error (injected)",
  502: "Bad Gateway (injected)",
  503: "Service Unavailable (injected)",
  504: "Gateway Timeout (injected)",
};

function parseFailRule(body) {
  const mode = body.mode ?? (body.status !== undefined ? "status" : undefined);
  const count = body.count ?? 1;
  if (!Number.isInteger(count) || count < 1) throw new RequestError("count must be a positive integer");
  switch (mode) {
    case "status": {
      const status = body.status;
      if (!Number.isInteger(status) || status < 400 || status > 599) {
        throw new RequestError("status must be an integer 400..599");
      }
      return { mode, count, status, error: body.error ?? DEFAULT_ERRORS[status] ?? `injected HTTP ${status}` };
    }
    case "timeout":
      return { mode, count, ms: body.ms ?? 30000 };
    case "delay":
      return { mode, count, ms: body.ms ?? 1000 };
    case "reset":
      return { mode, count };
    case "garbage":
      return { mode, count, status: body.status ?? 200 };
    default:
      throw new RequestError('give "status" (400..599) or "mode": timeout|reset|delay|garbage');
  }
}

function takeFailRule() {
  const r = failRules[0];
  if (!r) return null;
  r.count--;
  if (r.count <= 0) failRules.shift();
  return r;
}

// ---------------------------------------------------------------- HTTP

function sendJson(res, status, text, extraHeaders = {}) {
  res.statusCode = status;
  res.setHeader("Content-Type", "application/json");
  res.setHeader("Content-Length", Buffer.byteLength(text));
  for (const [k, v] of Object.entries(extraHeaders)) res.setHeader(k, v);
  res.end(text);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on("data", (c) => {
      size += c.length;
      if (size <= MAX_BODY) chunks.push(c); // past the limit: keep draining, store nothing
    });
    req.on("end", () => {
      if (size > MAX_BODY) {
        reject(Object.assign(new RequestError(`ERR request body larger than ${MAX_BODY} bytes`), { status: 413 }));
      } else {
        resolve(Buffer.concat(chunks));
      }
    });
    req.on("error", reject);
  });
}

function parseJsonBody(buf) {
  try {
    return JSON.parse(buf.toString("utf8"));
  } catch (e) {
    throw new RequestError(`ERR request body is not valid JSON: ${e.message}`);
  }
}

function tokenOk(req, rawQuery) {
  let given = null;
  const h = req.headers.authorization;
  if (typeof h === "string" && /^bearer /i.test(h)) given = h.slice(7).trim();
  if (given === null && rawQuery) {
    for (const kv of rawQuery.split("&")) {
      if (kv.startsWith("_token=")) given = pctDecode(kv.slice(7)).toString("utf8");
    }
  }
  if (given === null) return false;
  const a = crypto.createHash("sha256").update(given).digest();
  const b = crypto.createHash("sha256").update(TOKEN).digest();
  return crypto.timingSafeEqual(a, b);
}

function describeBody(buf) {
  if (!buf || buf.length === 0) return "";
  const s = buf.toString("utf8");
  const clean = Buffer.from(s, "utf8").equals(buf);
  const text = clean ? s : `<${buf.length} bytes, base64 ${buf.toString("base64")}>`;
  return text.length > 4000 ? text.slice(0, 4000) + "..." : text;
}

function record(entry) {
  stats.recent.push(entry);
  if (stats.recent.length > RECENT_MAX) stats.recent.shift();
}

function headersForRecord(req) {
  const out = {};
  for (const [k, v] of Object.entries(req.headers)) {
    out[k] = k === "authorization" ? "<redacted>" : v;
  }
  return out;
}

async function handleTest(req, res, pathname) {
  if (pathname === "/__test/stats" && req.method === "GET") {
    const body = { ...stats, pendingFailures: failRules.map((r) => ({ ...r })) };
    return sendJson(res, 200, JSON.stringify(body));
  }
  if (pathname === "/__test/fail" && req.method === "POST") {
    const rule = parseFailRule(parseJsonBody(await readBody(req)));
    failRules.push(rule);
    log(`failure injection armed: ${JSON.stringify(rule)}`);
    return sendJson(res, 200, JSON.stringify({ ok: true, pendingFailures: failRules }));
  }
  if (pathname === "/__test/reset" && req.method === "POST") {
    await readBody(req);
    failRules = [];
    Object.assign(stats, newStats());
    return sendJson(res, 200, JSON.stringify({ ok: true }));
  }
  return sendJson(res, 404, JSON.stringify({ error: `unknown test endpoint ${req.method} ${pathname}` }));
}

async function handleApi(req, res, pathname, rawQuery, rec) {
  const method = req.method;
  if (!["GET", "HEAD", "POST", "PUT"].includes(method)) {
    return sendJson(res, 405, JSON.stringify({ error: "Method Not Allowed" }), { Allow: "GET, HEAD, POST, PUT" });
  }
  const isJsonRoute = pathname === "/" || pathname === "/pipeline" || pathname === "/multi-exec";
  if (isJsonRoute && method !== "POST" && method !== "PUT" && pathname !== "/") {
    return sendJson(res, 405, JSON.stringify({ error: "Method Not Allowed" }), { Allow: "POST, PUT" });
  }

  const body = await readBody(req);
  rec.request = describeBody(body);
  if (!tokenOk(req, rawQuery)) {
    stats.unauthorized++;
    return sendJson(res, 401, JSON.stringify({ error: "Unauthorized" }));
  }

  const b64 = String(req.headers["upstash-encoding"] ?? "").toLowerCase() === "base64";
  rec.encoding = b64 ? "base64" : "plain";
  const sync = { "upstash-sync-token": String(++seq) };

  if (pathname === "/pipeline" || pathname === "/multi-exec") {
    const isMulti = pathname === "/multi-exec";
    stats.byRoute[isMulti ? "multiExec" : "pipeline"]++;
    const parsed = parseJsonBody(body);
    if (!Array.isArray(parsed) || parsed.length === 0) {
      throw new RequestError(`ERR ${pathname.slice(1)} body must be a non-empty JSON array of command arrays`);
    }
    const cmds = parsed.map((c, i) => parseJsonCommand(c, `command ${i + 1}`));
    if (isMulti) {
      const r = await runMulti(cmds);
      if (r.aborted) return sendJson(res, 400, JSON.stringify({ error: r.aborted.message }), sync);
      return sendJson(res, 200, "[" + r.entries.map(([e, v]) => renderEntry(e, v, b64)).join(",") + "]", sync);
    }
    const entries = await runPipeline(cmds);
    return sendJson(res, 200, "[" + entries.map(([e, v]) => renderEntry(e, v, b64)).join(",") + "]", sync);
  }

  let cmd;
  if (pathname === "/" && (method === "POST" || method === "PUT")) {
    stats.byRoute.command++;
    cmd = parseJsonCommand(parseJsonBody(body), "command");
  } else {
    stats.byRoute.path++;
    cmd = parsePathCommand(pathname, rawQuery, method === "POST" || method === "PUT" ? body : null);
  }
  const [err, value] = await runOne(cmd);
  if (err) return sendJson(res, 400, renderEntry(err, null, b64), sync);
  return sendJson(res, 200, renderEntry(null, value, b64), sync);
}

async function applyInjected(rule, req, res, rec) {
  stats.injected++;
  rec.injected = rule.mode === "status" ? `status ${rule.status}` : rule.mode;
  if (rule.mode === "reset" || rule.mode === "timeout") rec.status = null; // no HTTP response at all
  log(`injecting ${rec.injected} for ${req.method} ${req.url}`);
  switch (rule.mode) {
    case "status":
      await readBody(req).catch(() => {});
      sendJson(res, rule.status, JSON.stringify({ error: rule.error }));
      return true;
    case "garbage":
      await readBody(req).catch(() => {});
      res.writeHead(rule.status, { "Content-Type": "text/html" });
      res.end("<html><body>injected non-JSON body</body></html>");
      return true;
    case "reset":
      req.socket.destroy();
      return true;
    case "timeout": {
      const sock = req.socket;
      held.add(sock);
      const t = setTimeout(() => sock.destroy(), rule.ms);
      sock.once("close", () => { clearTimeout(t); held.delete(sock); });
      return true;
    }
    case "delay":
      await new Promise((r) => setTimeout(r, rule.ms));
      return false; // then serve normally
    default:
      return false;
  }
}

const server = http.createServer(async (req, res) => {
  const started = Date.now();
  const q = req.url.indexOf("?");
  const pathname = q < 0 ? req.url : req.url.slice(0, q);
  const rawQuery = q < 0 ? "" : req.url.slice(q + 1);

  if (pathname.startsWith("/__test/")) {
    try {
      await handleTest(req, res, pathname);
    } catch (e) {
      if (!res.headersSent) sendJson(res, e instanceof RequestError ? 400 : 500, JSON.stringify({ error: e.message }));
    }
    return;
  }

  stats.requests++;
  const rec = {
    id: stats.requests,
    method: req.method,
    path: pathname,
    query: rawQuery,
    headers: headersForRecord(req),
  };
  res.on("finish", () => {
    stats.statuses[res.statusCode] = (stats.statuses[res.statusCode] ?? 0) + 1;
    vlog(`${req.method} ${pathname} -> ${res.statusCode} (${Date.now() - started} ms)`);
  });
  // Wrap end() to capture the exact response text for /__test/stats.
  const end = res.end.bind(res);
  res.end = (chunk, ...rest) => {
    rec.status = res.statusCode;
    rec.response = chunk ? describeBody(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk)) : "";
    rec.responseHeaders = { "upstash-sync-token": res.getHeader("upstash-sync-token") ?? null };
    return end(chunk, ...rest);
  };
  record(rec);

  try {
    const rule = takeFailRule();
    if (rule && (await applyInjected(rule, req, res, rec))) return;
    await handleApi(req, res, pathname, rawQuery, rec);
  } catch (e) {
    if (res.headersSent) return;
    if (e instanceof RequestError) {
      sendJson(res, e.status ?? 400, JSON.stringify({ error: e.message }));
    } else if (e instanceof BackendError) {
      log(`${req.method} ${pathname}: ${e.message}`);
      sendJson(res, 500, JSON.stringify({ error: `ERR kv-rest shim internal error: ${e.message}` }));
    } else {
      log(`internal error on ${req.method} ${pathname}: ${e.stack ?? e}`);
      sendJson(res, 500, JSON.stringify({ error: `ERR kv-rest shim internal error: ${e.message}` }));
    }
  }
});
server.keepAliveTimeout = 5000;

// ---------------------------------------------------------------- lifecycle

let shuttingDown = false;
async function shutdown(why) {
  if (shuttingDown) return;
  shuttingDown = true;
  log(`shutting down (${why})`);
  const force = setTimeout(() => process.exit(0), 3000);
  force.unref();
  for (const s of held) s.destroy();
  server.close();
  server.closeAllConnections?.();
  try {
    await redis.quit();
  } catch {
    redis.disconnect();
  }
  process.exit(0);
}
process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));
if (opts["exit-with-stdin"]) {
  process.stdin.on("end", () => shutdown("stdin closed"));
  process.stdin.on("error", () => shutdown("stdin error"));
  process.stdin.resume();
}

async function waitForRedis() {
  const deadline = Date.now() + REDIS_WAIT_MS;
  let lastErr;
  for (;;) {
    try {
      if (redis.status === "wait" || redis.status === "end") await redis.connect();
      const pong = await redis.ping();
      if (pong === "PONG") return;
    } catch (e) {
      lastErr = e;
    }
    if (Date.now() > deadline) throw new Error(`redis at ${opts.redis} not reachable: ${lastErr?.message}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

try {
  await waitForRedis();
} catch (e) {
  log(e.message);
  redis.disconnect();
  process.exit(1);
}

server.on("error", (e) => {
  log(`http server error: ${e.message}`);
  process.exit(1);
});
server.listen(PORT, "127.0.0.1", () => {
  const { port } = server.address();
  const url = `http://127.0.0.1:${port}`;
  log(`listening on ${url}, redis ${opts.redis}`);
  process.stdout.write(JSON.stringify({ ready: true, url, token: TOKEN }) + "\n");
});
