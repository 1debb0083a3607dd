//! Secrets: session tokens, their hashes, API-key digests, and encryption at rest.
//!
//! Session tokens are 256 bits from the operating system's CSPRNG and are only ever stored as
//! their SHA-256 digest; looking a session up by that digest means the secret itself is never
//! compared byte by byte. Upstream tokens are sealed with ChaCha20-Poly1305 under a key ring:
//! each ciphertext carries the id of the key that sealed it, so keys can be rotated while old
//! ciphertexts stay readable, and the session id is bound in as associated data so a ciphertext
//! cannot be moved to another session.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
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
const NONCE_LEN: usize = 12;
const FORMAT_VERSION: u8 = 1;

/// One encryption key with its id (the first 8 bytes of SHA-256 of the key).
struct RingKey {
    id: [u8; KEY_ID_LEN],
    cipher: ChaCha20Poly1305,
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
    RingKey { id, cipher: ChaCha20Poly1305::new(Key::from_slice(raw)) }
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

    /// Seals `plaintext`, binding `context` (the session id) as associated data.
    /// Layout: version (1) | key id (8) | nonce (12) | ciphertext and tag.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&random_bytes()[..NONCE_LEN]);
        let ciphertext = self
            .current
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: context })
            // Encryption fails only for inputs over 256 GiB, which limits on requests rule out.
            .expect("ChaCha20-Poly1305 encryption of a bounded input");
        let mut out = Vec::with_capacity(1 + KEY_ID_LEN + NONCE_LEN + ciphertext.len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.current.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Opens what [`KeyRing::seal`] produced with the same `context`.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>> {
        let header = 1 + KEY_ID_LEN + NONCE_LEN;
        if sealed.len() < header || sealed[0] != FORMAT_VERSION {
            return Err(Error::internal("stored ciphertext is malformed"));
        }
        let key_id = &sealed[1..1 + KEY_ID_LEN];
        let nonce = Nonce::from_slice(&sealed[1 + KEY_ID_LEN..header]);
        let key = std::iter::once(&self.current).chain(&self.previous).find(|k| k.id == key_id).ok_or_else(|| {
            Error::internal(format!(
                "stored ciphertext was sealed with key id {} which is not configured",
                hex::encode(key_id)
            ))
        })?;
        key.cipher
            .decrypt(nonce, Payload { msg: &sealed[header..], aad: context })
            .map_err(|_| Error::internal("stored ciphertext failed authentication"))
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

    #[test]
    fn sealing_round_trips_and_binds_context() {
        let ring = KeyRing::new(&[7u8; 32], &[]);
        let sealed = ring.seal(b"refresh-token", b"session-1");
        assert!(!sealed.windows(13).any(|w| w == b"refresh-token"));
        assert_eq!(ring.open(&sealed, b"session-1").unwrap(), b"refresh-token");
        assert!(ring.open(&sealed, b"session-2").is_err());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(ring.open(&tampered, b"session-1").is_err());
    }

    #[test]
    fn rotated_rings_read_old_ciphertexts() {
        let old = KeyRing::new(&[1u8; 32], &[]);
        let sealed = old.seal(b"t", b"s");
        let rotated = KeyRing::new(&[2u8; 32], &[[1u8; 32]]);
        assert_eq!(rotated.open(&sealed, b"s").unwrap(), b"t");
        assert_ne!(rotated.current_key_id(), old.current_key_id());
        let without_old = KeyRing::new(&[2u8; 32], &[]);
        let e = without_old.open(&sealed, b"s").unwrap_err().to_string();
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
