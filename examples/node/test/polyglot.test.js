// The polyglot check: one authority (embedded store, so it can restart with its revocation log),
// a Node watcher started before anything happens, the Python suite run against the same authority,
// then forced disconnects. The watcher talks to the authority through a proxy that can cut it off.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { connect } from '../src/authority.js';
import { RevocationWatcher } from '../src/watcher.js';
import { Authority, CuttableProxy, KEYS, REPO, freePort, tempDir, waitFor } from './support.js';

const PYTHON = process.env.PYTHON ?? 'python3';

function runPythonSuite(authority, revokedOut) {
  return new Promise((resolve) => {
    const child = spawn(PYTHON, ['-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'examples/python/tests'], {
      cwd: REPO,
      env: {
        ...process.env,
        SA_TEST_TARGET: authority.target,
        SA_TEST_METRICS_URL: `http://127.0.0.1:${authority.metricsPort}/metrics`,
        SA_TEST_SERVICE_KEY: KEYS.service,
        SA_TEST_ADMIN_KEY: KEYS.admin,
        SA_TEST_WATCHER_KEY: KEYS.watcher,
        SA_TEST_REVOKED_OUT: revokedOut,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout.on('data', (d) => { output += d; });
    child.stderr.on('data', (d) => { output += d; });
    child.on('exit', (code) => resolve({ code, output }));
  });
}

async function listRevocations(sa) {
  const ids = [];
  let pageToken = '';
  do {
    const page = await sa.call('revocations', 'ListRevocations', { page_size: 1000, page_token: pageToken });
    ids.push(...page.entries.map((e) => e.session_id));
    pageToken = page.next_page_token;
  } while (pageToken);
  return ids;
}

/** Creates `n` sessions for a user and revokes each by id; returns the ids in revocation order. */
async function revokeSessions(sa, user, n) {
  const ids = [];
  for (let i = 0; i < n; i++) {
    const created = await sa.call('sessions', 'CreateSession', { user_id: user, access_token: `at-${user}-${i}` });
    const id = created.session.session_id;
    await sa.call('revocations', 'RevokeSession', { session_id: id, reason: 'node_test', revoked_by: 'node-test' });
    ids.push(id);
  }
  return ids;
}

function seqOf(cursor) {
  const [log, seq] = cursor.split('.');
  return { log, seq: Number(seq) };
}

/** No duplicates, strictly increasing positions in one log. */
function assertInOrderWithoutDuplicates(events) {
  const ids = events.map((e) => e.session_id);
  assert.equal(new Set(ids).size, ids.length, `duplicate events: ${ids}`);
  for (let i = 1; i < events.length; i++) {
    const a = seqOf(events[i - 1].cursor);
    const b = seqOf(events[i].cursor);
    assert.equal(b.log, a.log);
    assert.equal(b.seq, a.seq + 1, `gap or disorder between ${events[i - 1].cursor} and ${events[i].cursor}`);
  }
}

describe('a Node watcher beside the Python flow', () => {
  let authority;
  let proxy;
  let watcher;
  let admin;
  let disconnects = 0;

  before(async () => {
    authority = new Authority({ storage: 'embedded', metricsPort: await freePort() });
    await authority.start();
    proxy = new CuttableProxy(authority.port);
    const proxyPort = await proxy.listen();
    watcher = new RevocationWatcher(connect(`127.0.0.1:${proxyPort}`, KEYS.watcher), {
      heartbeatSeconds: 1,
      minBackoffMs: 100,
      maxBackoffMs: 1000,
    });
    watcher.on('disconnected', () => { disconnects += 1; });
    watcher.on('fatal', (err) => { throw err; });
    const connected = new Promise((resolve) => watcher.once('connected', resolve));
    watcher.start();
    await connected;
    admin = connect(authority.target, KEYS.admin);
  });

  after(async () => {
    watcher?.stop();
    watcher?.sa.close();
    admin?.close();
    await proxy?.close();
    await authority?.stop();
  });

  test('receives every revocation the Python flow made', async () => {
    const revokedOut = path.join(tempDir('sa-polyglot-'), 'revoked.txt');
    fs.writeFileSync(revokedOut, '');
    const { code, output } = await runPythonSuite(authority, revokedOut);
    assert.equal(code, 0, `the Python suite failed:\n${output}`);
    const ended = fs.readFileSync(revokedOut, 'utf8').split('\n').filter(Boolean);
    assert.ok(ended.length >= 8, `the Python suite reported only ${ended.length} ended sessions`);
    await waitFor('the watcher to see every session the Python flow ended',
      () => ended.every((id) => watcher.isRevoked(id)));
    // And nothing else, nothing twice: the watcher's set is the authority's revocation list.
    const listed = await listRevocations(admin);
    await waitFor('the watcher to catch up with the list', () => listed.every((id) => watcher.isRevoked(id)));
    assert.deepEqual([...watcher.revoked.keys()].sort(), [...listed].sort());
    assertInOrderWithoutDuplicates(watcher.received);
    assert.equal(disconnects, 0);
  });

  test('after a cut connection it resumes from its cursor without missing one', async () => {
    const seen = watcher.received.length;
    proxy.cut();
    await waitFor('the watcher to notice the cut', () => !watcher.connected);
    const cursorAtCut = watcher.cursor;
    const opensBefore = watcher.resumedFrom.length;
    // Revocations made while the watcher cannot hear: it must catch up from the log.
    const ids = await revokeSessions(admin, 'node-cut', 4);
    proxy.restore();
    await waitFor('the watcher to catch up after the cut', () => ids.every((id) => watcher.isRevoked(id)));
    const reopened = watcher.resumedFrom.slice(opensBefore);
    assert.ok(reopened.length >= 1);
    assert.ok(reopened.every((c) => c === cursorAtCut), `resumed from ${reopened}, not ${cursorAtCut}`);
    assert.deepEqual(watcher.received.slice(seen).map((e) => e.session_id), ids);
    assertInOrderWithoutDuplicates(watcher.received);
  });

  test('after the authority restarts on the same port it resumes without missing one', async () => {
    const seen = watcher.received.length;
    const logBefore = seqOf(watcher.cursor).log;
    await authority.stop();
    await waitFor('the watcher to notice the shutdown', () => !watcher.connected);
    await authority.start();
    // Made as soon as the authority is back, racing the watcher's reconnect: whether they arrive
    // from the log (catch-up) or live, each must arrive once.
    const ids = await revokeSessions(admin, 'node-restart', 3);
    await waitFor('the watcher to catch up after the restart', () => ids.every((id) => watcher.isRevoked(id)));
    assert.deepEqual(watcher.received.slice(seen).map((e) => e.session_id), ids);
    assertInOrderWithoutDuplicates(watcher.received);
    // The embedded store keeps its log across the restart: the same log, so no re-snapshot.
    assert.equal(seqOf(watcher.cursor).log, logBefore);
  });
});
