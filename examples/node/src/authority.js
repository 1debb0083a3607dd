// Clients for Session Authority, loaded at run time from the repository's proto/ with
// @grpc/proto-loader (no generated code to keep in sync). Every call carries the API key in
// `authorization: Bearer <key>` metadata: grpc-js refuses call credentials on a plaintext
// channel, so the key goes into each call's metadata instead.

import path from 'node:path';
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const here = path.dirname(fileURLToPath(import.meta.url));
export const PROTO_ROOT = process.env.SA_PROTO_ROOT ?? path.resolve(here, '../../../proto');

const FILES = ['common', 'session_service', 'token_service', 'revocation_service', 'security_service']
  .map((name) => `atoms/session/v1/${name}.proto`);

const definition = protoLoader.loadSync(FILES, {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as in the .proto: session_id, after_cursor
  longs: String,
  enums: String, // 'REVOCATION_KIND_REVOKED', not 1
  defaults: true,
  oneofs: true, // a oneof's name says which member is set: message.message === 'event'
});
const v1 = grpc.loadPackageDefinition(definition).atoms.session.v1;

// The channel retries a lost connection quickly: a restarted authority is back in about a second
// and the default backoff (1 s growing to 120 s) would leave watchers blind for longer.
const CHANNEL_OPTIONS = {
  'grpc.initial_reconnect_backoff_ms': 200,
  'grpc.max_reconnect_backoff_ms': 2000,
};

/**
 * Clients of the four services on one target (plaintext: use grpc.credentials.createSsl() in
 * production), and the metadata that authenticates a call with `apiKey`.
 */
export function connect(target, apiKey) {
  const creds = grpc.credentials.createInsecure();
  const clients = {
    sessions: new v1.SessionService(target, creds, CHANNEL_OPTIONS),
    tokens: new v1.TokenService(target, creds, CHANNEL_OPTIONS),
    revocations: new v1.RevocationService(target, creds, CHANNEL_OPTIONS),
    security: new v1.SecurityService(target, creds, CHANNEL_OPTIONS),
  };
  return {
    ...clients,
    metadata() {
      const md = new grpc.Metadata();
      md.set('authorization', `Bearer ${apiKey}`);
      return md;
    },
    /** A unary call as a promise: `await sa.call('sessions', 'ValidateSession', request)`. */
    call(service, method, request, { deadlineMs = 5000 } = {}) {
      return new Promise((resolve, reject) => {
        clients[service][method](request, this.metadata(), { deadline: Date.now() + deadlineMs }, (err, res) =>
          err ? reject(err) : resolve(res));
      });
    },
    close() {
      for (const c of Object.values(clients)) c.close();
    },
  };
}

export { grpc };
