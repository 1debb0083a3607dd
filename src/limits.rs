//! Size limits of what callers may store, shared by request validation and the domain (a
//! metadata merge must not grow past what a single request may carry).

use std::collections::BTreeMap;

/// Longest user id, session id, rule name or key.
pub const MAX_ID_BYTES: usize = 256;
/// Longest free-text field (reasons, details, user agents, fingerprint strings).
pub const MAX_TEXT_BYTES: usize = 2048;
/// Most entries in a metadata map.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Most bytes in a metadata map, keys and values together.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Whether a metadata map exceeds the entry or byte limit.
pub fn metadata_too_large(map: &BTreeMap<String, String>) -> bool {
    map.len() > MAX_METADATA_ENTRIES || map.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() > MAX_METADATA_BYTES
}
