// Self-test for the loopback OIDC peer (provider.mjs): starts it as a child
// process exactly like the Rust integration tests will, then exercises token
// minting, refresh rotation with both client auth methods, replay detection,
// introspection, revocation, discovery, failure injection and the counters.
// Usage: node check.mjs   (exit code 0 and "N passed, 0 failed" on success)

import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { strict as assert } from 'node:assert';
import { fileURLToPath } from 'node:url';

const ACCESS_TTL = 45;
const child = spawn(process.execPath, [
  fileURLToPath(new URL('./provider.mjs', import.meta.url)),
  '--port', '0', '--access-ttl', String(ACCESS_TTL),
], { stdio: ['ignore', 'pipe', 'pipe'] });

let stderr = '';
child.stderr.on('data', (d) => { stderr += d; });
const stdoutLines = [];
const lines = createInterface({ input: child.stdout });
lines.on('line', (l) => stdoutLines.push(l));

const ready = await Promise.race([
  once(lines, 'line').then(([l]) => JSON.parse(l)),
  once(child, 'exit').then(([code]) => { throw new Error(`provider exited (${code}) before ready:\n${stderr}`); }),
  new Promise((_, reject) => { setTimeout(() => reject(new Error(`no ready line in 15s:\n${stderr}`)), 15000).unref(); }),
]);
const { issuer, client_id: clientId, client_secret: clientSecret } = ready;

// ----------------------------------------------------------------- helpers --
const basic = `Basic ${Buffer.from(`${encodeURIComponent(clientId)}:${encodeURIComponent(clientSecret)}`).toString('base64')}`;

async function call(path, { form, json, auth = 'basic', method, signal } = {}) {
  const headers = {};
  let body;
  if (form) {
    const params = new URLSearchParams(form);
    if (auth === 'post') { params.set('client_id', clientId); params.set('client_secret', clientSecret); }
    if (auth === 'basic') headers.authorization = basic;
    headers['content-type'] = 'application/x-www-form-urlencoded';
    body = params;
  } else if (json) {
    headers['content-type'] = 'application/json';
    body = JSON.stringify(json);
  }
  const res = await fetch(issuer + path, { method: method ?? (body ? 'POST' : 'GET'), headers, body, signal });
  const text = await res.text();
  let data;
  try { data = JSON.parse(text); } catch { data = text; }
  return { status: res.status, body: data };
}
const refresh = (rt, auth, signal) => call('/token', { form: { grant_type: 'refresh_token', refresh_token: rt }, auth, signal });
const introspect = (token) => call('/token/introspection', { form: { token } });
const revoke = (token, hint) => call('/token/revocation', { form: { token, ...(hint && { token_type_hint: hint }) } });
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });
const stats = async () => (await call('/__test/stats')).body;
const resetStats = () => call('/__test/reset', { method: 'POST' });

let passed = 0;
let failed = 0;
async function check(name, fn) {
  try {
    await fn();
    passed += 1;
    console.log(`ok   ${name}`);
  } catch (err) {
    failed += 1;
    console.log(`FAIL ${name}\n     ${String(err.stack ?? err).split('\n').slice(0, 6).join('\n     ')}`);
  }
}

// ------------------------------------------------------------------- checks --
await check('ready line shape', () => {
  assert.equal(ready.ready, true);
  assert.equal(issuer, `http://127.0.0.1:${ready.port}`);
  assert.ok(Number.isInteger(ready.port) && ready.port > 0);
  assert.equal(clientId, 'session-authority');
  assert.ok(typeof clientSecret === 'string' && clientSecret.length >= 32);
});

await check('discovery lists token, introspection and revocation endpoints', async () => {
  const { status, body } = await call('/.well-known/openid-configuration');
  assert.equal(status, 200);
  assert.equal(body.issuer, issuer);
  assert.equal(body.token_endpoint, `${issuer}/token`);
  assert.equal(body.introspection_endpoint, `${issuer}/token/introspection`);
  assert.equal(body.revocation_endpoint, `${issuer}/token/revocation`);
  assert.ok(body.grant_types_supported.includes('refresh_token'));
  for (const m of ['client_secret_basic', 'client_secret_post']) {
    assert.ok(body.token_endpoint_auth_methods_supported.includes(m), m);
  }
});

let alice;
await check('GET /__test/tokens mints real tokens via the authorization code flow', async () => {
  const { status, body } = await call('/__test/tokens?user=alice');
  assert.equal(status, 200, JSON.stringify(body));
  for (const k of ['access_token', 'refresh_token', 'id_token']) assert.ok(body[k], k);
  assert.equal(body.expires_in, ACCESS_TTL);
  assert.equal(body.token_type, 'Bearer');
  assert.deepEqual(body.scope.split(' ').sort(), ['offline_access', 'openid']);
  const claims = JSON.parse(Buffer.from(body.id_token.split('.')[1], 'base64url'));
  assert.equal(claims.sub, 'alice');
  assert.equal(claims.iss, issuer);
  assert.equal(claims.aud, clientId);
  alice = body;
});

await check('POST /__test/tokens works too', async () => {
  const { status, body } = await call('/__test/tokens', { json: { user: 'bob' } });
  assert.equal(status, 200, JSON.stringify(body));
  assert.ok(body.refresh_token);
  assert.equal((await introspect(body.access_token)).body.sub, 'bob');
});

await check('stats counted the code exchange; reset zeroes them', async () => {
  const s = await stats();
  assert.equal(s.token.by_grant_type.authorization_code, 2);
  await resetStats();
  assert.deepEqual((await stats()).token, {
    total: 0, by_grant_type: {}, by_auth_method: {}, by_status: {}, injected: { 503: 0, timeout: 0 },
  });
});

const rts = [];
await check('refresh with client_secret_basic rotates the refresh token', async () => {
  const { status, body } = await refresh(alice.refresh_token, 'basic');
  assert.equal(status, 200, JSON.stringify(body));
  assert.ok(body.refresh_token && body.refresh_token !== alice.refresh_token);
  assert.ok(body.access_token && body.access_token !== alice.access_token);
  assert.equal(body.expires_in, ACCESS_TTL);
  rts.push(alice.refresh_token, body.refresh_token);
});

await check('refresh with client_secret_post rotates the refresh token', async () => {
  const { status, body } = await refresh(rts[1], 'post');
  assert.equal(status, 200, JSON.stringify(body));
  assert.ok(body.refresh_token && !rts.includes(body.refresh_token));
  rts.push(body.refresh_token);
});

await check('stats: exactly two refresh_token requests so far', async () => {
  const s = await stats();
  assert.equal(s.token.by_grant_type.refresh_token, 2);
  assert.equal(s.token.total, 2);
  assert.equal(s.token.by_status[200], 2);
  assert.deepEqual(s.token.by_auth_method, { client_secret_basic: 1, client_secret_post: 1 });
});

await check('wrong client secret gives 401 invalid_client', async () => {
  const res = await fetch(`${issuer}/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ grant_type: 'refresh_token', refresh_token: rts[2], client_id: clientId, client_secret: 'nope' }),
  });
  assert.equal(res.status, 401);
  assert.equal((await res.json()).error, 'invalid_client');
});

await check('reusing a rotated refresh token gives 400 invalid_grant', async () => {
  const { status, body } = await refresh(rts[0], 'basic');
  assert.equal(status, 400);
  assert.equal(body.error, 'invalid_grant');
});

await check('...and the replay revoked the whole grant (latest refresh token dead too)', async () => {
  const { status, body } = await refresh(rts[2], 'basic');
  assert.equal(status, 400);
  assert.equal(body.error, 'invalid_grant');
  assert.equal((await introspect(rts[2])).body.active, false);
});

let carol;
await check('introspection: fresh access token is active', async () => {
  carol = (await call('/__test/tokens?user=carol')).body;
  const { status, body } = await introspect(carol.access_token);
  assert.equal(status, 200);
  assert.equal(body.active, true);
  assert.equal(body.sub, 'carol');
  assert.equal(body.client_id, clientId);
  assert.equal(body.token_type, 'Bearer');
  assert.ok(body.exp > body.iat);
  // Refresh tokens introspect too (no token_type member; longer exp).
  const rt = await introspect(carol.refresh_token);
  assert.equal(rt.body.active, true);
  assert.equal(rt.body.sub, 'carol');
  assert.ok(rt.body.exp > body.exp);
});

await check('revocation: revoked access token introspects as inactive', async () => {
  const { status } = await revoke(carol.access_token, 'access_token');
  assert.equal(status, 200);
  const { body } = await introspect(carol.access_token);
  assert.deepEqual(body, { active: false });
});

await check('revoking an access token also kills the refresh tokens of its grant', async () => {
  // oidc-provider default (allowed by RFC 7009 section 2.1): revocation of
  // any token revokes every token issued under the same grant.
  const { status, body } = await refresh(carol.refresh_token, 'post');
  assert.equal(status, 400);
  assert.equal(body.error, 'invalid_grant');
  assert.equal((await introspect(carol.refresh_token)).body.active, false);
});

await check('revoking a refresh token kills it and the access tokens of its grant', async () => {
  const erin = (await call('/__test/tokens?user=erin')).body;
  assert.equal((await revoke(erin.refresh_token, 'refresh_token')).status, 200);
  assert.equal((await introspect(erin.refresh_token)).body.active, false);
  assert.equal((await introspect(erin.access_token)).body.active, false);
  assert.equal((await refresh(erin.refresh_token, 'basic')).body.error, 'invalid_grant');
});

await check('revoking an unknown token still answers 200 (RFC 7009)', async () => {
  assert.equal((await revoke('not-a-real-token')).status, 200);
});

await check('revocation_fail: 503 and delay leave the token live, then revocation works', async () => {
  const gina = (await call('/__test/tokens?user=gina')).body;
  await resetStats();
  const armed = await call('/__test/revocation_fail', { json: { mode: '503', count: 1 } });
  assert.deepEqual(armed.body, { mode: '503', delay_ms: 0, count: 1 });
  assert.equal((await revoke(gina.refresh_token, 'refresh_token')).status, 503);
  assert.equal((await introspect(gina.refresh_token)).body.active, true);
  await call('/__test/revocation_fail', { json: { mode: 'delay', delay_ms: 1000 } });
  const started = Date.now();
  await assert.rejects(
    call('/token/revocation', { form: { token: gina.refresh_token }, signal: AbortSignal.timeout(200) }),
    { name: 'TimeoutError' },
  );
  assert.ok(Date.now() - started >= 150);
  await sleep(1100);
  assert.equal((await introspect(gina.refresh_token)).body.active, true, 'a request the client gave up on is not processed');
  await call('/__test/revocation_fail', { json: { mode: 'none' } });
  assert.equal((await revoke(gina.refresh_token, 'refresh_token')).status, 200);
  assert.equal((await introspect(gina.refresh_token)).body.active, false);
  const s = await stats();
  assert.equal(s.revocation_processed, 1);
  assert.ok(s.revocation_injected >= 2);
});

await check('fail mode 503: next N token requests get 503, then normal again', async () => {
  const dave = (await call('/__test/tokens?user=dave')).body;
  await resetStats();
  const armed = await call('/__test/fail', { json: { mode: '503', count: 2 } });
  assert.deepEqual(armed.body, { mode: '503', count: 2, grant_type: null, retry_after: null });
  for (let i = 0; i < 2; i += 1) {
    const { status, body } = await refresh(dave.refresh_token, 'basic');
    assert.equal(status, 503);
    assert.equal(body.error, 'temporarily_unavailable');
  }
  assert.equal((await call('/__test/fail')).body.mode, 'none');
  const { status, body } = await refresh(dave.refresh_token, 'basic');
  assert.equal(status, 200, 'the injected 503s must not have consumed the refresh token');
  const s = await stats();
  assert.equal(s.token.by_grant_type.refresh_token, 3);
  assert.equal(s.token.injected[503], 2);
  assert.deepEqual(s.token.by_status, { 200: 1, 503: 2 });
  assert.deepEqual(s.token.by_auth_method, { client_secret_basic: 3 });
  rts.length = 0;
  rts.push(body.refresh_token);
});

await check('fail mode with grant_type filter passes other grants through', async () => {
  await call('/__test/fail', { json: { mode: '503', grant_type: 'client_credentials' } });
  const cc = await call('/token', { form: { grant_type: 'client_credentials' } });
  assert.equal(cc.status, 503);
  const { status, body } = await refresh(rts[0], 'post');
  assert.equal(status, 200, JSON.stringify(body));
  rts[0] = body.refresh_token;
  await call('/__test/fail', { json: { mode: 'none' } });
  assert.equal((await call('/token', { form: { grant_type: 'client_credentials' } })).status, 200);
});

await check('fail mode timeout: token request hangs until the client gives up', async () => {
  await call('/__test/fail', { json: { mode: 'timeout', count: 1 } });
  const started = Date.now();
  await assert.rejects(refresh(rts[0], 'basic', AbortSignal.timeout(500)), { name: 'TimeoutError' });
  assert.ok(Date.now() - started >= 450);
  assert.equal((await stats()).token.injected.timeout, 1);
  assert.equal((await refresh(rts[0], 'basic')).status, 200);
});

await check('fail mode 503 with retry_after sends Retry-After', async () => {
  await call('/__test/fail', { json: { mode: '503', count: 1, retry_after: 3 } });
  const res = await fetch(`${issuer}/token`, {
    method: 'POST',
    headers: { authorization: basic, 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ grant_type: 'client_credentials' }),
  });
  assert.equal(res.status, 503);
  assert.equal(res.headers.get('retry-after'), '3');
  assert.equal((await call('/__test/fail')).body.mode, 'none');
});


await check('refresh hook: a delayed request the client gave up on is dropped unprocessed', async () => {
  const erin = (await call('/__test/tokens?user=erin')).body;
  await resetStats();
  await call('/__test/refresh_hook', { json: { delay_ms: 800 } });
  await assert.rejects(refresh(erin.refresh_token, 'basic', AbortSignal.timeout(300)), { name: 'TimeoutError' });
  await sleep(700);
  const s = await stats();
  assert.equal(s.token.dropped, 1);
  assert.equal(s.token.by_grant_type.refresh_token, 1);
  const again = await refresh(erin.refresh_token, 'basic');
  assert.equal(again.status, 200, 'the dropped request must not have consumed the refresh token');
});

await check('refresh hook: a processed request answered too late has spent the refresh token', async () => {
  const fred = (await call('/__test/tokens?user=fred')).body;
  await call('/__test/refresh_hook', { json: { delay_ms: 800, processed: true } });
  await assert.rejects(refresh(fred.refresh_token, 'basic', AbortSignal.timeout(300)), { name: 'TimeoutError' });
  const again = await refresh(fred.refresh_token, 'basic');
  assert.equal(again.status, 400);
  assert.equal(again.body.error, 'invalid_grant');
});

await check('refresh hook: expires_in omitted or replaced, once', async () => {
  const gail = (await call('/__test/tokens?user=gail')).body;
  await call('/__test/refresh_hook', { json: { expires_in: 'omit' } });
  const first = await refresh(gail.refresh_token, 'basic');
  assert.equal(first.status, 200);
  assert.equal(first.body.expires_in, undefined);
  await call('/__test/refresh_hook', { json: { expires_in: 0 } });
  const second = await refresh(first.body.refresh_token, 'basic');
  assert.equal(second.body.expires_in, 0);
  const third = await refresh(second.body.refresh_token, 'basic');
  assert.equal(third.body.expires_in, ACCESS_TTL, 'the hook is one-shot');
  assert.equal((await call('/__test/refresh_hook', { json: { delay_ms: -1 } })).status, 400);
});

await check('GET /__test/code returns an unexchanged code the client can exchange once', async () => {
  const { status, body } = await call('/__test/code?user=dora');
  assert.equal(status, 200, JSON.stringify(body));
  assert.equal(body.redirect_uri, `${issuer}/__test/callback`);
  const exchange = () => call('/token', { form: { grant_type: 'authorization_code', code: body.code, redirect_uri: body.redirect_uri } });
  const first = await exchange();
  assert.equal(first.status, 200, JSON.stringify(first.body));
  assert.ok(first.body.refresh_token);
  assert.equal(JSON.parse(Buffer.from(first.body.id_token.split('.')[1], 'base64url')).sub, 'dora');
  assert.equal((await exchange()).status, 400);
  assert.equal((await call('/__test/code')).status, 400);
});

await check('unknown test endpoint and bad fail mode are rejected', async () => {
  assert.equal((await call('/__test/nope')).status, 404);
  assert.equal((await call('/__test/fail', { json: { mode: 'explode' } })).status, 400);
  assert.equal((await call('/__test/tokens')).status, 400);
});

await check('SIGTERM exits cleanly with exactly one stdout line', async () => {
  const exited = once(child, 'exit');
  child.kill('SIGTERM');
  const [code, signal] = await Promise.race([
    exited,
    new Promise((_, reject) => { setTimeout(() => reject(new Error('no exit within 5s')), 5000).unref(); }),
  ]);
  assert.equal(signal, null);
  assert.equal(code, 0);
  assert.equal(stdoutLines.length, 1, stdoutLines.join('\n'));
});

if (child.exitCode === null) child.kill('SIGKILL');
if (failed) console.log(`--- provider stderr ---\n${stderr}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
