//! The `token` target: the join-token string parser (src/core/token.rs),
//! which reads what an operator pastes into `--token` and what a joiner
//! sends.
//!
//! Whatever parses must be the token's one canonical spelling (so two
//! spellings can never hash to two different log keys for one token), and
//! every refusal must point at the character or length it complains about.

use super::{alloc, check_message, Verdict};
use keel::core::codec::hex;
use keel::core::token::{JoinToken, TokenParseError, TOKEN_LEN, TOKEN_PREFIX};

/// Where the separator before the checksum sits (1-based, in characters).
const SEPARATOR_POSITION: usize = TOKEN_LEN - 8;

/// The fuzz target body; see the module documentation.
pub fn token(data: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(data);
    let result = alloc::bounded("JoinToken::parse", data.len(), || JoinToken::parse(&text));
    let trimmed = text.trim();
    match &result {
        Ok(token) => {
            let encoded = token.encode();
            assert_eq!(
                encoded, trimmed,
                "a token parsed from a non-canonical spelling"
            );
            assert_eq!(encoded.len(), TOKEN_LEN);
            assert_eq!(JoinToken::parse(&encoded).as_ref(), Ok(token));
            assert_eq!(token.to_string(), encoded);
            // `Debug` goes to logs: it must not show the secret (which it
            // could only seem to if the fingerprint it shows were equal).
            let debug = format!("{token:?}");
            if token.secret != token.ca_fingerprint {
                assert!(
                    !debug.contains(&hex(&token.secret)),
                    "Debug shows the secret"
                );
            }
        }
        Err(e) => {
            check_message(e);
            let char_at = |position: usize| trimmed.chars().nth(position.checked_sub(1)?);
            match *e {
                TokenParseError::WrongPrefix => assert!(!trimmed.starts_with(TOKEN_PREFIX)),
                TokenParseError::WrongLength { found } => {
                    assert_eq!(found, trimmed.chars().count());
                    assert_ne!(found, TOKEN_LEN);
                }
                TokenParseError::NotHex { position, found } => {
                    assert_eq!(char_at(position), Some(found), "NotHex points elsewhere");
                    assert!(!matches!(found, '0'..='9' | 'a'..='f'), "{found:?} is hex");
                    assert_ne!(position, SEPARATOR_POSITION);
                }
                TokenParseError::MissingSeparator { position, found } => {
                    assert_eq!(position, SEPARATOR_POSITION);
                    assert_eq!(char_at(position), Some(found));
                    assert_ne!(found, '.');
                }
                TokenParseError::ChecksumMismatch => {
                    assert_eq!(trimmed.chars().count(), TOKEN_LEN);
                }
            }
        }
    }
    Verdict::of(&result)
}
