//! Key names under a prefix, and the tags and members that route them to one slot.

use super::*;

/// Key names under a prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// A layout under `prefix`. Braces are refused: Redis Cluster hashes the first `{...}` of a
    /// key, so a brace in the prefix would move every key to one slot.
    pub fn new(prefix: &str) -> std::result::Result<Layout, String> {
        if prefix.contains(['{', '}']) {
            return Err("must not contain `{` or `}` (Redis Cluster hash tags)".into());
        }
        Ok(Layout { prefix: prefix.to_owned() })
    }

    /// `P{T}:`: the start of every key of the users with tag `tag`.
    pub(super) fn tagged(&self, tag: &str) -> String {
        format!("{}{{{tag}}}:", self.prefix)
    }

    /// `P{T}:s:`: record keys start with this; scripts append the hash hex.
    pub(super) fn records(&self, tag: &str) -> String {
        format!("{}s:", self.tagged(tag))
    }

    /// `P{T}:s:<hash hex>`, built in one allocation: it is on every validation's path.
    pub(super) fn record(&self, hash: &TokenHash) -> String {
        let mut digits = [0u8; 64];
        hex::encode_to_slice(hash, &mut digits).expect("64 digits for 32 bytes");
        let digits = std::str::from_utf8(&digits).expect("hex digits are ASCII");
        // The prefix, `{`, the four digits of the tag, `}:s:`, the 64 digits.
        let mut key = String::with_capacity(self.prefix.len() + 1 + 4 + 4 + digits.len());
        key.push_str(&self.prefix);
        key.push('{');
        key.push_str(&digits[..4]);
        key.push_str("}:s:");
        key.push_str(digits);
        key
    }

    pub(super) fn id(&self, tag: &str, session_id: &str) -> String {
        format!("{}id:{session_id}", self.tagged(tag))
    }

    pub(super) fn user(&self, tag: &str, user_id: &str) -> String {
        format!("{}u:{user_id}", self.tagged(tag))
    }

    /// The purge index (one key, its own slot).
    pub(super) fn due(&self) -> String {
        format!("{}{{expiry}}:due", self.prefix)
    }

    /// The upstream-token index entry of one hash (its own key, so in any slot).
    pub(super) fn upstream(&self, upstream_hash_hex: &str) -> String {
        format!("{}ut:{upstream_hash_hex}", self.prefix)
    }

    /// The deadline index of [`SessionStore::take_timed_out`] (beside the purge index).
    pub(super) fn deadlines(&self) -> String {
        format!("{}{{expiry}}:deadlines", self.prefix)
    }

    /// A key of the revocation log (all in the `{log}` slot): `meta`, `stream`, `sess`, `exp`,
    /// `dirty`, and `u:` (the prefix of the per-user indexes).
    pub(super) fn log(&self, what: &str) -> String {
        format!("{}{{log}}:{what}", self.prefix)
    }

    /// The revocation outbox of the users with tag `tag` (Redis Cluster).
    pub(super) fn outbox(&self, tag: &str) -> String {
        format!("{}outbox", self.tagged(tag))
    }

    /// Rate-limit states (`states`) and their forget index (`forget`), in the `{limits}` slot.
    pub(super) fn limits(&self, what: &str) -> String {
        format!("{}{{limits}}:{what}", self.prefix)
    }

    /// A user's security events (`ev`) or their time index (`evi`).
    pub(super) fn user_events(&self, what: &str, user_id: &str) -> String {
        format!("{}{what}:{user_id}", self.tagged(&shard_tag(user_id)))
    }

    /// Security events without a user (`nouser`) and the global time index (`time`), in the
    /// `{events}` slot.
    pub(super) fn events(&self, what: &str) -> String {
        format!("{}{{events}}:{what}", self.prefix)
    }

    /// A session's refresh lease, in its slot.
    pub(super) fn lease(&self, session_id: &str) -> String {
        format!("{}lease:{session_id}", self.tagged(&session_tag(session_id)))
    }

    /// A session's refresh records (`rr`: record id → value) or their id index (`rri`), in its
    /// slot.
    pub(super) fn refresh(&self, what: &str, session_id: &str) -> String {
        format!("{}{what}:{session_id}", self.tagged(&session_tag(session_id)))
    }

    /// The purge indexes of the token work, in the `{tokens}` slot: `due` (refresh records by
    /// `expires_at`) and `leases` (leases by a time at or before their expiry).
    pub(super) fn tokens(&self, what: &str) -> String {
        format!("{}{{tokens}}:{what}", self.prefix)
    }
}

/// The shard tag of a session's token-work keys: the tag its `ses_<tag>_...` id carries, or, for
/// an id of another shape, the tag of the id itself (still one slot per session).
pub(super) fn session_tag(session_id: &str) -> String {
    id_tag(session_id).map_or_else(|| shard_tag(session_id), str::to_owned)
}

/// The `{tokens}:due` member of a refresh record: `<session id>|<record id>` (record ids have
/// no `|`; the session id is split off at the last one).
pub(super) fn record_member(session_id: &str, record_id: &str) -> String {
    format!("{session_id}|{record_id}")
}

/// The shard tag a token hash carries (see [`crate::crypto::token_hash`]).
pub(super) fn hash_tag(hash: &TokenHash) -> String {
    hex::encode(&hash[..2])
}

pub(super) fn due_member(hash: &TokenHash) -> String {
    format!("{}:{}", hash_tag(hash), hex::encode(hash))
}

/// The shard tag of a `ses_<tag>_...` id.
pub(super) fn id_tag(session_id: &str) -> Option<&str> {
    let rest = session_id.strip_prefix("ses_")?;
    let tag = rest.get(..4)?;
    (rest.as_bytes().get(4) == Some(&b'_') && tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then_some(tag)
}

pub(super) fn state_name(state: SessionState) -> &'static str {
    match state {
        SessionState::Active => "active",
        SessionState::Expired => "expired",
        SessionState::Revoked => "revoked",
        SessionState::Terminated => "terminated",
    }
}
