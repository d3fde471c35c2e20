//! Opaque page tokens: the last id of the previous page, tagged with what was listed.

use super::ServiceError;

/// A decoded page token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageToken {
    pub after_id: String,
}

impl PageToken {
    /// Encodes "continue after `after_id`" for listing `kind` (keys or sites).
    pub fn encode(kind: &str, after_id: &str) -> String {
        format!("{kind}:{after_id}").bytes().map(|b| format!("{b:02x}")).collect()
    }

    /// Decodes a token made by [`encode`](Self::encode) for the same `kind`; empty means the first page.
    pub fn decode(kind: &str, token: &str) -> Result<Option<Self>, ServiceError> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || ServiceError::invalid("page_token", "is not a token returned by this list call");
        if token.len() > 512 || !token.len().is_multiple_of(2) {
            return Err(invalid());
        }
        let bytes = (0..token.len())
            .step_by(2)
            .map(|i| token.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(invalid)?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let after_id = text.strip_prefix(kind).and_then(|rest| rest.strip_prefix(':')).ok_or_else(invalid)?;
        Ok(Some(Self { after_id: after_id.to_owned() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_foreign_input() {
        let token = PageToken::encode("keys", "key_0001");
        assert_eq!(PageToken::decode("keys", &token).unwrap().unwrap().after_id, "key_0001");
        assert!(PageToken::decode("sites", &token).is_err());
        assert!(PageToken::decode("keys", "zz").is_err());
        assert!(PageToken::decode("keys", "abc").is_err());
        assert!(PageToken::decode("keys", "é").is_err());
        assert_eq!(PageToken::decode("keys", "").unwrap(), None);
    }
}
