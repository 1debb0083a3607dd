//! Validation of every request field, in one place, with explicit limits.
//!
//! Adapters call these before anything touches storage, so a rejected request changes nothing.
//! Each failure is `INVALID_ARGUMENT` naming the field as the proto spells it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::grpc::pb;

pub use crate::limits::{MAX_ID_BYTES, MAX_METADATA_BYTES, MAX_METADATA_ENTRIES, MAX_TEXT_BYTES};

/// Longest session token (ours are 47 characters).
pub const MAX_SESSION_TOKEN_BYTES: usize = 128;
/// Longest upstream token (JWTs with many claims can be large).
pub const MAX_UPSTREAM_TOKEN_BYTES: usize = 16 * 1024;
/// Most entries in a list field (scopes, fonts, plugins, filters).
pub const MAX_LIST_ENTRIES: usize = 256;
/// Largest page size any list RPC accepts.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Longest duration any field accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

fn check_text(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Error::invalid(field, format!("{} bytes; at most {max} allowed", value.len())));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(Error::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// A required identifier: non-empty, at most [`MAX_ID_BYTES`], no control characters.
pub fn required_id(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    check_text(field, value, MAX_ID_BYTES)
}

/// An optional identifier: empty, or as [`required_id`].
pub fn optional_id(field: &str, value: &str) -> Result<()> {
    if value.is_empty() { Ok(()) } else { required_id(field, value) }
}

/// A session token as presented by an end user's client.
pub fn session_token(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    if value.len() > MAX_SESSION_TOKEN_BYTES || !value.is_ascii() {
        return Err(Error::invalid(field, "is not a session token"));
    }
    Ok(())
}

/// An upstream token (access, refresh, id); `required` says whether it may be empty.
pub fn upstream_token(field: &str, value: &str, required: bool) -> Result<()> {
    if value.is_empty() {
        return if required { Err(Error::invalid(field, "required")) } else { Ok(()) };
    }
    if value.len() > MAX_UPSTREAM_TOKEN_BYTES {
        return Err(Error::invalid(field, format!("longer than {MAX_UPSTREAM_TOKEN_BYTES} bytes")));
    }
    if value.chars().any(|c| c.is_control() || c == ' ') {
        return Err(Error::invalid(field, "contains spaces or control characters"));
    }
    Ok(())
}

/// Free text such as a reason or details.
pub fn text(field: &str, value: &str) -> Result<()> {
    check_text(field, value, MAX_TEXT_BYTES)
}

/// An IP address, or empty.
pub fn ip_address(field: &str, value: &str) -> Result<Option<IpAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse::<IpAddr>().map(Some).map_err(|_| Error::invalid(field, "is not an IPv4 or IPv6 address"))
}

/// A metadata map within the entry and byte limits.
pub fn metadata(field: &str, map: &HashMap<String, String>) -> Result<()> {
    if map.len() > MAX_METADATA_ENTRIES {
        return Err(Error::invalid(field, format!("{} entries; at most {MAX_METADATA_ENTRIES}", map.len())));
    }
    let mut total = 0;
    for (key, value) in map {
        if key.is_empty() {
            return Err(Error::invalid(field, "has an empty key"));
        }
        let path = format!("{field}[{}]", shown(key));
        check_text(&path, key, MAX_ID_BYTES)?;
        check_text(&path, value, MAX_TEXT_BYTES)?;
        total += key.len() + value.len();
    }
    if total > MAX_METADATA_BYTES {
        return Err(Error::invalid(field, format!("{total} bytes; at most {MAX_METADATA_BYTES}")));
    }
    Ok(())
}

/// A caller's value as it may appear in an error: at most 32 characters, control characters
/// escaped. Errors travel in HTTP/2 headers, so echoing unbounded input would turn a precise
/// INVALID_ARGUMENT into a protocol error (found by the property test).
fn shown(value: &str) -> String {
    let mut shown: String = value.chars().take(32).flat_map(char::escape_default).collect();
    if value.chars().count() > 32 {
        shown.push('…');
    }
    shown
}

/// A list of short strings.
pub fn string_list(field: &str, values: &[String]) -> Result<()> {
    if values.len() > MAX_LIST_ENTRIES {
        return Err(Error::invalid(field, format!("{} entries; at most {MAX_LIST_ENTRIES}", values.len())));
    }
    for value in values {
        check_text(field, value, MAX_ID_BYTES)?;
    }
    Ok(())
}

/// A duration that must be greater than zero when set.
pub fn positive_duration(field: &str, value: Option<&prost_types::Duration>) -> Result<Option<Duration>> {
    match duration(field, value)? {
        Some(d) if d.is_zero() => Err(Error::invalid(field, "must be greater than zero when set")),
        other => Ok(other),
    }
}

/// An optional non-negative, bounded duration; `None` when unset.
pub fn duration(field: &str, value: Option<&prost_types::Duration>) -> Result<Option<Duration>> {
    let Some(value) = value else { return Ok(None) };
    if value.seconds < 0 || value.nanos < 0 || value.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "must be a non-negative duration"));
    }
    let parsed = Duration::new(value.seconds as u64, value.nanos as u32);
    if parsed > MAX_DURATION {
        return Err(Error::invalid(field, "longer than 366 days"));
    }
    Ok(Some(parsed))
}

/// A page size: 0 means `default`; above `max` is an error.
pub fn page_size(field: &str, value: u32, default: u32, max: u32) -> Result<u32> {
    match value {
        0 => Ok(default),
        v if v > max => Err(Error::invalid(field, format!("{v}; at most {max}"))),
        v => Ok(v),
    }
}

/// A device fingerprint within limits.
pub fn fingerprint(field: &str, fp: &pb::DeviceFingerprint) -> Result<()> {
    for (name, value) in [
        ("user_agent", &fp.user_agent),
        ("accept_language", &fp.accept_language),
        ("platform", &fp.platform),
        ("timezone", &fp.timezone),
        ("screen_resolution", &fp.screen_resolution),
        ("canvas_fingerprint", &fp.canvas_fingerprint),
        ("webgl_fingerprint", &fp.webgl_fingerprint),
        ("audio_fingerprint", &fp.audio_fingerprint),
    ] {
        check_text(&format!("{field}.{name}"), value, MAX_TEXT_BYTES)?;
    }
    if let Some(ratio) = fp.pixel_ratio
        && !(ratio.is_finite() && ratio > 0.0 && ratio <= 64.0)
    {
        return Err(Error::invalid(format!("{field}.pixel_ratio"), "must be a finite number in (0, 64]"));
    }
    string_list(&format!("{field}.fonts"), &fp.fonts)?;
    string_list(&format!("{field}.plugins"), &fp.plugins)?;
    metadata(&format!("{field}.extras"), &fp.extras)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(required_id("user_id", "").is_err());
        assert!(required_id("user_id", &"u".repeat(MAX_ID_BYTES + 1)).is_err());
        assert!(required_id("user_id", "a\u{0}b").is_err());
        assert!(required_id("user_id", "alice@example.com").is_ok());
        let e = required_id("user_id", "").unwrap_err().to_string();
        assert!(e.contains("user_id"), "{e}");
    }

    #[test]
    fn durations_and_pages() {
        assert_eq!(duration("d", None).unwrap(), None);
        assert!(duration("d", Some(&prost_types::Duration { seconds: -1, nanos: 0 })).is_err());
        assert!(duration("d", Some(&prost_types::Duration { seconds: 1, nanos: -5 })).is_err());
        assert_eq!(
            duration("d", Some(&prost_types::Duration { seconds: 90, nanos: 0 })).unwrap(),
            Some(Duration::from_secs(90))
        );
        assert_eq!(page_size("page_size", 0, 50, 500).unwrap(), 50);
        assert!(page_size("page_size", 501, 50, 500).is_err());
    }

    #[test]
    fn errors_never_echo_long_or_control_input() {
        let key = format!("{}\u{1}", "k".repeat(5000));
        let map = HashMap::from([(key, String::new())]);
        let e = metadata("metadata", &map).unwrap_err().to_string();
        assert!(e.len() < 400, "{} bytes: {e}", e.len());
        assert!(!e.contains('\u{1}'));
    }

    #[test]
    fn fingerprints_and_maps() {
        let fp = pb::DeviceFingerprint { pixel_ratio: Some(f64::NAN), ..Default::default() };
        assert!(fingerprint("device_fingerprint", &fp).is_err());
        let big: HashMap<String, String> = (0..65).map(|i| (i.to_string(), String::new())).collect();
        assert!(metadata("metadata", &big).is_err());
        assert!(ip_address("ip_address", "10.0.0.300").is_err());
        assert!(ip_address("ip_address", "2001:db8::1").unwrap().is_some());
    }
}
