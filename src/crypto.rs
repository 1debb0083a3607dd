//! Secrets: session tokens, their hashes, API-key digests, and encryption at rest.
//!
//! Session tokens are 256 bits from the operating system's CSPRNG and are only ever stored as
//! their SHA-256 digest; looking a session up by that digest means the secret itself is never
//! compared byte by byte. Upstream tokens are sealed with XChaCha20-Poly1305 (192-bit random
//! nonces) under a key ring: each ciphertext carries the id of the key that sealed it, so keys can
//! be rotated while old ciphertexts stay readable, and the key id, session id and field (access,
//! refresh or ID token) are bound in as associated data, so a ciphertext cannot be moved to
//! another session or field or relabelled. Format 1 (ChaCha20-Poly1305, session id only as
//! associated data) is still opened; it is never written.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, XChaCha20Poly1305, XNonce};
use rand::TryRngCore as _;
use rand::rngs::OsRng;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// Prefix of session tokens, so secret scanners can recognise a leaked one.
pub const SESSION_TOKEN_PREFIX: &str = "sat_";
/// Prefix of generated API keys.
pub const API_KEY_PREFIX: &str = "sak_";

/// 32 bytes from the operating system's CSPRNG.
pub fn random_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    // The OS generator failing is unrecoverable: continuing would hand out guessable secrets.
    OsRng.try_fill_bytes(&mut bytes).expect("the operating system's random source failed");
    bytes
}

/// A new session token: the prefix plus 256 random bits in URL-safe base64.
pub fn new_session_token() -> String {
    format!("{SESSION_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(random_bytes()))
}

/// A new API key for a caller.
pub fn new_api_key() -> String {
    format!("{API_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(random_bytes()))
}

/// SHA-256 of a secret's bytes.
pub fn sha256(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// SHA-256 as lower-case hex, the form refresh records and logs may carry.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(sha256(secret.as_bytes()))
}

/// The storage key of a session token: its SHA-256, except that for a token of the form
/// `sat_<tag>_...` the first two bytes are the token's 4-hex-digit shard tag.
///
/// Why: the stores are only ever given this hash, and shared storage must route a token to the
/// Redis Cluster slot of its user (`{<tag>}`) in one lookup. 240 bits of SHA-256 remain, far
/// beyond guessing; the tag itself is already in the token and derives from the user id the
/// record holds in the same place.
pub fn token_hash(token: &str) -> [u8; 32] {
    let mut hash = sha256(token.as_bytes());
    if let Some(tag) = token_shard_tag(token) {
        hash[..2].copy_from_slice(&tag);
    }
    hash
}

/// The lookup key of an upstream (provider) token: SHA-256 over a domain prefix and the token,
/// so it never equals a session-token hash. Upstream tokens are the provider's secrets; only this
/// hash is kept in the clear, to answer IsRevoked and RevokeSession by upstream token.
pub fn upstream_token_hash(token: &str) -> [u8; 32] {
    let mut input = Vec::with_capacity(UPSTREAM_DOMAIN.len() + token.len());
    input.extend_from_slice(UPSTREAM_DOMAIN);
    input.extend_from_slice(token.as_bytes());
    sha256(&input)
}

const UPSTREAM_DOMAIN: &[u8] = b"atoms.session.v1 upstream token\0";

/// The shard tag of a `sat_<tag>_...` token, as two bytes; `None` for any other shape.
fn token_shard_tag(token: &str) -> Option<[u8; 2]> {
    let rest = token.strip_prefix(SESSION_TOKEN_PREFIX)?.as_bytes();
    if rest.len() < 5 || rest[4] != b'_' || !rest[..4].iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut tag = [0u8; 2];
    hex::decode_to_slice(&rest[..4], &mut tag).ok()?;
    Some(tag)
}

/// `sha256:<hex>` of an API key, as configuration holds it.
pub fn api_key_hash_string(key: &str) -> String {
    format!("sha256:{}", hex::encode(sha256(key.as_bytes())))
}

/// Constant-time equality of two digests.
pub fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// Length of the key id stored beside each ciphertext.
const KEY_ID_LEN: usize = 8;
/// Format 1 (read only): ChaCha20-Poly1305, 96-bit nonce, the session id as associated data.
const FORMAT_V1: u8 = 1;
const NONCE_V1_LEN: usize = 12;
/// Format 2 (written): XChaCha20-Poly1305, 192-bit nonce, associated data of [`aad_v2`].
const FORMAT_V2: u8 = 2;
const NONCE_V2_LEN: usize = 24;

/// Which upstream token of a session a ciphertext holds; bound into its associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenField {
    /// The upstream access token.
    Access,
    /// The upstream refresh token.
    Refresh,
    /// The OpenID Connect ID token.
    Id,
}

impl TokenField {
    fn label(self) -> &'static [u8] {
        match self {
            TokenField::Access => b"access",
            TokenField::Refresh => b"refresh",
            TokenField::Id => b"id",
        }
    }
}

/// Associated data of format 2: a domain label, the format byte, the key id, then the session
/// id and the field name, each length-prefixed so no two inputs share an encoding.
fn aad_v2(key_id: &[u8], session_id: &[u8], field: TokenField) -> Vec<u8> {
    let label = field.label();
    let mut aad = Vec::with_capacity(24 + key_id.len() + session_id.len() + label.len());
    aad.extend_from_slice(b"session-authority/token\0");
    aad.push(FORMAT_V2);
    aad.extend_from_slice(key_id);
    for part in [session_id, label] {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

/// One encryption key with its id (the first 8 bytes of SHA-256 of the key).
struct RingKey {
    id: [u8; KEY_ID_LEN],
    cipher: XChaCha20Poly1305,
    legacy: ChaCha20Poly1305,
}

/// The keys upstream tokens are sealed with: one current key, and earlier keys for reading.
pub struct KeyRing {
    current: RingKey,
    previous: Vec<RingKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("current_key_id", &hex::encode(self.current.id))
            .field("previous_keys", &self.previous.len())
            .finish()
    }
}

fn ring_key(raw: &[u8; 32]) -> RingKey {
    let digest = sha256(raw);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&digest[..KEY_ID_LEN]);
    RingKey {
        id,
        cipher: XChaCha20Poly1305::new(Key::from_slice(raw)),
        legacy: ChaCha20Poly1305::new(Key::from_slice(raw)),
    }
}

/// Decodes a base64 key of exactly 32 bytes.
pub fn decode_key(encoded: &SecretString) -> Result<[u8; 32], String> {
    let bytes =
        STANDARD.decode(encoded.expose_secret().trim()).map_err(|_| "expected base64 of 32 bytes".to_string())?;
    bytes.try_into().map_err(|b: Vec<u8>| format!("expected 32 bytes after base64 decoding, got {}", b.len()))
}

/// Encodes a key as base64 for the key file.
pub fn encode_key(raw: &[u8; 32]) -> String {
    STANDARD.encode(raw)
}

impl KeyRing {
    /// A ring that seals with `current` and also opens what `previous` keys sealed.
    pub fn new(current: &[u8; 32], previous: &[[u8; 32]]) -> KeyRing {
        KeyRing { current: ring_key(current), previous: previous.iter().map(ring_key).collect() }
    }

    /// Seals `plaintext`, token `field` of session `session_id`, in format 2.
    /// Layout: version (1) | key id (8) | nonce (24) | ciphertext and tag.
    pub fn seal(&self, plaintext: &[u8], session_id: &[u8], field: TokenField) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_V2_LEN];
        nonce.copy_from_slice(&random_bytes()[..NONCE_V2_LEN]);
        let aad = aad_v2(&self.current.id, session_id, field);
        let ciphertext = self
            .current
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
            // Encryption fails only for inputs over 256 GiB, which limits on requests rule out.
            .expect("XChaCha20-Poly1305 encryption of a bounded input");
        let mut out = Vec::with_capacity(1 + KEY_ID_LEN + NONCE_V2_LEN + ciphertext.len());
        out.push(FORMAT_V2);
        out.extend_from_slice(&self.current.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Opens what [`KeyRing::seal`] produced for the same session and field, or a format-1
    /// ciphertext of the same session.
    pub fn open(&self, sealed: &[u8], session_id: &[u8], field: TokenField) -> Result<Vec<u8>> {
        let nonce_len = match sealed.first() {
            Some(&FORMAT_V1) => NONCE_V1_LEN,
            Some(&FORMAT_V2) => NONCE_V2_LEN,
            _ => return Err(Error::internal("stored ciphertext is malformed (unknown format)")),
        };
        let header = 1 + KEY_ID_LEN + nonce_len;
        if sealed.len() < header {
            return Err(Error::internal("stored ciphertext is malformed (too short)"));
        }
        let key_id = &sealed[1..1 + KEY_ID_LEN];
        let nonce = &sealed[1 + KEY_ID_LEN..header];
        let key = std::iter::once(&self.current).chain(&self.previous).find(|k| k.id == key_id).ok_or_else(|| {
            Error::internal(format!(
                "stored ciphertext was sealed with key id {} which is not configured",
                hex::encode(key_id)
            ))
        })?;
        let msg = &sealed[header..];
        let opened = if sealed[0] == FORMAT_V1 {
            key.legacy.decrypt(Nonce::from_slice(nonce), Payload { msg, aad: session_id })
        } else {
            let aad = aad_v2(key_id, session_id, field);
            key.cipher.decrypt(XNonce::from_slice(nonce), Payload { msg, aad: &aad })
        };
        opened.map_err(|_| Error::internal("stored ciphertext failed authentication"))
    }

    /// The id of the key new ciphertexts are sealed with, in hex.
    pub fn current_key_id(&self) -> String {
        hex::encode(self.current.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_tokens_are_long_unique_and_prefixed() {
        let a = new_session_token();
        let b = new_session_token();
        assert_ne!(a, b);
        assert!(a.starts_with(SESSION_TOKEN_PREFIX));
        // 32 bytes in unpadded base64 are 43 characters: 256 bits of entropy.
        assert_eq!(a.len(), SESSION_TOKEN_PREFIX.len() + 43);
    }

    #[test]
    fn token_hashes_carry_the_shard_tag() {
        let token = "sat_beef_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
        let hash = token_hash(token);
        assert_eq!(&hash[..2], &[0xbe, 0xef]);
        assert_eq!(&hash[2..], &sha256(token.as_bytes())[2..]);
        // Tokens without a well-formed tag keep the plain digest.
        for other in ["sat_BEEF_x", "sat_bee_x", "sat_beefx", "sak_beef_x", "sat_"] {
            assert_eq!(token_hash(other), sha256(other.as_bytes()), "{other}");
        }
    }

    use TokenField::{Access, Id, Refresh};

    #[test]
    fn sealing_round_trips_and_binds_context() {
        let ring = KeyRing::new(&[7u8; 32], &[]);
        let sealed = ring.seal(b"refresh-token", b"session-1", Refresh);
        assert!(!sealed.windows(13).any(|w| w == b"refresh-token"));
        assert_eq!(ring.open(&sealed, b"session-1", Refresh).unwrap(), b"refresh-token");
        assert!(ring.open(&sealed, b"session-2", Refresh).is_err());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(ring.open(&tampered, b"session-1", Refresh).is_err());
    }

    /// Issue 16 point 15b: a format-2 ciphertext is XChaCha20-Poly1305 with a 192-bit nonce and
    /// opens only as the same field of the same session under the key id it names.
    #[test]
    fn ciphertexts_bind_key_id_session_and_field() {
        let ring = KeyRing::new(&[7u8; 32], &[[8u8; 32]]);
        let sealed = ring.seal(b"access-token", b"session-1", Access);
        assert_eq!(sealed[0], FORMAT_V2);
        assert_eq!(sealed.len(), 1 + KEY_ID_LEN + 24 + b"access-token".len() + 16);
        assert_eq!(ring.open(&sealed, b"session-1", Access).unwrap(), b"access-token");
        // Moved to another field of the same session.
        for field in [Refresh, Id] {
            let e = ring.open(&sealed, b"session-1", field).unwrap_err().to_string();
            assert!(e.contains("failed authentication"), "{field:?}: {e}");
        }
        // Moved to another session.
        assert!(ring.open(&sealed, b"session-2", Access).is_err());
        // Relabelled with the id of another configured key.
        let other = KeyRing::new(&[8u8; 32], &[]);
        let other_id = hex::decode(other.current_key_id()).unwrap();
        let mut relabelled = sealed.clone();
        relabelled[1..1 + KEY_ID_LEN].copy_from_slice(&other_id);
        assert!(ring.open(&relabelled, b"session-1", Access).is_err());
        // Downgraded to format 1 with the same bytes.
        let mut downgraded = sealed.clone();
        downgraded[0] = FORMAT_V1;
        assert!(ring.open(&downgraded, b"session-1", Access).is_err());
    }

    /// Format-1 ciphertexts (ChaCha20-Poly1305, session id as associated data), as earlier
    /// releases stored them, still open, for any field, and only for their session.
    #[test]
    fn old_format_ciphertexts_still_open() {
        let raw = [5u8; 32];
        let key = ring_key(&raw);
        let nonce = [3u8; NONCE_V1_LEN];
        let ct = ChaCha20Poly1305::new(Key::from_slice(&raw))
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: b"old-token", aad: b"session-1" })
            .unwrap();
        let mut sealed = vec![FORMAT_V1];
        sealed.extend_from_slice(&key.id);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ct);
        let ring = KeyRing::new(&[6u8; 32], &[raw]);
        for field in [Access, Refresh, Id] {
            assert_eq!(ring.open(&sealed, b"session-1", field).unwrap(), b"old-token");
        }
        assert!(ring.open(&sealed, b"session-2", Access).is_err());
        // Rewritten, it is format 2 under the current key.
        assert_eq!(ring.seal(b"old-token", b"session-1", Access)[0], FORMAT_V2);
        assert!(ring.open(&[9u8; 40], b"session-1", Access).is_err());
        assert!(ring.open(&[], b"session-1", Access).is_err());
    }

    #[test]
    fn rotated_rings_read_old_ciphertexts() {
        let old = KeyRing::new(&[1u8; 32], &[]);
        let sealed = old.seal(b"t", b"s", Access);
        let rotated = KeyRing::new(&[2u8; 32], &[[1u8; 32]]);
        assert_eq!(rotated.open(&sealed, b"s", Access).unwrap(), b"t");
        assert_ne!(rotated.current_key_id(), old.current_key_id());
        let without_old = KeyRing::new(&[2u8; 32], &[]);
        let e = without_old.open(&sealed, b"s", Access).unwrap_err().to_string();
        assert!(e.contains("key id"), "{e}");
    }

    #[test]
    fn keys_decode_strictly() {
        let good = SecretString::from(encode_key(&[9u8; 32]));
        assert_eq!(decode_key(&good).unwrap(), [9u8; 32]);
        assert!(decode_key(&SecretString::from("c2hvcnQ=".to_string())).is_err());
        assert!(decode_key(&SecretString::from("not base64!".to_string())).is_err());
    }

    #[test]
    fn api_key_hash_format_parses_back() {
        let key = new_api_key();
        let text = api_key_hash_string(&key);
        assert_eq!(crate::config::parse_key_hash(&text).unwrap(), sha256(key.as_bytes()));
    }
}
