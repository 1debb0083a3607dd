// A revocation watcher: keeps a local revoked-set from RevocationService.WatchRevocations and
// survives disconnects by resuming after the last cursor it received (an event's or a
// heartbeat's), which the server guarantees gives no gap and no duplicate.
//
// What ends a stream and what the watcher does:
//   UNAVAILABLE (server shutting down, connection lost), ABORTED (this watcher fell behind),
//   anything transient          -> reconnect with backoff, after_cursor = last cursor
//   OUT_OF_RANGE                -> the cursor is older than retention, ahead of the log or from
//                                  another log (a wiped store): re-snapshot with ListRevocations,
//                                  then watch from the snapshot's cursor
//   UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT
//                               -> a retry cannot help: emit 'fatal' and stop

import { EventEmitter } from 'node:events';
import { grpc } from './authority.js';

const FATAL = new Set([
  grpc.status.UNAUTHENTICATED,
  grpc.status.PERMISSION_DENIED,
  grpc.status.INVALID_ARGUMENT,
]);

export class RevocationWatcher extends EventEmitter {
  /**
   * @param {object} sa  a connection from connect() with a watcher, service or admin key
   * @param {object} [options]
   * @param {string} [options.afterCursor]  resume point; empty watches from now
   * @param {string} [options.userId]  only this user's events
   * @param {number} [options.heartbeatSeconds]  requested heartbeat interval (1..300)
   * @param {number} [options.minBackoffMs] [options.maxBackoffMs]  reconnect backoff bounds
   */
  constructor(sa, options = {}) {
    super();
    this.sa = sa;
    this.cursor = options.afterCursor ?? '';
    this.userId = options.userId ?? '';
    this.heartbeatSeconds = options.heartbeatSeconds ?? 15;
    this.minBackoffMs = options.minBackoffMs ?? 200;
    this.maxBackoffMs = options.maxBackoffMs ?? 10_000;
    /** session_id -> the RevocationEvent that ended it */
    this.revoked = new Map();
    /** Every event received, in order (duplicates would show here). */
    this.received = [];
    /** The after_cursor of each stream opened, in order. */
    this.resumedFrom = [];
    this.connected = false;
    this.stopped = true;
    this.call = null;
    this.backoffMs = this.minBackoffMs;
    this.retryTimer = null;
  }

  isRevoked(sessionId) {
    return this.revoked.has(sessionId);
  }

  start() {
    this.stopped = false;
    this.#open();
    return this;
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    if (this.call) this.call.cancel();
    this.call = null;
  }

  #open() {
    if (this.stopped) return;
    this.resumedFrom.push(this.cursor);
    const request = {
      after_cursor: this.cursor,
      user_id: this.userId,
      heartbeat_interval: { seconds: this.heartbeatSeconds, nanos: 0 },
    };
    const call = this.sa.revocations.WatchRevocations(request, this.sa.metadata());
    this.call = call;
    call.on('data', (msg) => this.#onMessage(msg));
    call.on('error', (err) => this.#onEnd(call, err));
    call.on('end', () => this.#onEnd(call, null));
  }

  #onMessage(msg) {
    if (msg.message === 'heartbeat') {
      this.cursor = msg.heartbeat.cursor;
      if (!this.connected) {
        this.connected = true;
        this.backoffMs = this.minBackoffMs;
        this.emit('connected', this.cursor);
      }
      this.emit('heartbeat', this.cursor);
    } else if (msg.message === 'event') {
      this.#record(msg.event);
      this.cursor = msg.event.cursor;
    }
  }

  #record(event) {
    this.received.push(event);
    if (!this.revoked.has(event.session_id)) {
      this.revoked.set(event.session_id, event);
      this.emit('revoked', event);
    }
  }

  #onEnd(call, err) {
    // 'error' and 'end' may both fire for one call; handle the first.
    if (call !== this.call) return;
    this.call = null;
    this.connected = false;
    if (this.stopped) return;
    const code = err ? err.code : grpc.status.UNAVAILABLE;
    this.emit('disconnected', { code, details: err ? err.details : 'stream ended' });
    if (FATAL.has(code)) {
      this.stopped = true;
      this.emit('fatal', err);
      return;
    }
    if (code === grpc.status.OUT_OF_RANGE) {
      this.#resnapshot().then(
        () => this.#retry(0),
        (e) => {
          this.emit('disconnected', { code: e.code, details: e.details });
          this.#retry();
        },
      );
      return;
    }
    this.#retry();
  }

  #retry(delay = this.backoffMs) {
    if (this.stopped) return;
    this.backoffMs = Math.min(this.backoffMs * 2, this.maxBackoffMs);
    this.retryTimer = setTimeout(() => this.#open(), delay);
  }

  async #resnapshot() {
    let pageToken = '';
    let cursor = '';
    do {
      const page = await this.sa.call('revocations', 'ListRevocations', {
        user_id: this.userId,
        page_size: 1000,
        page_token: pageToken,
      });
      cursor ||= page.cursor;
      for (const entry of page.entries) {
        if (!this.revoked.has(entry.session_id)) {
          this.revoked.set(entry.session_id, entry);
          this.emit('revoked', entry);
        }
      }
      pageToken = page.next_page_token;
    } while (pageToken);
    this.cursor = cursor;
    this.emit('resnapshot', cursor);
  }
}
