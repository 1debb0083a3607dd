//! Page tokens, one format for every list: base64url (no padding) of the position's fields joined
//! by `:`. Lists ordered by (time, id), newest first (SessionService's user sessions,
//! SecurityService's events) resume after `(at, id)`; the revocation list resumes after a
//! sequence number within the snapshot it started on (`after`, `through`). A token is opaque to
//! callers; one that was not returned by a previous call is INVALID_ARGUMENT naming `page_token`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::clock::Millis;
use crate::error::{Error, Result};

fn bad() -> Error {
    Error::invalid("page_token", "not a token returned by a previous call")
}

/// The `(first, rest)` fields of a token: the text before the first `:` and after it.
fn open(token: &str) -> Result<(String, String)> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?).map_err(|_| bad())?;
    let (first, rest) = text.split_once(':').ok_or_else(bad)?;
    Ok((first.to_owned(), rest.to_owned()))
}

/// The token that resumes after the item at `(at, id)`.
pub fn encode(at: Millis, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{at}:{id}"))
}

/// The position a token of [`encode`] names.
pub fn decode(token: &str) -> Result<(Millis, String)> {
    let (at, id) = open(token)?;
    Ok((at.parse().map_err(|_| bad())?, id))
}

/// The token that resumes after sequence number `after` of a snapshot taken at `through`.
pub fn encode_seq(after: u64, through: u64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{after}:{through}"))
}

/// The `(after, through)` a token of [`encode_seq`] names; `after` is never above `through`.
pub fn decode_seq(token: &str) -> Result<(u64, u64)> {
    let (after, through) = open(token)?;
    let (after, through): (u64, u64) = (after.parse().map_err(|_| bad())?, through.parse().map_err(|_| bad())?);
    if after > through {
        return Err(bad());
    }
    Ok((after, through))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_foreign_ones_are_refused() {
        assert_eq!(
            decode(&encode(1_700_000_000_123, "ses_ab12_x:y")).unwrap(),
            (1_700_000_000_123, "ses_ab12_x:y".into())
        );
        for bad in ["", "not base64!", &URL_SAFE_NO_PAD.encode("no-colon"), &URL_SAFE_NO_PAD.encode("x:id")] {
            let e = decode(bad).unwrap_err().to_string();
            assert!(e.contains("page_token"), "{e}");
        }
    }

    #[test]
    fn sequence_tokens_round_trip_and_foreign_ones_are_refused() {
        assert_eq!(decode_seq(&encode_seq(5, 9)).unwrap(), (5, 9));
        let time_token = encode(1_700_000_000_123, "ses_x");
        for bad in ["", "5.9", "x", &encode_seq(9, 5), &time_token, &URL_SAFE_NO_PAD.encode("5:-1")] {
            let e = decode_seq(bad).unwrap_err().to_string();
            assert!(e.contains("page_token"), "{bad}: {e}");
        }
    }
}
