// Test support: the real session-authority binary on a port of our choosing (so that it can be
// restarted on the same address), a TCP proxy that can cut every connection, and polling.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, '../../..');
export const BINARY = process.env.SA_BINARY ?? path.join(REPO, 'target/debug/session-authority');

export const KEYS = {
  service: 'node-example-service-key-000001',
  admin: 'node-example-admin-key-0000000002',
  watcher: 'node-example-watcher-key-000003',
};

export function tempDir(prefix) {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

export async function waitFor(what, predicate, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await predicate()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * The authority as a child process. `start()` waits for the JSON "serving" line; `stop()` sends
 * SIGTERM and waits for the exit. Its log is kept and printed when a start fails.
 */
export class Authority {
  constructor({ storage = 'memory', dataDir = tempDir('sa-node-'), port, metricsPort } = {}) {
    Object.assign(this, { storage, dataDir, port, metricsPort });
    this.log = [];
    this.child = null;
  }

  get target() {
    return `127.0.0.1:${this.port}`;
  }

  async start() {
    this.port ??= await freePort();
    const args = ['serve', '--storage', this.storage, '--data-dir', this.dataDir,
      '--listen', this.target, '--log-format', 'json'];
    if (this.metricsPort) args.push('--metrics-listen', `127.0.0.1:${this.metricsPort}`);
    const child = spawn(BINARY, args, {
      env: {
        ...process.env,
        SESSION_AUTHORITY_API_KEYS: `service:${KEYS.service},admin:${KEYS.admin},watcher:${KEYS.watcher}`,
        RUST_LOG: 'info',
      },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this.child = child;
    let buffered = '';
    const serving = new Promise((resolve, reject) => {
      child.stderr.on('data', (chunk) => {
        buffered += chunk;
        let nl;
        while ((nl = buffered.indexOf('\n')) >= 0) {
          const line = buffered.slice(0, nl);
          buffered = buffered.slice(nl + 1);
          this.log.push(line);
          if (line.includes('"serving"')) resolve();
        }
      });
      child.on('exit', (code, signal) => reject(new Error(
        `authority exited (${code ?? signal}) before serving:\n${this.log.join('\n')}`)));
    });
    await serving;
  }

  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGTERM');
    await exited;
    this.child = null;
  }
}

/**
 * A TCP proxy in front of the authority. `cut()` destroys every open connection and refuses new
 * ones until `restore()`: to the client, the network went away.
 */
export class CuttableProxy {
  constructor(upstreamPort) {
    this.upstreamPort = upstreamPort;
    this.sockets = new Set();
    this.blocked = false;
    this.server = net.createServer((client) => this.#accept(client));
  }

  listen() {
    return new Promise((resolve) => this.server.listen(0, '127.0.0.1', () => resolve(this.server.address().port)));
  }

  #accept(client) {
    if (this.blocked) return client.destroy();
    const upstream = net.connect(this.upstreamPort, '127.0.0.1');
    for (const s of [client, upstream]) {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
      s.on('error', () => {});
    }
    client.pipe(upstream);
    upstream.pipe(client);
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  }

  cut() {
    this.blocked = true;
    for (const s of this.sockets) s.destroy();
  }

  restore() {
    this.blocked = false;
  }

  close() {
    this.cut();
    return new Promise((resolve) => this.server.close(resolve));
  }
}
