// Loopback OpenID Connect / OAuth2 provider used as the upstream peer in
// Session Authority integration tests. It wraps oidc-provider (a real,
// certified implementation) and adds a few /__test/* endpoints so tests can
// mint real tokens headlessly, inject token-endpoint failures and count
// token-endpoint traffic. Prints one JSON "ready" line on stdout; everything
// else goes to stderr. See README.md in this directory.

import { randomBytes, generateKeyPairSync } from 'node:crypto';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

// oidc-provider prints notices with console.info (stdout). Stdout is reserved
// for the ready line, so route all console output to stderr before importing.
console.log = console.info = console.debug = (...args) => console.error(...args);
const { default: Provider } = await import('oidc-provider');
// oidc-provider's own in-memory adapter and its LRU (no "exports" map: deep imports resolve).
const { default: MemoryAdapter } = await import('oidc-provider/lib/adapters/memory_adapter.js');
const { default: LRU } = await import('oidc-provider/lib/helpers/lru.js');

// ---------------------------------------------------------------- options --
const env = process.env;
const { values: opt } = parseArgs({
  options: {
    port: { type: 'string', default: env.OIDC_PORT ?? '0' },
    'access-ttl': { type: 'string', default: env.OIDC_ACCESS_TTL ?? '60' },
    'refresh-ttl': { type: 'string', default: env.OIDC_REFRESH_TTL ?? '86400' },
    'store-size': { type: 'string', default: env.OIDC_STORE_SIZE ?? '1000' },
    'client-id': { type: 'string', default: env.OIDC_CLIENT_ID ?? 'session-authority' },
    'client-secret': {
      type: 'string',
      default: env.OIDC_CLIENT_SECRET ?? 'session-authority-test-secret-0123456789',
    },
    'fail-mode': { type: 'string', default: env.OIDC_FAIL_MODE ?? 'none' },
    'fail-count': { type: 'string', default: env.OIDC_FAIL_COUNT ?? '' },
    'fail-grant-type': { type: 'string', default: env.OIDC_FAIL_GRANT_TYPE ?? '' },
  },
});

function int(name, min) {
  const n = Number(opt[name]);
  if (!Number.isInteger(n) || n < min) {
    console.error(`invalid --${name}: ${opt[name]}`);
    process.exit(2);
  }
  return n;
}
const accessTtl = int('access-ttl', 1);
const refreshTtl = int('refresh-ttl', 1);
// The in-memory adapter keeps every stored object (sessions, interactions, codes, grants, access
// and refresh tokens) in one LRU of this many entries; oidc-provider's default is 1000. A long
// run with many logins (the soak) evicts live refresh tokens at that size, which the provider
// then refuses (invalid_grant) as if they had been replayed.
const storeSize = int('store-size', 1);
const store = new LRU({ maxSize: storeSize });
const clientId = opt['client-id'];
const clientSecret = opt['client-secret'];

// ------------------------------------------------------- test-side state --
const FAIL_MODES = new Set(['none', '503', 'timeout']);
const badRequest = (message) => Object.assign(new Error(message), { status: 400 });

// fail.count === null means "every matching request until mode is none".
// retry_after (seconds, or null): a Retry-After header on injected 503s.
let fail = { mode: 'none', count: null, grant_type: null, retry_after: null };
function setFail({ mode = 'none', count = null, grant_type = null, retry_after = null } = {}) {
  mode = String(mode);
  if (count === 0) mode = 'none';
  if (!FAIL_MODES.has(mode)) throw badRequest(`mode must be one of ${[...FAIL_MODES].join(', ')}`);
  if (count !== null && !(Number.isInteger(count) && count >= 0)) {
    throw badRequest('count must be a non-negative integer or null');
  }
  if (retry_after !== null && !(Number.isInteger(retry_after) && retry_after >= 0)) {
    throw badRequest('retry_after must be a non-negative integer or null');
  }
  fail = {
    mode,
    count: mode === 'none' ? null : count,
    grant_type: mode === 'none' ? null : grant_type,
    retry_after: mode === 'none' ? null : retry_after,
  };
}
try {
  setFail({
    mode: opt['fail-mode'],
    count: opt['fail-count'] === '' ? null : Number(opt['fail-count']),
    grant_type: opt['fail-grant-type'] || null,
  });
} catch (err) {
  console.error(`invalid --fail-mode/--fail-count: ${err.message}`);
  process.exit(2);
}

const emptyStats = () => ({
  token: {
    total: 0, by_grant_type: {}, by_auth_method: {}, by_status: {}, injected: { 503: 0, timeout: 0 },
  },
  introspection: 0,
  revocation: 0,
  // Revocation requests oidc-provider processed (answered 200), and those the fault held or refused.
  revocation_processed: 0,
  revocation_injected: 0,
});
let stats = emptyStats();
const bump = (obj, key) => { obj[key] = (obj[key] ?? 0) + 1; };
const authMethod = (ctx, clientSecretParam) => {
  if (ctx.get('authorization')) return 'client_secret_basic';
  return clientSecretParam ? 'client_secret_post' : 'none';
};

// Self-requests made by /__test/tokens carry this header so that failure
// injection never breaks token minting. The value is per-process random.
const INTERNAL_HEADER = 'x-oidc-peer-internal';
const internalNonce = randomBytes(16).toString('hex');

// Requests parked by the "timeout" mode; released (destroyed) on shutdown.
const hanging = new Set();

// ------------------------------------------------------------- listening --
// Listen first so that port 0 resolves to a real port before the issuer
// (which must contain the port) is configured.
const server = createServer();
// Keep idle connections longer than clients do (reqwest drops its idle ones after 90 s). With
// Node's default of 5 s, a client reusing a pooled connection just as the server closes it gets
// "connection reset" on a request the provider never saw.
server.keepAliveTimeout = 120_000;
server.headersTimeout = 125_000;
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(int('port', 0), '127.0.0.1', resolve);
});
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;
const redirectUri = `${issuer}/__test/callback`;

// -------------------------------------------------------------- provider --
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingJwk = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: 'test-rs256' };

const provider = new Provider(issuer, {
  // The default in-memory adapter, over an LRU of --store-size entries.
  adapter: (model) => new MemoryAdapter(model, store),
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    // oidc-provider lets a client registered with client_secret_basic also
    // authenticate with client_secret_post (and vice versa), so one client
    // covers both methods.
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
    response_types: ['code'],
    redirect_uris: [redirectUri],
    scope: 'openid offline_access',
  }],
  clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
  jwks: { keys: [signingJwk] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  scopes: ['openid', 'offline_access'],
  claims: { openid: ['sub'] },
  async findAccount(_ctx, sub) {
    return { accountId: sub, async claims() { return { sub }; } };
  },
  features: {
    devInteractions: { enabled: true },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
  },
  // Refresh tokens for clients allowed the refresh_token grant when the
  // grant includes offline_access (same as the library default, made explicit).
  issueRefreshToken: async (_ctx, client, code) => (
    client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access')
  ),
  // Every refresh_token grant consumes the presented refresh token and
  // issues a new one; replaying a consumed token revokes the whole grant.
  rotateRefreshToken: true,
  ttl: {
    AccessToken: accessTtl,
    ClientCredentials: accessTtl,
    IdToken: accessTtl,
    AuthorizationCode: 60,
    RefreshToken: refreshTtl,
    Grant: refreshTtl,
    Session: refreshTtl,
    Interaction: 600,
  },
});
provider.on('server_error', (_ctx, err) => console.error('oidc-provider server_error:', err));

// ------------------------------------------------------ test middleware --
// provider.use() inserts Koa middleware in front of oidc-provider's router.
const json = (ctx, status, body) => { ctx.status = status; ctx.type = 'application/json'; ctx.body = body; };

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

async function readJson(ctx) {
  const raw = await readBody(ctx.req);
  return raw.trim() ? JSON.parse(raw) : {};
}

// One-shot hooks on refresh_token grants (POST /__test/refresh_hook), each applied to the next
// `count` refresh_token requests (default 1):
// * delay_ms with processed=false: the request is held delay_ms before oidc-provider sees it; if
//   the client gave up meanwhile, it is dropped unprocessed (the refresh token stays valid).
// * delay_ms with processed=true: oidc-provider processes it at once (rotating the refresh
//   token), and the answer is held delay_ms; a client that gave up never sees the new tokens.
// * expires_in: "omit" drops expires_in from a successful answer; a number replaces it.
let refreshHook = null;
function setRefreshHook(input) {
  if (input === null || Object.keys(input).length === 0) { refreshHook = null; return; }
  const { delay_ms = 0, processed = false, expires_in, count = 1 } = input;
  if (!(Number.isInteger(delay_ms) && delay_ms >= 0)) throw badRequest('delay_ms must be a non-negative integer');
  if (!(Number.isInteger(count) && count >= 1)) throw badRequest('count must be a positive integer');
  if (!(expires_in === undefined || expires_in === 'omit' || Number.isInteger(expires_in))) {
    throw badRequest('expires_in must be "omit" or an integer');
  }
  refreshHook = { delay_ms, processed: Boolean(processed), expires_in, count };
}
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// Faults of the revocation endpoint (POST /__test/revocation_fail), applied to the next `count`
// revocation requests (null: until lifted with mode "none"):
// * "delay": each request is held delay_ms before oidc-provider sees it (a slow provider);
// * "503": answered 503 temporarily_unavailable, unprocessed (a provider that is down).
let revocationFail = { mode: 'none', delay_ms: 0, count: null };
function setRevocationFail({ mode = 'none', delay_ms = 0, count = null } = {}) {
  if (!['none', 'delay', '503'].includes(mode)) throw badRequest('mode must be none, delay or 503');
  if (!(Number.isInteger(delay_ms) && delay_ms >= 0)) throw badRequest('delay_ms must be a non-negative integer');
  if (!(count === null || (Number.isInteger(count) && count >= 1))) throw badRequest('count must be null or a positive integer');
  revocationFail = { mode, delay_ms, count };
}

provider.use(async (ctx, next) => {
  if (ctx.method !== 'POST' || ctx.path !== '/token' || !refreshHook) return next();
  if (ctx.get(INTERNAL_HEADER) === internalNonce) return next();
  const raw = await readBody(ctx.req);
  ctx.req.body = raw;
  if (new URLSearchParams(raw).get('grant_type') !== 'refresh_token') return next();
  const hook = refreshHook;
  hook.count -= 1;
  if (hook.count <= 0) refreshHook = null;
  stats.token.hooked = (stats.token.hooked ?? 0) + 1;
  if (hook.delay_ms && !hook.processed) {
    await sleep(hook.delay_ms);
    if (ctx.req.socket.destroyed) {
      // The client gave up: drop the request unprocessed, but count it.
      stats.token.total += 1;
      bump(stats.token.by_grant_type, 'refresh_token');
      stats.token.dropped = (stats.token.dropped ?? 0) + 1;
      ctx.respond = false;
      return undefined;
    }
  }
  await next();
  if (ctx.status === 200 && ctx.body && hook.expires_in !== undefined) {
    const body = typeof ctx.body === 'string' ? JSON.parse(ctx.body) : { ...ctx.body };
    if (hook.expires_in === 'omit') delete body.expires_in; else body.expires_in = hook.expires_in;
    ctx.body = body;
  }
  if (hook.delay_ms && hook.processed) await sleep(hook.delay_ms);
  return undefined;
});

// Token endpoint: count every request, inject failures when armed.
provider.use(async (ctx, next) => {
  if (ctx.method !== 'POST' || ctx.path !== '/token') return next();
  stats.token.total += 1;

  const internal = ctx.get(INTERNAL_HEADER) === internalNonce;
  if (!internal && fail.mode !== 'none') {
    // Read the body ourselves to learn the grant_type (unless the refresh hook did).
    const raw = ctx.req.body ?? await readBody(ctx.req);
    const form = new URLSearchParams(raw);
    const grantType = form.get('grant_type') ?? 'unknown';
    if (!fail.grant_type || fail.grant_type === grantType) {
      bump(stats.token.by_grant_type, grantType);
      bump(stats.token.by_auth_method, authMethod(ctx, form.get('client_secret')));
      const mode = fail.mode;
      const retryAfter = fail.retry_after;
      if (fail.count !== null) {
        fail.count -= 1;
        if (fail.count <= 0) setFail({ mode: 'none' });
      }
      stats.token.injected[mode] += 1;
      if (mode === '503') {
        bump(stats.token.by_status, 503);
        if (retryAfter !== null) ctx.set('retry-after', String(retryAfter));
        return json(ctx, 503, { error: 'temporarily_unavailable', error_description: 'injected failure' });
      }
      // "timeout": never answer; the socket stays open until the client gives
      // up or the provider shuts down.
      ctx.respond = false;
      const { socket } = ctx.req;
      hanging.add(socket);
      await new Promise((resolve) => socket.once('close', resolve));
      hanging.delete(socket);
      return undefined;
    }
    // Armed for another grant type: hand the already-read body to
    // oidc-provider, which accepts a pre-read body via req.body.
    ctx.req.body = raw;
  }

  await next();
  // ctx.oidc exists once oidc-provider's router matched the route.
  bump(stats.token.by_grant_type, ctx.oidc?.params?.grant_type ?? 'unknown');
  bump(stats.token.by_auth_method, authMethod(ctx, ctx.oidc?.params?.client_secret));
  bump(stats.token.by_status, ctx.status);
  return undefined;
});

// Introspection / revocation counters.
provider.use(async (ctx, next) => {
  if (ctx.method === 'POST' && ctx.path === '/token/introspection') stats.introspection += 1;
  if (ctx.method !== 'POST' || ctx.path !== '/token/revocation') return next();
  stats.revocation += 1;
  const fault = revocationFail;
  if (fault.mode !== 'none') {
    if (fault.count !== null) {
      fault.count -= 1;
      if (fault.count <= 0) revocationFail = { mode: 'none', delay_ms: 0, count: null };
    }
    stats.revocation_injected += 1;
    if (fault.mode === '503') {
      return json(ctx, 503, { error: 'temporarily_unavailable', error_description: 'injected failure' });
    }
    await sleep(fault.delay_ms);
    // A client that gave up meanwhile gets nothing processed.
    if (ctx.req.socket.destroyed) return undefined;
  }
  await next();
  if (ctx.status === 200) stats.revocation_processed += 1;
  return undefined;
});

// /__test/* admin endpoints.
provider.use(async (ctx, next) => {
  if (!ctx.path.startsWith('/__test/')) return next();
  try {
    const route = `${ctx.method} ${ctx.path}`;
    switch (route) {
      case 'GET /__test/stats':
        return json(ctx, 200, stats);
      case 'POST /__test/reset':
        stats = emptyStats();
        setFail({ mode: 'none' });
        refreshHook = null;
        setRevocationFail();
        return json(ctx, 200, { ok: true });
      case 'POST /__test/refresh_hook':
        setRefreshHook(await readJson(ctx));
        return json(ctx, 200, refreshHook ?? {});
      case 'POST /__test/revocation_fail':
        setRevocationFail(await readJson(ctx));
        return json(ctx, 200, revocationFail);
      case 'GET /__test/fail':
        return json(ctx, 200, fail);
      case 'POST /__test/fail':
        setFail(await readJson(ctx));
        return json(ctx, 200, fail);
      case 'GET /__test/tokens':
      case 'POST /__test/tokens': {
        const input = ctx.method === 'POST' ? await readJson(ctx) : Object.fromEntries(new URLSearchParams(ctx.querystring));
        if (!input.user) return json(ctx, 400, { error: 'user is required' });
        return json(ctx, 200, await mintTokens(String(input.user), input.scope ?? 'openid offline_access'));
      }
      case 'GET /__test/code': {
        // An authorization code not yet exchanged, for a client that does the code exchange
        // itself (examples/python/guide_app.py's OAuth callback).
        const input = Object.fromEntries(new URLSearchParams(ctx.querystring));
        if (!input.user) return json(ctx, 400, { error: 'user is required' });
        const code = await mintTokens(String(input.user), input.scope ?? 'openid offline_access', { exchange: false });
        return json(ctx, 200, { code, redirect_uri: redirectUri });
      }
      case 'GET /__test/callback':
        // Redirect target of the test client; only useful when debugging.
        return json(ctx, 200, Object.fromEntries(new URLSearchParams(ctx.querystring)));
      default:
        return json(ctx, 404, { error: `no such test endpoint: ${route}` });
    }
  } catch (err) {
    console.error('test endpoint error:', err);
    return json(ctx, err.status ?? (err instanceof SyntaxError ? 400 : 500), { error: String(err.message ?? err) });
  }
});

// ------------------------------------------- headless authorization code --
// Drives /auth -> devInteractions login -> consent -> redirect_uri?code=...
// over HTTP against this same server with a tiny cookie jar, then exchanges
// the code at /token (client_secret_basic) and returns the token response (or, with
// `exchange: false`, the code itself).
async function mintTokens(user, scope, { exchange = true } = {}) {
  const jar = new Map();
  const cookieHeader = () => [...jar].map(([k, v]) => `${k}=${v}`).join('; ');
  const remember = (res) => {
    for (const line of res.headers.getSetCookie()) {
      const [pair, ...attrs] = line.split(';');
      const eq = pair.indexOf('=');
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      const expired = attrs.some((a) => {
        const [k, v] = a.split('=').map((s) => s.trim().toLowerCase());
        return (k === 'expires' && Date.parse(v) <= Date.now()) || (k === 'max-age' && Number(v) <= 0);
      });
      if (expired || value === '') jar.delete(name); else jar.set(name, value);
    }
  };
  const request = async (url, init = {}) => {
    const res = await fetch(new URL(url, issuer), {
      ...init,
      redirect: 'manual',
      headers: { ...init.headers, cookie: cookieHeader() },
    });
    remember(res);
    return res;
  };

  const state = randomBytes(8).toString('hex');
  let res = await request(`/auth?${new URLSearchParams({
    client_id: clientId,
    response_type: 'code',
    redirect_uri: redirectUri,
    scope,
    prompt: 'consent',
    state,
    nonce: randomBytes(8).toString('hex'),
  })}`);

  // Follow redirects; whenever an interaction page appears, submit its form.
  for (let step = 0; step < 20; step += 1) {
    if (res.status >= 300 && res.status < 400) {
      const location = new URL(res.headers.get('location'), issuer);
      if (location.href.startsWith(redirectUri)) {
        const params = location.searchParams;
        if (params.get('error')) throw new Error(`authorization failed: ${params.get('error')}: ${params.get('error_description')}`);
        if (params.get('state') !== state) throw new Error('state mismatch');
        return exchange ? exchangeCode(params.get('code')) : params.get('code');
      }
      res = await request(location);
      continue;
    }
    const html = await res.text();
    if (res.status !== 200) throw new Error(`unexpected ${res.status} during interaction: ${html.slice(0, 300)}`);
    const action = /<form[^>]*action="([^"]+)"/.exec(html)?.[1];
    const prompt = /name="prompt" value="([^"]+)"/.exec(html)?.[1];
    if (!action || !prompt) throw new Error(`no interaction form found: ${html.slice(0, 300)}`);
    const form = new URLSearchParams({ prompt });
    if (prompt === 'login') { form.set('login', user); form.set('password', 'any'); }
    res = await request(action.replaceAll('&amp;', '&'), {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: form,
    });
  }
  throw new Error('too many interaction steps');
}

async function exchangeCode(code) {
  const res = await fetch(`${issuer}/token`, {
    method: 'POST',
    headers: {
      authorization: `Basic ${Buffer.from(`${encodeURIComponent(clientId)}:${encodeURIComponent(clientSecret)}`).toString('base64')}`,
      'content-type': 'application/x-www-form-urlencoded',
      [INTERNAL_HEADER]: internalNonce,
    },
    body: new URLSearchParams({ grant_type: 'authorization_code', code, redirect_uri: redirectUri }),
  });
  const body = await res.json();
  if (res.status !== 200) throw new Error(`code exchange failed: ${res.status} ${JSON.stringify(body)}`);
  return body;
}

// ------------------------------------------------------------------ start --
server.on('request', provider.callback());

function shutdown(signal) {
  console.error(`oidc peer: ${signal}, shutting down`);
  for (const socket of hanging) socket.destroy();
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

process.stdout.write(`${JSON.stringify({
  ready: true, issuer, port, client_id: clientId, client_secret: clientSecret,
})}\n`);
