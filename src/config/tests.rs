use super::*;

fn load(flags: &[(&str, &str)], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let flags: Flags = flags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Config::load(&flags, &|name| env.get(name).cloned())
}

#[test]
fn defaults_are_the_guides() {
    let c = load(&[], &[]).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:50051");
    assert_eq!(c.storage.kind, StorageKind::Embedded);
    assert_eq!(c.storage.data_dir, PathBuf::from("./data"));
    assert_eq!(c.storage.key_prefix, "atoms:session:");
    assert_eq!(c.storage.embedded_cache_bytes, 1024 * 1024 * 1024);
    assert_eq!(c.session.idle_timeout, Duration::from_secs(30 * 60));
    assert_eq!(c.session.absolute_timeout, Duration::from_secs(480 * 60));
    assert_eq!(c.session.max_sessions_per_user, 5);
    assert!(c.session.device_validation);
    assert_eq!(c.session.device_match_threshold, 0.8);
    assert!(c.session.device_fingerprint_required);
    assert_eq!(c.session.cleanup_interval, Duration::from_secs(15 * 60));
    assert_eq!(c.token.proactive_refresh, Duration::from_secs(300));
    assert_eq!(c.token.grace_period, Duration::from_secs(300));
    assert_eq!(c.token.retry.max_retries, 3);
    assert_eq!(c.token.retry.initial_delay, Duration::from_secs(1));
    assert_eq!(c.token.retry.max_delay, Duration::from_secs(30));
    assert_eq!(c.revocation.list_ttl, Duration::from_secs(24 * 3600));
    assert!(c.revocation.cascade);
    assert_eq!(c.revocation.watch_buffer, 4096);
    assert_eq!(c.revocation.max_watchers, 20_000);
    assert_eq!(c.server.concurrency_limit, 1024);
    assert_eq!(c.server.max_health_watch_streams, 4096);
    assert_eq!(c.server.max_reflection_streams, 256);
    assert_eq!(c.security.hijack.threshold, 0.7);
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(c.metrics_listen.is_none());
}

#[test]
fn flags_beat_environment_which_beats_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:1\"\n[session]\nidle_timeout = \"10m\"\nmax_sessions_per_user = 9\n")
        .unwrap();
    let path = path.to_str().unwrap();
    let c = load(
        &[("config", path), ("listen", "127.0.0.1:3")],
        &[("SESSION_AUTHORITY_LISTEN", "127.0.0.1:2"), ("SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT", "20m")],
    )
    .unwrap();
    assert_eq!(c.server.listen.port(), 3);
    assert_eq!(c.session.idle_timeout, Duration::from_secs(20 * 60));
    assert_eq!(c.session.max_sessions_per_user, 9);
}

#[test]
fn guide_environment_names_work() {
    let c = load(
        &[("storage", "redis"), ("token.token_endpoint", "https://idp.example/token")],
        &[("REDIS_URL", "redis://127.0.0.1:6379"), ("OPENROUTER_CLIENT_ID", "cid"), ("KV_REST_API_URL", "https://kv")],
    )
    .unwrap();
    assert_eq!(c.storage.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
    assert_eq!(c.providers.len(), 1, "{:?}", c.providers);
    assert_eq!(c.providers[0].client_id.as_deref(), Some("cid"));
    assert_eq!(c.storage.kv_rest_url.as_deref(), Some("https://kv"));
}

#[test]
fn errors_name_the_setting() {
    let e = load(&[("storage", "mongo")], &[]).unwrap_err().to_string();
    assert!(e.contains("`storage`") && e.contains("mongo"), "{e}");
    let e = load(&[], &[("SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT", "soon")]).unwrap_err().to_string();
    assert!(e.contains("session.idle_timeout") && e.contains("SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT"), "{e}");
    let e = load(&[("storage", "redis")], &[]).unwrap_err().to_string();
    assert!(e.contains("REDIS_URL"), "{e}");
    let e = load(&[], &[("SESSION_AUTHORITY_TLS_CERT", "/nonexistent/cert.pem"), ("SESSION_AUTHORITY_TLS_KEY", "/x")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("tls.cert") && e.contains("/nonexistent/cert.pem"), "{e}");
    let e = load(&[], &[("SESSION_AUTHORITY_SESSION_DEVICE_MATCH_THRESHOLD", "1.5")]).unwrap_err().to_string();
    assert!(e.contains("device_match_threshold"), "{e}");
    let e = load(&[], &[("SESSION_AUTHORITY_REVOCATION_MAX_WATCHERS", "0")]).unwrap_err().to_string();
    assert!(e.contains("revocation.max_watchers"), "{e}");
    let c = load(&[], &[("SESSION_AUTHORITY_REVOCATION_MAX_WATCHERS", "3")]).unwrap();
    assert_eq!(c.revocation.max_watchers, 3);
    let e = load(&[], &[("SESSION_AUTHORITY_SERVER_MAX_HEALTH_WATCH_STREAMS", "0")]).unwrap_err().to_string();
    assert!(e.contains("server.max_health_watch_streams"), "{e}");
    let e = load(&[], &[("SESSION_AUTHORITY_SERVER_MAX_HEALTH_WATCH_STREAMS", "many")]).unwrap_err().to_string();
    assert!(e.contains("server.max_health_watch_streams"), "{e}");
    let c = load(&[], &[("SESSION_AUTHORITY_SERVER_MAX_HEALTH_WATCH_STREAMS", "2")]).unwrap();
    assert_eq!(c.server.max_health_watch_streams, 2);
    for bad in ["0", "some"] {
        let e = load(&[], &[("SESSION_AUTHORITY_SERVER_MAX_REFLECTION_STREAMS", bad)]).unwrap_err().to_string();
        assert!(e.contains("server.max_reflection_streams"), "{e}");
    }
    let c = load(&[], &[("SESSION_AUTHORITY_SERVER_MAX_REFLECTION_STREAMS", "3")]).unwrap();
    assert_eq!(c.server.max_reflection_streams, 3);
    for bad in ["0", "-1", "lots", "18446744073709551615"] {
        let e = load(&[], &[("SESSION_AUTHORITY_EMBEDDED_CACHE_MB", bad)]).unwrap_err().to_string();
        assert!(e.contains("embedded.cache_mb"), "{bad}: {e}");
    }
    let c = load(&[], &[("SESSION_AUTHORITY_EMBEDDED_CACHE_MB", "64")]).unwrap();
    assert_eq!(c.storage.embedded_cache_bytes, 64 * 1024 * 1024);
}

#[test]
fn unknown_file_keys_and_bad_api_keys_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[session]\nidle_timout = \"10m\"\n").unwrap();
    let e = load(&[("config", path.to_str().unwrap())], &[]).unwrap_err().to_string();
    assert!(e.contains("session.idle_timout"), "{e}");

    std::fs::write(&path, "[token]\nrotation = false\n").unwrap();
    let e = load(&[("config", path.to_str().unwrap())], &[]).unwrap_err().to_string();
    assert!(e.contains("`token.rotation`") && e.contains("removed"), "{e}");

    std::fs::write(&path, "[[api_keys]]\nname = \"x\"\nrole = \"root\"\nhash = \"sha256:00\"\n").unwrap();
    let e = load(&[("config", path.to_str().unwrap())], &[]).unwrap_err().to_string();
    assert!(e.contains("api_keys[0].role"), "{e}");

    let e = load(&[], &[("SESSION_AUTHORITY_API_KEYS", "admin")]).unwrap_err().to_string();
    assert!(e.contains("SESSION_AUTHORITY_API_KEYS"), "{e}");
}

#[test]
fn rate_limit_rules_have_defaults_overrides_and_new_names() {
    let c = load(&[], &[]).unwrap();
    let rules = &c.security.rules;
    assert_eq!(rules["token_refresh"].limit, 10);
    assert_eq!(rules["token_refresh"].period, Duration::from_secs(60));
    assert_eq!(rules["session_create"].limit, 5);
    assert_eq!(rules["session_create"].period, Duration::from_secs(300));
    assert_eq!(rules["session_create"].backoff.as_ref().unwrap().max, Duration::from_secs(3600));
    assert_eq!(rules["login_attempt"].backoff.as_ref().unwrap().max, Duration::from_secs(1800));
    assert_eq!(rules["validate_failure"].burst, 30);
    assert_eq!(c.storage.max_limiter_keys, 100_000);
    assert!(rules.values().all(|r| r.backoff.as_ref().is_some_and(|b| b.multiplier == 2.0)));
    assert_eq!(c.security.hijack.ip_new_network, 0.3);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[security.rules.session_create]\nlimit = 2\n[security.rules.api_call]\nlimit = 100\nperiod = \"1m\"\nburst = 20\nbackoff = false\n[security.hijack]\nip_new_network = 0.4\n",
    )
    .unwrap();
    let c = load(&[("config", path.to_str().unwrap())], &[("SESSION_AUTHORITY_SECURITY_RULES_API_CALL_LIMIT", "50")])
        .unwrap();
    let rules = &c.security.rules;
    assert_eq!(rules["session_create"].limit, 2);
    assert_eq!(rules["session_create"].burst, 2);
    assert_eq!(rules["session_create"].period, Duration::from_secs(300));
    assert_eq!(rules["api_call"].limit, 50);
    assert_eq!(rules["api_call"].burst, 20);
    assert!(rules["api_call"].backoff.is_none());
    assert_eq!(c.security.hijack.ip_new_network, 0.4);
}

#[test]
fn rule_errors_name_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let path_str = path.to_str().unwrap();
    for (text, expected) in [
        ("[security.rules.x]\nlimt = 3\n", "security.rules.x.limt"),
        ("[security.rules.x]\nlimit = 3\n", "security.rules.x.period"),
        ("[security.rules.session_create]\nlimit = 0\n", "security.rules.session_create.limit"),
        ("[security.rules.session_create]\nperiod = \"soon\"\n", "security.rules.session_create.period"),
        ("[security.rules.y]\nlimit = 1\nperiod = \"1s\"\nbackoff_multiplier = 0.5\n", "backoff_multiplier"),
        ("[security.hijack]\nuser_agent = 2\n", "security.hijack.user_agent"),
        ("[security.hijack]\nuser_agnt = 0.1\n", "security.hijack.user_agnt"),
        ("[security]\nmax_limiter_keys = 0\n", "security.max_limiter_keys"),
        ("[security]\nmax_limiter_keys = \"many\"\n", "security.max_limiter_keys"),
    ] {
        std::fs::write(&path, text).unwrap();
        let e = load(&[("config", path_str)], &[]).unwrap_err().to_string();
        assert!(e.contains(expected), "{text}: {e}");
    }
}

#[test]
fn hashed_and_plaintext_keys_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let hash = format!("sha256:{}", "ab".repeat(32));
    std::fs::write(&path, format!("[[api_keys]]\nname = \"ops\"\nrole = \"admin\"\nhash = \"{hash}\"\n")).unwrap();
    let c = load(
        &[("config", path.to_str().unwrap())],
        &[("SESSION_AUTHORITY_API_KEYS", "service:0123456789abcdef0123,watcher:fedcba9876543210fedc")],
    )
    .unwrap();
    assert_eq!(c.auth.api_keys.len(), 1);
    assert_eq!(c.auth.api_keys[0].role, Role::Admin);
    assert_eq!(c.auth.api_keys[0].sha256, [0xab; 32]);
    assert_eq!(c.auth.plaintext_api_keys.len(), 2);
    assert_eq!(c.auth.plaintext_api_keys[1].0, Role::Watcher);
}

#[test]
fn the_configurations_defaults_are_the_domains() {
    let c = load(&[], &[]).unwrap();
    let session = crate::session::SessionSettings::default();
    assert_eq!(c.session.idle_timeout, session.idle_timeout);
    assert_eq!(c.session.tombstone_ttl, session.tombstone_ttl);
    assert_eq!(c.session.cleanup_interval, session.cleanup_interval);
    assert_eq!(c.revocation.list_ttl, c.session.tombstone_ttl);
    assert_eq!(c.revocation.cleanup_interval, Duration::from_secs(3600));
    assert_eq!(c.token.proactive_refresh, c.session.proactive_refresh);
    assert_eq!(c.token.wait_timeout, crate::token::TokenSettings::default().wait_timeout);
    assert_eq!(c.security.rules, crate::security::default_rules());
    assert_eq!(c.security.hijack, crate::security::hijack::HijackRules::default());
    assert_eq!(c.security.event_retention, crate::security::SecuritySettings::default().event_retention);
    assert!(c.providers.is_empty());
}

#[test]
fn a_setting_read_only_in_some_cases_is_still_known() {
    // `tls.client_cert_role` matters only with a certificate, and a new rule's `burst` only
    // with its rule; neither is an unknown key in a file that leaves the rest out.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[tls]\nclient_cert_role = \"admin\"\n[token]\nlease_ttl = \"20s\"\n").unwrap();
    let c = load(&[("config", path.to_str().unwrap())], &[]).unwrap();
    assert!(c.server.tls.is_none());
    assert_eq!(c.token.lease_ttl, Duration::from_secs(20));
    assert_eq!(c.token.wait_timeout, Duration::from_secs(80));
    std::fs::write(&path, "[security.rules.api]\nlimit = 4\nperiod = \"1s\"\nmax_backoff = \"5s\"\n").unwrap();
    let c = load(&[("config", path.to_str().unwrap())], &[]).unwrap();
    let api = &c.security.rules["api"];
    assert_eq!((api.limit, api.burst, api.backoff.as_ref().unwrap().max), (4, 4, Duration::from_secs(5)));
    std::fs::write(
        &path,
        "[token.providers.acme]\nclient_id = \"c\"\ntoken_endpoint = \"https://a/t\"\nscope = \"x\"\n",
    )
    .unwrap();
    let e = load(&[("config", path.to_str().unwrap())], &[]).unwrap_err().to_string();
    assert!(e.contains("`token.providers.acme.scope`") && e.contains("not a known setting"), "{e}");
}

#[test]
fn the_redis_record_format_defaults_to_json_and_names_its_values_when_wrong() {
    assert_eq!(load(&[], &[]).unwrap().storage.record_format, RecordFormat::Json);
    let c = load(&[], &[("SESSION_AUTHORITY_REDIS_RECORD_FORMAT", "binary")]).unwrap();
    assert_eq!(c.storage.record_format, RecordFormat::Binary);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[redis]\nrecord_format = \"binary\"\n").unwrap();
    let c = load(&[("config", path.to_str().unwrap())], &[]).unwrap();
    assert_eq!(c.storage.record_format, RecordFormat::Binary);
    for bad in ["protobuf", "", "JSONB"] {
        let e = load(&[], &[("SESSION_AUTHORITY_REDIS_RECORD_FORMAT", bad)]).unwrap_err().to_string();
        assert!(e.contains("redis.record_format") && e.contains("json or binary"), "{bad:?}: {e}");
    }
}

/// An environment variable with our prefix that no setting reads is named (it cannot be an
/// error: the environment is shared), with the nearest setting's variable when one is near; the
/// variables settings read, the non-setting ones and other programs' are not.
#[test]
fn environment_variables_no_setting_reads_are_named_with_the_nearest_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[security.rules.api_call]\nlimit = 10\nperiod = \"1m\"\n").unwrap();
    let c = load(&[("config", path.to_str().unwrap())], &[]).unwrap();
    let names = [
        "SESSION_AUTHORITY_SESSION_IDLE_TIMOUT",
        "SESSION_AUTHORITY_SECURITY_RULES_MINE_LIMIT",
        "SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT",
        "SESSION_AUTHORITY_SECURITY_RULES_API_CALL_BURST",
        "SESSION_AUTHORITY_SECURITY_RULES_TOKEN_REFRESH_LIMIT",
        "SESSION_AUTHORITY_REDIS_RECORD_FORMAT",
        "SESSION_AUTHORITY_API_KEYS",
        "SESSION_AUTHORITY_ENCRYPTION_KEY",
        "SESSION_AUTHORITY_CONFIG",
        "SESSION_AUTHORITY_KEY",
        "SESSION_AUTHORITY_CLOCK_OFFSET",
        "REDIS_URL",
        "PATH",
        "SESSION_AUTHORITY_SESSION_IDLE_TIMOUT",
    ];
    let unread = c.unread_env_vars(names);
    assert_eq!(
        unread,
        vec![
            ("SESSION_AUTHORITY_SECURITY_RULES_MINE_LIMIT".to_string(), None),
            (
                "SESSION_AUTHORITY_SESSION_IDLE_TIMOUT".to_string(),
                Some("SESSION_AUTHORITY_SESSION_IDLE_TIMEOUT".to_string())
            ),
        ]
    );
    // Without the file, the rule it declared is no setting either.
    let bare = load(&[], &[]).unwrap();
    let unread = bare.unread_env_vars(["SESSION_AUTHORITY_SECURITY_RULES_API_CALL_BURST"]);
    assert_eq!(unread.len(), 1, "{unread:?}");
}
