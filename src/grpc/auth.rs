//! Caller authentication and the role table.
//!
//! Callers present `authorization: Bearer <api key>`; the key's SHA-256 digest is compared with
//! every configured digest in constant time, so neither the key's bytes nor how much of it
//! matched leak through timing. A caller with a client certificate verified by the configured
//! CA (mTLS) and no key gets the configured certificate role. Health and reflection need no key.
//! Which roles may call which method is one table, [`METHODS`], keyed by the full method path
//! and applied by [`AuthLayer`] before the request reaches a service. A path not in the table is
//! answered UNIMPLEMENTED before any key is looked at: there is no default role. Finer rules
//! (acting on a session by id needs `admin`) are checked by the service adapters with [`Caller`].

use std::sync::{Arc, RwLock};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use secrecy::ExposeSecret;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::Service;

use crate::grpc::layers::{Intercept, intercepting_layer};

use crate::config::{AuthConfig, Role};
use crate::crypto::{digest_eq, sha256};

/// Who is calling, attached to every authenticated request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The API key's configured name, or "client-certificate".
    pub name: Arc<str>,
    /// The caller's role.
    pub role: Role,
}

impl Caller {
    /// Whether the caller has the admin role.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

struct KeyEntry {
    name: Arc<str>,
    role: Role,
    sha256: [u8; 32],
}

/// The set of accepted API keys, replaceable at run time (key rotation).
#[derive(Clone, Default)]
pub struct ApiKeys {
    inner: Arc<RwLock<Arc<Vec<KeyEntry>>>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys").field("count", &self.len()).finish()
    }
}

impl ApiKeys {
    /// Keys from configuration: hashed entries plus development plaintext keys (hashed here).
    pub fn from_config(auth: &AuthConfig) -> ApiKeys {
        let keys = ApiKeys::default();
        keys.replace(auth);
        keys
    }

    /// Replaces the accepted keys; calls already authenticated are unaffected.
    pub fn replace(&self, auth: &AuthConfig) {
        let mut entries: Vec<KeyEntry> = auth
            .api_keys
            .iter()
            .map(|k| KeyEntry { name: k.name.as_str().into(), role: k.role, sha256: k.sha256 })
            .collect();
        for (index, (role, key)) in auth.plaintext_api_keys.iter().enumerate() {
            entries.push(KeyEntry {
                name: format!("env-{}-{}", role.as_str(), index + 1).into(),
                role: *role,
                sha256: sha256(key.expose_secret().as_bytes()),
            });
        }
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(entries);
    }

    /// Takes over the keys of `other` (a reload built them); calls already authenticated are
    /// unaffected.
    pub fn replace_with(&self, other: &ApiKeys) {
        let entries = other.inner.read().unwrap_or_else(|p| p.into_inner()).clone();
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = entries;
    }

    /// Adds one key by digest (the generated first-run admin key).
    pub fn add(&self, name: &str, role: Role, digest: [u8; 32]) {
        let mut guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let mut entries: Vec<KeyEntry> =
            guard.iter().map(|e| KeyEntry { name: e.name.clone(), role: e.role, sha256: e.sha256 }).collect();
        entries.push(KeyEntry { name: name.into(), role, sha256: digest });
        *guard = Arc::new(entries);
    }

    /// How many keys are accepted.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no key is accepted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The caller a presented key belongs to, if any.
    pub fn authenticate(&self, key: &str) -> Option<Caller> {
        let digest = sha256(key.as_bytes());
        let entries = self.inner.read().unwrap_or_else(|p| p.into_inner()).clone();
        // Every entry is compared, whatever matched, so timing does not depend on the key.
        let mut found = None;
        for entry in entries.iter() {
            if digest_eq(&digest, &entry.sha256) {
                found = Some(Caller { name: entry.name.clone(), role: entry.role });
            }
        }
        found
    }
}

/// What a method requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key needed (health, reflection).
    Public,
    /// One of these roles; `admin` is always allowed.
    Roles(&'static [Role]),
}

const SERVICE: &[Role] = &[Role::Service];
const ADMIN: &[Role] = &[];
const READ_REVOCATIONS: &[Role] = &[Role::Service, Role::Watcher, Role::Proxy];
const PROXY: &[Role] = &[Role::Proxy];

/// The role table: every method this server serves, by its full gRPC path, with who may call
/// it. Keyed by the whole path, not the method name, so that a name of one service presented
/// under another (`/atoms.session.v1.TokenService/ListUserSessions`) is no method at all rather
/// than a method with a borrowed role. A unit test checks it against the services' descriptors.
pub const METHODS: &[(&str, Access)] = &[
    ("/grpc.health.v1.Health/Check", Access::Public),
    ("/grpc.health.v1.Health/Watch", Access::Public),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Access::Public),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Access::Public),
    ("/atoms.session.v1.SessionService/CreateSession", Access::Roles(SERVICE)),
    ("/atoms.session.v1.SessionService/ValidateSession", Access::Roles(SERVICE)),
    ("/atoms.session.v1.SessionService/GetSession", Access::Roles(SERVICE)),
    ("/atoms.session.v1.SessionService/ListUserSessions", Access::Roles(ADMIN)),
    ("/atoms.session.v1.SessionService/UpdateSession", Access::Roles(SERVICE)),
    ("/atoms.session.v1.SessionService/TerminateSession", Access::Roles(SERVICE)),
    ("/atoms.session.v1.TokenService/GetAccessToken", Access::Roles(SERVICE)),
    ("/atoms.session.v1.TokenService/RefreshSession", Access::Roles(SERVICE)),
    ("/atoms.session.v1.TokenService/IntrospectToken", Access::Roles(SERVICE)),
    ("/atoms.session.v1.TokenService/GetRefreshHistory", Access::Roles(ADMIN)),
    ("/atoms.session.v1.RevocationService/RevokeSession", Access::Roles(SERVICE)),
    ("/atoms.session.v1.RevocationService/RevokeUserSessions", Access::Roles(SERVICE)),
    ("/atoms.session.v1.RevocationService/IsRevoked", Access::Roles(READ_REVOCATIONS)),
    ("/atoms.session.v1.RevocationService/ListRevocations", Access::Roles(READ_REVOCATIONS)),
    ("/atoms.session.v1.RevocationService/WatchRevocations", Access::Roles(READ_REVOCATIONS)),
    ("/atoms.session.v1.SecurityService/CheckRateLimit", Access::Roles(SERVICE)),
    ("/atoms.session.v1.SecurityService/DetectHijacking", Access::Roles(SERVICE)),
    ("/atoms.session.v1.SecurityService/DetectSuspiciousActivity", Access::Roles(SERVICE)),
    ("/atoms.session.v1.SecurityService/LogSecurityEvent", Access::Roles(SERVICE)),
    ("/atoms.session.v1.SecurityService/ListSecurityEvents", Access::Roles(ADMIN)),
    ("/atoms.session.v1.SecurityService/GetSecuritySummary", Access::Roles(ADMIN)),
    ("/envoy.service.auth.v3.Authorization/Check", Access::Roles(PROXY)),
    ("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit", Access::Roles(PROXY)),
];

/// The table's entry for `path`: its own `'static` copy of the path and who may call it, or
/// `None` when this server has no such method.
pub fn method(path: &str) -> Option<(&'static str, Access)> {
    METHODS.iter().find(|(known, _)| *known == path).copied()
}

/// Who may call the method at `path`; `None` when this server has no such method (there is no
/// default role).
pub fn allowed_roles(path: &str) -> Option<Access> {
    method(path).map(|(_, access)| access)
}

/// The longest part of an unknown path echoed back in an error message.
const ECHOED_PATH_BYTES: usize = 200;

/// UNIMPLEMENTED for a path that names no method of this server, answered before any key is
/// looked at, so an unknown method is the same answer for every caller.
fn unknown_method(path: &str) -> tonic::Status {
    let mut end = path.len().min(ECHOED_PATH_BYTES);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    let ellipsis = if end < path.len() { "..." } else { "" };
    tonic::Status::unimplemented(format!(
        "unknown method {}{ellipsis}: this server has no such method; the methods it serves are in \
         proto/atoms/session/v1 and listed by server reflection (`grpcurl <host:port> list`)",
        &path[..end]
    ))
}

/// Tower layer applying [`allowed_roles`] to every request.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    keys: ApiKeys,
    client_cert_role: Option<Role>,
}

impl AuthLayer {
    /// Authenticates with `keys`; callers with a verified client certificate and no key get
    /// `client_cert_role` when it is set (mTLS).
    pub fn new(keys: ApiKeys, client_cert_role: Option<Role>) -> AuthLayer {
        AuthLayer { keys, client_cert_role }
    }
}

intercepting_layer!(AuthLayer);

fn bearer(request: &Request<Body>) -> Option<&str> {
    let value = request.headers().get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

fn has_client_certificate(request: &Request<Body>) -> bool {
    request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .is_some_and(|certs| !certs.is_empty())
}

impl AuthLayer {
    fn check(&self, request: &Request<Body>) -> Result<Option<Caller>, tonic::Status> {
        let path = request.uri().path();
        let (path, roles) = match method(path) {
            None => return Err(unknown_method(path)),
            Some((_, Access::Public)) => return Ok(None),
            Some((path, Access::Roles(roles))) => (path, roles),
        };
        let caller = match bearer(request) {
            Some(key) => self.keys.authenticate(key).ok_or_else(|| {
                tonic::Status::unauthenticated(
                    "the API key is not valid; check the `authorization: Bearer <key>` header",
                )
            })?,
            None => match self.client_cert_role {
                Some(role) if has_client_certificate(request) => Caller { name: Arc::from("client-certificate"), role },
                _ => {
                    return Err(tonic::Status::unauthenticated(
                        "missing credentials: send `authorization: Bearer <api key>`",
                    ));
                }
            },
        };
        if caller.role == Role::Admin || roles.contains(&caller.role) {
            Ok(Some(caller))
        } else {
            let method = path.rsplit('/').next().unwrap_or(path);
            Err(tonic::Status::permission_denied(format!(
                "{method} needs the {} role; this key has the {} role",
                if roles.is_empty() { "admin".to_string() } else { roles_text(roles) },
                caller.role.as_str()
            )))
        }
    }
}

fn roles_text(roles: &[Role]) -> String {
    let mut names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    names.push("admin");
    names.join(" or ")
}

impl Intercept for AuthLayer {
    fn call<S>(&self, inner: &mut S, mut request: Request<Body>) -> BoxFuture<'static, Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>>,
        S::Future: Send + 'static,
    {
        match self.check(&request) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Box::pin(inner.call(request))
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeyEntry;
    use secrecy::SecretString;

    fn keys() -> ApiKeys {
        ApiKeys::from_config(&AuthConfig {
            api_keys: vec![ApiKeyEntry { name: "ops".into(), role: Role::Admin, sha256: sha256(b"admin-key-123456") }],
            plaintext_api_keys: vec![(Role::Service, SecretString::from("service-key-12345".to_string()))],
            ..AuthConfig::default()
        })
    }

    #[test]
    fn keys_authenticate_to_their_roles() {
        let keys = keys();
        assert_eq!(keys.authenticate("admin-key-123456").unwrap().role, Role::Admin);
        assert_eq!(keys.authenticate("service-key-12345").unwrap().role, Role::Service);
        assert!(keys.authenticate("service-key-1234").is_none());
        assert!(keys.authenticate("").is_none());
    }

    #[test]
    fn replacing_keys_rotates_them() {
        let keys = keys();
        keys.replace(&AuthConfig {
            plaintext_api_keys: vec![(Role::Watcher, SecretString::from("new-watcher-key-1".to_string()))],
            ..AuthConfig::default()
        });
        assert!(keys.authenticate("admin-key-123456").is_none());
        assert_eq!(keys.authenticate("new-watcher-key-1").unwrap().role, Role::Watcher);
    }

    #[test]
    fn role_table() {
        let roles = allowed_roles;
        assert_eq!(roles("/grpc.health.v1.Health/Check"), Some(Access::Public));
        assert_eq!(roles("/grpc.health.v1.Health/Watch"), Some(Access::Public));
        assert_eq!(roles("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"), Some(Access::Public));
        assert_eq!(roles("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), Some(Access::Public));
        assert_eq!(roles("/atoms.session.v1.SessionService/ListUserSessions"), Some(Access::Roles(ADMIN)));
        assert_eq!(roles("/atoms.session.v1.SessionService/ValidateSession"), Some(Access::Roles(SERVICE)));
        assert_eq!(
            roles("/atoms.session.v1.RevocationService/WatchRevocations"),
            Some(Access::Roles(READ_REVOCATIONS))
        );
        assert_eq!(roles("/atoms.session.v1.RevocationService/RevokeSession"), Some(Access::Roles(SERVICE)));
    }

    #[test]
    fn unknown_paths_have_no_role_at_all() {
        for path in [
            "",
            "/",
            "NoSlash",
            "/atoms.session.v1.SessionService/NoSuchMethod",
            // A method's name under another service, or under no service.
            "/atoms.session.v1.TokenService/ListUserSessions",
            "/atoms.session.v1.SessionService/WatchRevocations",
            "/ListUserSessions",
            "ListUserSessions",
            // Near misses of a real path.
            "/atoms.session.v1.SessionService/ValidateSession/",
            "/atoms.session.v1.SessionService/ValidateSession/extra",
            "//atoms.session.v1.SessionService/ValidateSession",
            "/atoms.session.v1.sessionservice/validatesession",
            // Under the public prefixes.
            "/grpc.health.v1.Health/NoSuchMethod",
            "/grpc.health.v1.Health/Check/../../atoms.session.v1.SessionService/ListUserSessions",
            "/grpc.reflection.v1.ServerReflection/NoSuchMethod",
            "/grpc.reflection.anything/At/All",
        ] {
            assert_eq!(allowed_roles(path), None, "{path:?}");
        }
    }

    #[test]
    fn an_unknown_method_is_named_and_its_echo_is_bounded() {
        let status = unknown_method("/atoms.session.v1.SessionService/NoSuchMethod");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(status.message().contains("/atoms.session.v1.SessionService/NoSuchMethod"), "{}", status.message());
        let long = format!("/{}é", "x".repeat(ECHOED_PATH_BYTES - 2));
        let status = unknown_method(&long);
        assert!(status.message().len() < ECHOED_PATH_BYTES + 200, "{}", status.message());
        assert!(status.message().contains("..."), "{}", status.message());
    }

    /// Every method of every service the server registers, as `/package.Service/Method`, read
    /// from the encoded descriptor sets the services are generated from (and that reflection
    /// serves).
    fn served_methods() -> std::collections::BTreeSet<String> {
        use prost::Message as _;
        let sets = [
            crate::grpc::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut methods = std::collections::BTreeSet::new();
        for encoded in sets {
            let set = prost_types::FileDescriptorSet::decode(encoded).unwrap();
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        methods.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                    }
                }
            }
        }
        // The Envoy services come pre-generated without descriptors: their one method each.
        use envoy_types::pb::envoy::service::{
            auth::v3::authorization_server, ratelimit::v3::rate_limit_service_server,
        };
        methods.insert(format!("/{}/Check", authorization_server::SERVICE_NAME));
        methods.insert(format!("/{}/ShouldRateLimit", rate_limit_service_server::SERVICE_NAME));
        methods
    }

    #[test]
    fn every_served_method_has_exactly_one_entry_and_every_entry_is_served() {
        let served = served_methods();
        assert!(served.iter().filter(|path| path.starts_with("/atoms.session.v1.")).count() >= 21, "{served:#?}");
        let table: std::collections::BTreeSet<String> = METHODS.iter().map(|(path, _)| path.to_string()).collect();
        assert_eq!(table.len(), METHODS.len(), "a path appears twice in METHODS");
        let missing: Vec<&String> = served.difference(&table).collect();
        assert!(missing.is_empty(), "methods served without an entry in auth::METHODS: {missing:?}");
        let stale: Vec<&String> = table.difference(&served).collect();
        assert!(stale.is_empty(), "auth::METHODS entries no service serves: {stale:?}");
        // The generated service names agree with the table's prefixes.
        use crate::grpc::pb::{
            revocation_service_server, security_service_server, session_service_server, token_service_server,
        };
        for name in [
            session_service_server::SERVICE_NAME,
            token_service_server::SERVICE_NAME,
            revocation_service_server::SERVICE_NAME,
            security_service_server::SERVICE_NAME,
        ] {
            assert!(METHODS.iter().any(|(path, _)| path.starts_with(&format!("/{name}/"))), "{name}");
        }
    }

    #[test]
    fn only_health_and_reflection_are_public() {
        for (path, access) in METHODS {
            let public = path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.");
            assert_eq!(*access == Access::Public, public, "{path}");
        }
    }
}
