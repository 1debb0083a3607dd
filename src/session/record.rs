//! The ids and tokens a new session gets; the record itself is [`crate::model::session`].

use super::*;

pub(super) fn new_session_id(tag: &str) -> String {
    format!("ses_{tag}_{}", uuid::Uuid::new_v4().simple())
}

pub(super) fn new_session_token(tag: &str) -> String {
    format!("{}{tag}_{}", crypto::SESSION_TOKEN_PREFIX, URL_SAFE_NO_PAD.encode(crypto::random_bytes()))
}
