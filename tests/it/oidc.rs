//! Test support: the real OpenID Connect provider of `tests/peers/oidc` (npm `oidc-provider`)
//! started as a Node process on a free loopback port, with its test endpoints (real tokens
//! through an authorization-code flow, failure injection, request counters). Killed on drop.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// A running provider.
pub struct Oidc {
    child: Child,
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    http: reqwest::Client,
    logs: Arc<Mutex<Vec<String>>>,
}

/// Real tokens from the provider's authorization-code flow.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: String,
    pub id_token: String,
    pub expires_in: i64,
    pub scope: String,
}

impl Oidc {
    /// Starts the provider with access (and id) tokens living `access_ttl` seconds.
    pub fn start(access_ttl: u64) -> Oidc {
        Oidc::start_with(access_ttl, &[])
    }

    /// [`Oidc::start`] with more of `provider.mjs`'s options (see its README).
    pub fn start_with(access_ttl: u64, options: &[&str]) -> Oidc {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/oidc");
        let mut child = Command::new("node")
            .arg("provider.mjs")
            .args(["--port", "0", "--access-ttl", &access_ttl.to_string()])
            .args(options)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node tests/peers/oidc/provider.mjs (run `npm ci` there)");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("ready line");
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("provider did not start: {line:?}\n{}", logs.lock().unwrap().join("\n")));
        Oidc {
            child,
            issuer: ready["issuer"].as_str().unwrap().to_owned(),
            client_id: ready["client_id"].as_str().unwrap().to_owned(),
            client_secret: ready["client_secret"].as_str().unwrap().to_owned(),
            http: session_authority::token::provider::http_client().unwrap(),
            logs,
        }
    }

    /// Real tokens for `user`.
    pub async fn tokens(&self, user: &str) -> Tokens {
        let v: Value = self
            .http
            .get(format!("{}/__test/tokens?user={user}", self.issuer))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Tokens {
            access_token: v["access_token"].as_str().expect("access_token").to_owned(),
            refresh_token: v["refresh_token"].as_str().expect("refresh_token").to_owned(),
            id_token: v["id_token"].as_str().expect("id_token").to_owned(),
            expires_in: v["expires_in"].as_i64().unwrap(),
            scope: v["scope"].as_str().unwrap_or_default().to_owned(),
        }
    }

    /// Arms failure injection for the next `count` refresh_token requests.
    pub async fn fail(&self, mode: &str, count: u32) {
        let body = json!({"mode": mode, "count": count, "grant_type": "refresh_token"});
        let r = self.http.post(format!("{}/__test/fail", self.issuer)).json(&body).send().await.unwrap();
        assert!(r.status().is_success());
    }

    /// Arms failure injection with the peer's full options (`POST /__test/fail`).
    pub async fn fail_with(&self, body: Value) {
        let r = self.http.post(format!("{}/__test/fail", self.issuer)).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }

    /// Arms the one-shot refresh hook (`POST /__test/refresh_hook`, see the peer's README).
    pub async fn refresh_hook(&self, body: Value) {
        let r = self.http.post(format!("{}/__test/refresh_hook", self.issuer)).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }

    /// Arms faults of the revocation endpoint (`POST /__test/revocation_fail`, see the README).
    pub async fn revocation_fail(&self, body: Value) {
        let r = self.http.post(format!("{}/__test/revocation_fail", self.issuer)).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }

    /// Whether the provider still takes `token` as active (RFC 7662, asked directly).
    pub async fn is_active(&self, token: &str) -> bool {
        self.introspect(token).await["active"].as_bool().expect("introspection answer")
    }

    pub async fn stats(&self) -> Value {
        self.http.get(format!("{}/__test/stats", self.issuer)).send().await.unwrap().json().await.unwrap()
    }

    /// Refresh-token requests that reached the provider (injected failures included).
    pub async fn refresh_requests(&self) -> i64 {
        self.stats().await["token"]["by_grant_type"]["refresh_token"].as_i64().unwrap_or(0)
    }

    pub async fn reset(&self) {
        self.http.post(format!("{}/__test/reset", self.issuer)).send().await.unwrap();
    }

    /// Presents `refresh_token` at the token endpoint directly; returns (status, body).
    pub async fn redeem(&self, refresh_token: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/token", self.issuer))
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", refresh_token)])
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Introspects directly at the provider.
    pub async fn introspect(&self, token: &str) -> Value {
        self.http
            .post(format!("{}/token/introspection", self.issuer))
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for Oidc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- oidc provider log ---\n{}", self.logs());
        }
    }
}
