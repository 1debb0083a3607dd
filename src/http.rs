//! What the two HTTP clients (OAuth2 providers, the kv-rest store) read from an answer the same
//! way.

use std::time::{Duration, SystemTime};

/// The `Retry-After` of an answer (RFC 9110 §10.2.3): delay-seconds, or an HTTP-date turned into
/// the time from `now` (zero when it has passed). `None` when absent or unreadable.
pub fn retry_after(headers: &reqwest::header::HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Dec 2026 12:00:00 GMT").unwrap();
        assert_eq!(retry_after(&with("120"), now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(&with(" 7 "), now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(&with("Sun, 06 Dec 2026 12:00:30 GMT"), now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after(&with("Sun, 06 Dec 2026 11:59:00 GMT"), now), Some(Duration::ZERO));
        assert_eq!(retry_after(&with("soon"), now), None);
        assert_eq!(retry_after(&with("-5"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}
