//! One upstream OAuth2 / OpenID Connect provider: its endpoints (configured, or found through
//! OpenID discovery), its client credentials, and single upstream calls (refresh grant, RFC 7662
//! introspection, RFC 7009 revocation) through the `oauth2` crate over our own reqwest client.
//!
//! Why our own HTTP function: `oauth2`'s `reqwest` feature pins reqwest 0.12; the crate accepts
//! any async function from `http::Request` to `http::Response`, so we hand it one over reqwest
//! 0.13 (rustls with the ring provider, redirects off as oauth2 advises against SSRF). That
//! function also classifies the answer before `oauth2` sees it: a 5xx or a 429 becomes a
//! transient error carrying `Retry-After`, so the retry policy never has to guess from a parsed
//! error body.
//!
//! Secrets: tokens and the client secret travel inside `oauth2`'s secret types and our
//! `SecretString`s, whose `Debug` is redacted. Errors carry only an OAuth2 error code (checked to
//! be a short `[a-z_]` word) and never the provider's `error_description`, which may echo input.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AccessToken, AuthType, Client, ClientId, ClientSecret, EndpointMaybeSet, EndpointNotSet, ExtraTokenFields,
    HttpRequest, HttpResponse, IntrospectionUrl, RefreshToken, RequestTokenError, RevocationUrl,
    StandardRevocableToken, StandardTokenResponse, TokenIntrospectionResponse, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::clock::Millis;

mod errors;

pub use errors::*;

/// How the client authenticates at the token, introspection and revocation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// HTTP Basic with the client id and secret (RFC 6749 §2.3.1; the default).
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Post,
}

impl ClientAuth {
    /// Parses the configuration names `client_secret_basic` and `client_secret_post`.
    pub fn parse(text: &str) -> Option<ClientAuth> {
        match text {
            "client_secret_basic" | "basic" => Some(ClientAuth::Basic),
            "client_secret_post" | "post" => Some(ClientAuth::Post),
            _ => None,
        }
    }
}

/// The configuration of one provider.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// The name sessions record (`default` for the flat `token.*` settings).
    pub name: String,
    /// OAuth2 client id.
    pub client_id: Option<String>,
    /// OAuth2 client secret.
    pub client_secret: Option<SecretString>,
    /// Token endpoint (overrides discovery).
    pub token_endpoint: Option<String>,
    /// Introspection endpoint (overrides discovery).
    pub introspection_endpoint: Option<String>,
    /// Revocation endpoint (overrides discovery).
    pub revocation_endpoint: Option<String>,
    /// Issuer, resolved through `/.well-known/openid-configuration` for endpoints not given.
    pub issuer: Option<String>,
    /// Client authentication method.
    pub client_auth: ClientAuth,
    /// Timeout of one HTTP request to the provider.
    pub request_timeout: Duration,
}

/// The fields of a token response beyond RFC 6749's: the OpenID Connect `id_token`.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct IdTokenField {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
}

impl std::fmt::Debug for IdTokenField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdTokenField([redacted])")
    }
}

impl ExtraTokenFields for IdTokenField {}

type TokenAnswer = StandardTokenResponse<IdTokenField, BasicTokenType>;

type OAuthClient = Client<
    BasicErrorResponse,
    TokenAnswer,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// New tokens from a refresh grant.
pub struct TokenSet {
    /// The new access token.
    pub access_token: SecretString,
    /// A new refresh token when the provider rotated it.
    pub refresh_token: Option<SecretString>,
    /// A new id token, if sent.
    pub id_token: Option<SecretString>,
    /// Token type as sent ("Bearer").
    pub token_type: String,
    /// Lifetime of the access token; `None` when absent or zero (no expiry known).
    pub expires_in: Option<Duration>,
    /// Granted scopes, when sent.
    pub scopes: Option<Vec<String>>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSet")
            .field("rotated", &self.refresh_token.is_some())
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// An RFC 7662 answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Introspection {
    /// Whether the token is active.
    pub active: bool,
    /// Space-separated scopes.
    pub scope: String,
    /// Client the token was issued to.
    pub client_id: String,
    /// Resource owner's name.
    pub username: String,
    pub token_type: String,
    /// Expiry.
    pub exp: Option<Millis>,
    /// Issue time.
    pub iat: Option<Millis>,
    /// Not-before.
    pub nbf: Option<Millis>,
    /// Subject.
    pub sub: String,
    /// Audiences.
    pub aud: Vec<String>,
    /// Issuer.
    pub iss: String,
    /// Token id.
    pub jti: String,
}

/// The part of an OpenID discovery document we use.
#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    token_endpoint: Option<String>,
    introspection_endpoint: Option<String>,
    revocation_endpoint: Option<String>,
}

/// The `oauth2` client and the revocation endpoint, once the endpoints are known.
#[derive(Debug)]
struct Resolved {
    client: OAuthClient,
    revocation: Option<String>,
}

/// One provider: settings, its HTTP client, and the `oauth2` client once endpoints are known.
#[derive(Debug)]
pub struct Provider {
    settings: ProviderSettings,
    http: reqwest::Client,
    resolved: tokio::sync::OnceCell<Resolved>,
}

/// Installs ring as rustls's process-wide crypto provider (reqwest is built with
/// `rustls-no-provider` so that aws-lc is not compiled; without a default provider it panics
/// when a client is built). Idempotent.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The HTTP client shared by every provider: no redirects, rustls, bounded connect time.
pub fn http_client() -> reqwest::Result<reqwest::Client> {
    install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("session-authority/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Sends one request. 5xx and 429 answers become errors here (with `Retry-After`), so that
/// `oauth2` only ever parses answers that are final.
async fn send(http: reqwest::Client, timeout: Duration, request: HttpRequest) -> Result<HttpResponse, HttpError> {
    let (parts, body) = request.into_parts();
    let response = http
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| {
            // A connect error (a connect timeout included) means nothing was sent.
            if e.is_connect() {
                HttpError::Connect(network_message(&e))
            } else if e.is_timeout() {
                HttpError::Timeout
            } else {
                HttpError::Network(network_message(&e))
            }
        })?;
    let status = response.status();
    if status.is_server_error() || status.as_u16() == 429 {
        let retry_after = crate::http::retry_after(response.headers(), std::time::SystemTime::now());
        return Err(HttpError::Status { status: status.as_u16(), retry_after });
    }
    let headers = response.headers().clone();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| if e.is_timeout() { HttpError::Timeout } else { HttpError::Network(network_message(&e)) })?;
    let mut builder = http::Response::builder().status(status);
    for (name, value) in &headers {
        builder = builder.header(name, value);
    }
    builder.body(bytes.to_vec()).map_err(|e| HttpError::Network(format!("bad response: {e}")))
}

/// A reqwest error as text: the kind and the endpoint, never a body.
fn network_message(error: &reqwest::Error) -> String {
    let kind = if error.is_connect() {
        "connection failed"
    } else if error.is_body() || error.is_decode() {
        "reading the response failed"
    } else {
        "request failed"
    };
    match error.url() {
        Some(url) => format!("{kind} ({}{})", url.origin().ascii_serialization(), url.path()),
        None => kind.to_owned(),
    }
}

fn url_error(setting: &str, e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::NotConfigured(format!("{setting} is not a valid URL: {e}"))
}

impl Provider {
    /// A provider with `settings`, using `http` for every call.
    pub fn new(settings: ProviderSettings, http: reqwest::Client) -> Provider {
        Provider { settings, http, resolved: tokio::sync::OnceCell::new() }
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn settings(&self) -> &ProviderSettings {
        &self.settings
    }

    fn http_fn(
        &self,
    ) -> impl Fn(HttpRequest) -> std::pin::Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send>> {
        let http = self.http.clone();
        let timeout = self.settings.request_timeout;
        move |request| Box::pin(send(http.clone(), timeout, request))
    }

    /// The `oauth2` client, resolving the endpoints through discovery the first time when an
    /// issuer is configured and an endpoint is missing. A failed discovery is retried on the
    /// next call.
    async fn client(&self) -> Result<&OAuthClient, UpstreamError> {
        Ok(&self.resolved().await?.client)
    }

    async fn resolved(&self) -> Result<&Resolved, UpstreamError> {
        self.resolved.get_or_try_init(|| self.build_client()).await
    }

    async fn build_client(&self) -> Result<Resolved, UpstreamError> {
        let s = &self.settings;
        let client_id = s
            .client_id
            .clone()
            .ok_or_else(|| UpstreamError::NotConfigured(format!("provider `{}` has no client_id", s.name)))?;
        let mut token = s.token_endpoint.clone();
        let mut introspection = s.introspection_endpoint.clone();
        let mut revocation = s.revocation_endpoint.clone();
        let complete = token.is_some() && introspection.is_some() && revocation.is_some();
        if let (Some(issuer), false) = (&s.issuer, complete) {
            check_endpoint("issuer", issuer)?;
            let found = self.discover(issuer).await?;
            token = token.or(found.token_endpoint);
            introspection = introspection.or(found.introspection_endpoint);
            revocation = revocation.or(found.revocation_endpoint);
        }
        for (setting, url) in [
            ("token_endpoint", &token),
            ("introspection_endpoint", &introspection),
            ("revocation_endpoint", &revocation),
        ] {
            if let Some(url) = url {
                check_endpoint(setting, url)?;
            }
        }
        let mut client = Client::<
            BasicErrorResponse,
            TokenAnswer,
            BasicTokenIntrospectionResponse,
            StandardRevocableToken,
            BasicRevocationErrorResponse,
        >::new(ClientId::new(client_id))
        .set_auth_type(match s.client_auth {
            ClientAuth::Basic => AuthType::BasicAuth,
            ClientAuth::Post => AuthType::RequestBody,
        })
        .set_token_uri_option(token.map(TokenUrl::new).transpose().map_err(|e| url_error("token_endpoint", e))?)
        .set_introspection_url_option(
            introspection.map(IntrospectionUrl::new).transpose().map_err(|e| url_error("introspection_endpoint", e))?,
        )
        .set_revocation_url_option(
            revocation.clone().map(RevocationUrl::new).transpose().map_err(|e| url_error("revocation_endpoint", e))?,
        );
        if let Some(secret) = &s.client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
        }
        Ok(Resolved { client, revocation })
    }

    async fn discover(&self, issuer: &str) -> Result<Discovery, UpstreamError> {
        let issuer = issuer.trim_end_matches('/');
        let url = format!("{issuer}/.well-known/openid-configuration");
        let result = crate::metrics::observe_upstream(&self.settings.name, "discovery", async {
            let response = self.http.get(&url).timeout(self.settings.request_timeout).send().await.map_err(|e| {
                UpstreamError::from(if e.is_timeout() {
                    HttpError::Timeout
                } else {
                    HttpError::Network(network_message(&e))
                })
            })?;
            let status = response.status();
            if !status.is_success() {
                return Err(UpstreamError::from(HttpError::Status { status: status.as_u16(), retry_after: None }));
            }
            let document: Discovery = response
                .json()
                .await
                .map_err(|_| UpstreamError::Malformed("the discovery document is not valid JSON".into()))?;
            if document.issuer.trim_end_matches('/') != issuer {
                return Err(UpstreamError::Malformed(format!(
                    "the discovery document names issuer {:?}, not {issuer:?}",
                    document.issuer
                )));
            }
            Ok(document)
        })
        .await;
        if let Err(e) = &result {
            tracing::warn!(provider = %self.settings.name, error = %e, "OpenID discovery failed");
        }
        result
    }

    /// One refresh-token grant (no retry).
    pub async fn refresh_once(&self, refresh_token: &SecretString) -> Result<TokenSet, UpstreamError> {
        let client = self.client().await?;
        let token = RefreshToken::new(refresh_token.expose_secret().to_owned());
        let request = client
            .exchange_refresh_token(&token)
            .map_err(|_| UpstreamError::NotConfigured("no token endpoint".into()))?;
        let http = self.http_fn();
        let answer =
            crate::metrics::observe_upstream(&self.settings.name, "refresh", request.request_async(&http)).await;
        let answer = answer.map_err(classify)?;
        Ok(TokenSet {
            access_token: SecretString::from(answer.access_token().secret().to_owned()),
            refresh_token: answer.refresh_token().map(|t| SecretString::from(t.secret().to_owned())),
            id_token: answer.extra_fields().id_token.clone().map(SecretString::from),
            token_type: match answer.token_type() {
                BasicTokenType::Bearer => "Bearer".to_owned(),
                other => other.as_ref().to_owned(),
            },
            expires_in: answer.expires_in().filter(|d| !d.is_zero()),
            scopes: answer.scopes().map(|s| s.iter().map(|s| s.to_string()).collect()),
        })
    }

    /// One RFC 7662 introspection (no retry).
    pub async fn introspect_once(&self, token: &SecretString, hint: &str) -> Result<Introspection, UpstreamError> {
        let client = self.client().await?;
        let token = AccessToken::new(token.expose_secret().to_owned());
        let request = client
            .introspect(&token)
            .map_err(|_| UpstreamError::NotConfigured("no introspection endpoint".into()))?
            .set_token_type_hint(hint.to_owned());
        let http = self.http_fn();
        let answer =
            crate::metrics::observe_upstream(&self.settings.name, "introspection", request.request_async(&http)).await;
        let answer = answer.map_err(classify)?;
        Ok(Introspection {
            active: answer.active(),
            scope: answer
                .scopes()
                .map(|s| s.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            client_id: answer.client_id().map(|c| c.to_string()).unwrap_or_default(),
            username: answer.username().unwrap_or_default().to_owned(),
            token_type: answer.token_type().map(|t| t.as_ref().to_owned()).unwrap_or_default(),
            exp: answer.exp().map(|t| t.timestamp_millis()),
            iat: answer.iat().map(|t| t.timestamp_millis()),
            nbf: answer.nbf().map(|t| t.timestamp_millis()),
            sub: answer.sub().unwrap_or_default().to_owned(),
            aud: answer.aud().cloned().unwrap_or_default(),
            iss: answer.iss().unwrap_or_default().to_owned(),
            jti: answer.jti().unwrap_or_default().to_owned(),
        })
    }

    /// One RFC 7009 revocation (no retry). `refresh` says which kind of token it is.
    ///
    /// Sent by hand rather than through `oauth2`'s `revoke_token`, which refuses any URL that is
    /// not `https` (RFC 7009 §2); our endpoint rule (https, or http on a loopback host only) is
    /// applied to every endpoint when the client is built, so the loopback test provider works
    /// and remote providers still need TLS.
    pub async fn revoke_once(&self, token: &SecretString, refresh: bool) -> Result<(), UpstreamError> {
        let resolved = self.resolved().await?;
        let url = resolved
            .revocation
            .as_deref()
            .ok_or_else(|| UpstreamError::NotConfigured("no revocation endpoint".into()))?;
        let s = &self.settings;
        let mut form: Vec<(&str, &str)> = vec![
            ("token", token.expose_secret()),
            ("token_type_hint", if refresh { "refresh_token" } else { "access_token" }),
        ];
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(url)
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(http::header::ACCEPT, "application/json");
        let client_id = s.client_id.as_deref().unwrap_or_default();
        match (s.client_auth, &s.client_secret) {
            (ClientAuth::Basic, Some(secret)) => {
                // RFC 6749 §2.3.1: form-encode both before Basic, as oauth2 does.
                let encode = |v: &str| oauth2::url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
                let pair = format!("{}:{}", encode(client_id), encode(secret.expose_secret()));
                let value =
                    format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pair));
                let mut value = http::HeaderValue::from_str(&value)
                    .map_err(|_| UpstreamError::NotConfigured("client credentials are not valid header text".into()))?;
                value.set_sensitive(true);
                request = request.header(http::header::AUTHORIZATION, value);
            }
            (_, secret) => {
                form.push(("client_id", client_id));
                if let Some(secret) = secret {
                    form.push(("client_secret", secret.expose_secret()));
                }
            }
        }
        let body = form_body(&form);
        let request = request
            .body(body)
            .map_err(|_| UpstreamError::NotConfigured("the revocation endpoint is not a valid URI".into()))?;
        let response = crate::metrics::observe_upstream(
            &s.name,
            "revocation",
            send(self.http.clone(), s.request_timeout, request),
        )
        .await;
        match response {
            Err(e) => Err(UpstreamError::from(e)),
            Ok(r) if r.status() == http::StatusCode::OK => Ok(()),
            Ok(r) => match serde_json::from_slice::<serde_json::Value>(r.body()) {
                Ok(body) => Err(UpstreamError::Rejected(sanitised_code(body["error"].as_str().unwrap_or_default()))),
                Err(_) => Err(UpstreamError::Malformed(format!(
                    "HTTP status {} without an OAuth2 error",
                    r.status().as_u16()
                ))),
            },
        }
    }
}

fn form_body(pairs: &[(&str, &str)]) -> Vec<u8> {
    oauth2::url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish().into_bytes()
}

/// Endpoints must be `https`, except on a loopback host (tests, a sidecar provider): the client
/// secret and tokens never cross a network in the clear.
fn check_endpoint(setting: &str, url: &str) -> Result<(), UpstreamError> {
    let parsed = oauth2::url::Url::parse(url).map_err(|e| url_error(setting, e))?;
    let loopback = match parsed.host() {
        Some(oauth2::url::Host::Domain(d)) => d == "localhost",
        Some(oauth2::url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(oauth2::url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => {
            Err(UpstreamError::NotConfigured(format!("{setting} must be an https URL (http only on a loopback host)")))
        }
    }
}

/// The configured providers by name.
#[derive(Debug, Default)]
pub struct Providers {
    by_name: BTreeMap<String, Arc<Provider>>,
}

pub use crate::session::DEFAULT_PROVIDER;

impl Providers {
    /// The providers of `settings` over one HTTP client.
    pub fn new(settings: Vec<ProviderSettings>, http: reqwest::Client) -> Providers {
        let by_name =
            settings.into_iter().map(|s| (s.name.clone(), Arc::new(Provider::new(s, http.clone())))).collect();
        Providers { by_name }
    }

    /// The provider a session names (an empty name is the default provider).
    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.by_name.get(if name.is_empty() { DEFAULT_PROVIDER } else { name })
    }

    /// Whether `name` is a provider a session may record (empty means the default, always allowed).
    pub fn accepts(&self, name: &str) -> bool {
        name.is_empty() || self.by_name.contains_key(name)
    }

    /// The configured names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}
