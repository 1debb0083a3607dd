// A minimal Node service in front of Session Authority (plain node:http):
//
//   GET /validate   the session token from X-Session-Token; 200 {valid, user_id, session_id} or
//                   401 {valid: false, reason}. Valid answers are cached for a few seconds; the
//                   revocation watcher drops a revoked session at once, so a logout elsewhere
//                   is honoured without waiting for the cache.
//   GET /revoked    the local revoked-set and the watcher's cursor
//   GET /healthz    200 while the watcher is connected, 503 otherwise
//
// Run: SA_TARGET=127.0.0.1:50051 SA_SERVICE_KEY=... SA_WATCHER_KEY=... PORT=8080 node src/server.js

import http from 'node:http';
import { connect } from './authority.js';
import { RevocationWatcher } from './watcher.js';

/**
 * @param {object} options
 * @param {object} options.sa  a connection with a `service` key (ValidateSession)
 * @param {RevocationWatcher} options.watcher
 * @param {number} [options.cacheMs]  how long a valid answer is reused (0: always ask)
 */
export function createServer({ sa, watcher, cacheMs = 5000 }) {
  const cache = new Map(); // token -> { session, until }
  watcher.on('revoked', (event) => {
    for (const [token, entry] of cache) {
      if (entry.session.session_id === event.session_id) cache.delete(token);
    }
  });

  async function validate(req) {
    const token = req.headers['x-session-token'];
    if (!token) return [401, { valid: false, reason: 'NO_SESSION' }];
    const hit = cache.get(token);
    if (hit && hit.until > Date.now()) {
      if (watcher.isRevoked(hit.session.session_id)) return [401, { valid: false, reason: 'INVALID_REASON_REVOKED' }];
      return [200, { valid: true, cached: true, user_id: hit.session.user_id, session_id: hit.session.session_id }];
    }
    const answer = await sa.call('sessions', 'ValidateSession', {
      session_token: String(token),
      ip_address: req.socket.remoteAddress ?? '',
      device_fingerprint: {
        user_agent: req.headers['user-agent'] ?? '',
        accept_language: req.headers['accept-language'] ?? '',
      },
    });
    if (!answer.valid) {
      cache.delete(token);
      return [401, { valid: false, reason: answer.reason, end_reason: answer.end_reason }];
    }
    if (cacheMs > 0) cache.set(token, { session: answer.session, until: Date.now() + cacheMs });
    return [200, { valid: true, cached: false, user_id: answer.session.user_id, session_id: answer.session.session_id }];
  }

  return http.createServer(async (req, res) => {
    const send = (status, body) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    try {
      const url = new URL(req.url, 'http://localhost');
      if (req.method === 'GET' && url.pathname === '/validate') return send(...(await validate(req)));
      if (req.method === 'GET' && url.pathname === '/revoked') {
        return send(200, { cursor: watcher.cursor, revoked: [...watcher.revoked.keys()] });
      }
      if (req.method === 'GET' && url.pathname === '/healthz') {
        return send(watcher.connected ? 200 : 503, { watching: watcher.connected });
      }
      send(404, { error: 'not found' });
    } catch (err) {
      // A gRPC failure (authority down, bad key): not the end user's fault.
      console.error(`validate failed: ${err.code ?? ''} ${err.details ?? err.message}`);
      send(503, { error: 'session service unavailable' });
    }
  });
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const target = process.env.SA_TARGET ?? '127.0.0.1:50051';
  const sa = connect(target, process.env.SA_SERVICE_KEY ?? '');
  const watcher = new RevocationWatcher(connect(target, process.env.SA_WATCHER_KEY ?? ''));
  watcher.on('revoked', (e) => console.log(JSON.stringify({ revoked: e.session_id, kind: e.kind, cursor: e.cursor })));
  watcher.on('disconnected', (s) => console.error(`watch stream ended (${s.code}: ${s.details}); resuming from ${watcher.cursor}`));
  watcher.on('fatal', (e) => {
    console.error(`watch stopped: ${e.details}`);
    process.exit(1);
  });
  watcher.start();
  const port = Number(process.env.PORT ?? 8080);
  createServer({ sa, watcher }).listen(port, '127.0.0.1', () => console.error(`listening on 127.0.0.1:${port}`));
}
