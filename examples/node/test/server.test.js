// The validate endpoint and the local revoked-set, against a real authority (memory store).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { connect } from '../src/authority.js';
import { createServer } from '../src/server.js';
import { RevocationWatcher } from '../src/watcher.js';
import { Authority, KEYS, waitFor } from './support.js';

let authority;
let service;
let watcher;
let server;
let base;

before(async () => {
  authority = new Authority();
  await authority.start();
  service = connect(authority.target, KEYS.service);
  watcher = new RevocationWatcher(connect(authority.target, KEYS.watcher), { heartbeatSeconds: 1 });
  const connected = new Promise((resolve) => watcher.once('connected', resolve));
  watcher.start();
  await connected;
  // A long cache: only the watcher can make a revocation visible before it runs out.
  server = createServer({ sa: service, watcher, cacheMs: 60_000 });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${server.address().port}`;
});

after(async () => {
  await new Promise((resolve) => server?.close(resolve));
  watcher?.stop();
  watcher?.sa.close();
  service?.close();
  await authority?.stop();
});

const AGENT = 'node-example-test/1.0';

async function validate(token) {
  const headers = { 'user-agent': AGENT };
  if (token) headers['x-session-token'] = token;
  const res = await fetch(`${base}/validate`, { headers });
  return { status: res.status, body: await res.json() };
}

test('a valid session is 200, then served from the cache', async () => {
  const created = await service.call('sessions', 'CreateSession', {
    user_id: 'node-alice', access_token: 'at-1', ip_address: '127.0.0.1', user_agent: AGENT,
    device_fingerprint: { user_agent: AGENT },
  });
  const first = await validate(created.session_token);
  assert.deepEqual(first, {
    status: 200,
    body: { valid: true, cached: false, user_id: 'node-alice', session_id: created.session.session_id },
  });
  assert.equal((await validate(created.session_token)).body.cached, true);
});

test('no token or an unknown token is 401 with the reason', async () => {
  assert.deepEqual(await validate(null), { status: 401, body: { valid: false, reason: 'NO_SESSION' } });
  const unknown = await validate(`sat_0000_${'A'.repeat(43)}`);
  assert.equal(unknown.status, 401);
  assert.equal(unknown.body.reason, 'INVALID_REASON_NOT_FOUND');
});

test('a revocation reaches the revoked-set and beats the cache', async () => {
  const created = await service.call('sessions', 'CreateSession', {
    user_id: 'node-bob', access_token: 'at-2', device_fingerprint: { user_agent: AGENT },
  });
  const id = created.session.session_id;
  assert.equal((await validate(created.session_token)).status, 200);
  await service.call('revocations', 'RevokeSession', { session_token: created.session_token, reason: 'user_logout' });
  await waitFor('the watcher to see the revocation', () => watcher.isRevoked(id));
  const after = await validate(created.session_token);
  assert.equal(after.status, 401);
  assert.equal(after.body.reason, 'INVALID_REASON_REVOKED');
  const revoked = await (await fetch(`${base}/revoked`)).json();
  assert.ok(revoked.revoked.includes(id));
  assert.equal(watcher.revoked.get(id).kind, 'REVOCATION_KIND_REVOKED');
  assert.equal((await fetch(`${base}/healthz`)).status, 200);
});
