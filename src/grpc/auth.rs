//! Caller authentication and the role table.
//!
//! Callers present `authorization: Bearer <api key>`; the key's SHA-256 digest is compared with
//! every configured digest in constant time, so neither the key's bytes nor how much of it
//! matched leak through timing. A caller with a client certificate verified by the configured
//! CA (mTLS) and no key gets the configured certificate role. Health and reflection need no key.
//! Which roles may call which method is one table, [`allowed_roles`], applied by
//! [`AuthLayer`] before the request reaches a service; finer rules (acting on a session by id
//! needs `admin`) are checked by the service adapters with [`Caller`].

use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use secrecy::ExposeSecret;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

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
const READ_REVOCATIONS: &[Role] = &[Role::Service, Role::Watcher];

/// The role table: who may call each method, by its gRPC path.
pub fn allowed_roles(path: &str) -> Access {
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        return Access::Public;
    }
    let roles = match path.rsplit('/').next().unwrap_or_default() {
        "ListUserSessions" | "GetRefreshHistory" | "ListSecurityEvents" | "GetSecuritySummary" => ADMIN,
        "IsRevoked" | "ListRevocations" | "WatchRevocations" => READ_REVOCATIONS,
        _ => SERVICE,
    };
    Access::Roles(roles)
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

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, layer: self.clone() }
    }
}

/// The service [`AuthLayer`] produces.
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

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

impl<S> Auth<S> {
    fn check(&self, request: &Request<Body>) -> Result<Option<Caller>, tonic::Status> {
        let roles = match allowed_roles(request.uri().path()) {
            Access::Public => return Ok(None),
            Access::Roles(roles) => roles,
        };
        let caller = match bearer(request) {
            Some(key) => self.layer.keys.authenticate(key).ok_or_else(|| {
                tonic::Status::unauthenticated(
                    "the API key is not valid; check the `authorization: Bearer <key>` header",
                )
            })?,
            None => match self.layer.client_cert_role {
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
            let method = request.uri().path().rsplit('/').next().unwrap_or_default();
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

impl<S> Service<Request<Body>> for Auth<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        match self.check(&request) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Box::pin(self.inner.call(request))
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
        assert_eq!(allowed_roles("/grpc.health.v1.Health/Check"), Access::Public);
        assert_eq!(allowed_roles("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"), Access::Public);
        assert_eq!(allowed_roles("/atoms.session.v1.SessionService/ListUserSessions"), Access::Roles(ADMIN));
        assert_eq!(allowed_roles("/atoms.session.v1.SessionService/ValidateSession"), Access::Roles(SERVICE));
        assert_eq!(
            allowed_roles("/atoms.session.v1.RevocationService/WatchRevocations"),
            Access::Roles(READ_REVOCATIONS)
        );
        assert_eq!(allowed_roles("/atoms.session.v1.RevocationService/RevokeSession"), Access::Roles(SERVICE));
    }
}
