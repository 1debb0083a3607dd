//! Benchmark seeding, behind the `bench-seed` feature (on by default; the Docker image builds
//! without it): `serve --seed-sessions` stores sessions through a running app's manager (memory
//! storage), `session-authority seed` writes them offline into an embedded data directory. Both
//! write the tokens to a file, which therefore holds bearer secrets. Seeding skips the create rate
//! limit, the per-user cap, the security log and the metrics: it is not a way to create sessions.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};

use crate::config::{Config, Flags};
use crate::error::Result;
use crate::session::{NewSession, SessionManager};
use crate::store::embedded::EmbeddedStore;

/// Stores one new session directly (no rate limit, no cap, no log) and returns its token.
async fn seed_one(sessions: &SessionManager, new: NewSession) -> Result<SecretString> {
    let (record, token) = sessions.prepare(new);
    let eviction = sessions.eviction(record.created_at);
    sessions.store().create(record, u32::MAX, eviction).await?;
    Ok(token)
}

/// Stores `count` sessions through the running app's manager and writes their tokens to `out`.
pub async fn seed_in_process(sessions: &SessionManager, count: usize, out: &std::path::Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let rss = || crate::metrics::rss_bytes(std::process::id());
    let rss_before = rss();
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    let run = std::process::id();
    // One worker per core takes chunks of indexes; the tokens file is in no particular order.
    const CHUNK: usize = 10_000;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<String>>(4);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    for _ in 0..workers {
        let (sessions, next, tx) = (sessions.clone(), next.clone(), tx.clone());
        tokio::spawn(async move {
            loop {
                let start = next.fetch_add(CHUNK, std::sync::atomic::Ordering::Relaxed);
                if start >= count {
                    return;
                }
                let mut lines = String::with_capacity(CHUNK * 48);
                for n in start..(start + CHUNK).min(count) {
                    let seeded = seed_one(
                        &sessions,
                        NewSession {
                            user_id: format!("seed-{run}-{n}"),
                            access_token: SecretString::from("bench-access-token".to_string()),
                            refresh_token: Some(SecretString::from("bench-refresh-token".to_string())),
                            expires_in: Some(Duration::from_secs(3600)),
                            ip_address: Some(std::net::IpAddr::from([203, 0, 113, 9])),
                            user_agent: Some("loadgen".into()),
                            ..Default::default()
                        },
                    )
                    .await;
                    match seeded {
                        Ok(token) => {
                            lines.push_str(token.expose_secret());
                            lines.push('\n');
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                }
                if tx.send(Ok(lines)).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    while let Some(lines) = rx.recv().await {
        file.write_all(lines?.as_bytes())?;
    }
    file.flush()?;
    let rss_after = rss();
    let bytes_per_session = rss_before.zip(rss_after).map(|(b, a)| a.saturating_sub(b) / count.max(1) as u64);
    tracing::info!(
        sessions = count,
        seconds = started.elapsed().as_secs_f64(),
        rss_before,
        rss_after,
        bytes_per_session,
        "seeded sessions in process"
    );
    Ok(())
}

/// Offline: writes `count` sessions straight into the embedded store of `data_dir` (the server
/// must not be running) and their tokens to `tokens_out`.
pub fn seed_embedded(data_dir: String, count: usize, tokens_out: std::path::PathBuf) -> anyhow::Result<()> {
    // Key generation warns through the log.
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).try_init();
    let flags: Flags =
        [("data_dir".to_string(), data_dir.clone()), ("storage".to_string(), "embedded".to_string())].into();
    let config = Config::load(&flags, &|name| std::env::var(name).ok())?;
    let secrets = crate::bootstrap::prepare(&config)?;
    let store = Arc::new(EmbeddedStore::open(std::path::Path::new(&data_dir))?);
    let manager = SessionManager::new(
        store.clone(),
        secrets.key_ring.clone(),
        Arc::new(crate::clock::SystemClock),
        config.session.clone(),
    );
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tokens_out)?);
    let run = std::process::id();
    let mut written = 0;
    while written < count {
        let batch = (count - written).min(10_000);
        let mut records = Vec::with_capacity(batch);
        for n in written..written + batch {
            let (record, token) = manager.prepare(NewSession {
                user_id: format!("seed-{run}-{n}"),
                access_token: SecretString::from("bench-access-token".to_string()),
                refresh_token: Some(SecretString::from("bench-refresh-token".to_string())),
                expires_in: Some(std::time::Duration::from_secs(3600)),
                ..Default::default()
            });
            writeln!(out, "{}", token.expose_secret())?;
            records.push(record);
        }
        store.insert_batch(&records)?;
        written += batch;
    }
    out.flush()?;
    eprintln!("seeded {written} sessions into {data_dir}; tokens in {}", tokens_out.display());
    Ok(())
}
