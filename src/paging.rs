//! Page tokens for lists ordered by (time, id), newest first: SessionService's user sessions and
//! SecurityService's events. A token is the position of the last item of a page, opaque to
//! callers; a token that was not returned by a previous call is INVALID_ARGUMENT.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::clock::Millis;
use crate::error::{Error, Result};

/// The token that resumes after the item at `(at, id)`.
pub fn encode(at: Millis, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{at}:{id}"))
}

/// The position a token of [`encode`] names.
pub fn decode(token: &str) -> Result<(Millis, String)> {
    let bad = || Error::invalid("page_token", "not a token returned by a previous call");
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?).map_err(|_| bad())?;
    let (at, id) = text.split_once(':').ok_or_else(bad)?;
    Ok((at.parse().map_err(|_| bad())?, id.to_owned()))
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
}
