//! Join tokens (DESIGN.md §6) and their lifecycle (§3.1 `JoinTokenTransition`).
//!
//! A join token lets one new node into the cluster, once. Two things live here:
//!
//! - [`JoinToken`], the string an operator copies from `keel token issue` to
//!   the joiner's `--token`. It carries the cluster CA fingerprint, so the
//!   joiner can authenticate the server before revealing the secret (a man in
//!   the middle cannot take the token), the secret itself, and the expiry.
//! - [`TokenTable`], the replicated lifecycle of every token ever issued,
//!   keyed by the SHA-256 of the token string: the raw token never enters the
//!   log, so reading the log (or a snapshot) never reveals a usable token.
//!
//! ```text
//! (absent) --Register--> Issued --Begin--> InFlight --Consume--> Consumed
//!                          ^                  |
//!                          +------Revert------+
//! Issued | InFlight --Expire--> Expired      (non-terminal) --Abort--> Aborted
//! ```
//!
//! A hash is never forgotten and a terminal state never changes, so a token is
//! consumed at most once, across crashes and restarts of every node.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;

/// SHA-256 of the encoded token string; the only form of a token in the log.
pub type TokenHash = [u8; 32];

/// One step of a token's lifecycle, as committed in a `JoinTokenTransition`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JoinTokenTransitionKind {
    /// (absent) → `Issued`. A hash seen before, in any state, is refused:
    /// tokens are single use forever.
    Register { expires_at_ms: u64 },
    /// `Issued` → `InFlight`: a joiner presented the token. Refused at or
    /// after the expiry (the state stays as it is; `Expire` is its own step).
    Begin,
    /// `InFlight` → `Consumed` (terminal): the joiner got its certificate.
    Consume,
    /// `InFlight` → `Issued`: the dead-man timer fired because the joiner vanished.
    Revert,
    /// `Issued | InFlight` → `Expired` (terminal); refused before the expiry.
    Expire,
    /// Any non-terminal state → `Aborted` (terminal): an operator revoked it.
    Abort,
}

impl fmt::Display for JoinTokenTransitionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JoinTokenTransitionKind::Register { .. } => "Register",
            JoinTokenTransitionKind::Begin => "Begin",
            JoinTokenTransitionKind::Consume => "Consume",
            JoinTokenTransitionKind::Revert => "Revert",
            JoinTokenTransitionKind::Expire => "Expire",
            JoinTokenTransitionKind::Abort => "Abort",
        })
    }
}

/// Where a registered token is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TokenState {
    Issued,
    InFlight,
    Consumed,
    Expired,
    Aborted,
}

impl TokenState {
    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TokenState::Consumed | TokenState::Expired | TokenState::Aborted
        )
    }
}

impl fmt::Display for TokenState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The replicated row of one token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenRecord {
    pub state: TokenState,
    /// Log time of the `Register`.
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// Log time of the last applied transition.
    pub updated_at_ms: u64,
}

/// A refused token transition. The table is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum TokenError {
    #[error("the join token is not registered on this cluster")]
    UnknownToken,
    #[error("the join token was registered before and tokens are single use, so it cannot be registered again")]
    AlreadyRegistered,
    #[error("the join token is {from}, so it cannot take the {transition} transition")]
    IllegalTransition {
        from: TokenState,
        transition: JoinTokenTransitionKind,
    },
    #[error("the join token expired at {expires_at_ms} ms and was presented at {ts_ms} ms")]
    Expired { expires_at_ms: u64, ts_ms: u64 },
    #[error("the join token expires at {expires_at_ms} ms, so it cannot be expired at {ts_ms} ms")]
    NotYetExpired { expires_at_ms: u64, ts_ms: u64 },
    #[error(
        "the join token's expiry {expires_at_ms} ms is not after its issue time {issued_at_ms} ms"
    )]
    ExpiryNotAfterIssue {
        issued_at_ms: u64,
        expires_at_ms: u64,
    },
}

/// Every token ever registered, by hash. Entries are never removed: that is
/// what makes a token single use forever.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenTable {
    tokens: BTreeMap<TokenHash, TokenRecord>,
}

impl TokenTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one committed transition and returns the token's new state.
    ///
    /// `ts_ms` is the timestamp carried in the committed entry, the same on
    /// every replica, so every replica accepts or refuses identically. On
    /// `Err` the table is unchanged.
    pub fn apply(
        &mut self,
        token_hash: &TokenHash,
        transition: &JoinTokenTransitionKind,
        ts_ms: u64,
    ) -> Result<TokenState, TokenError> {
        use JoinTokenTransitionKind as T;
        use TokenState as S;

        let Some(record) = self.tokens.get_mut(token_hash) else {
            let T::Register { expires_at_ms } = *transition else {
                return Err(TokenError::UnknownToken);
            };
            if expires_at_ms <= ts_ms {
                return Err(TokenError::ExpiryNotAfterIssue {
                    issued_at_ms: ts_ms,
                    expires_at_ms,
                });
            }
            self.tokens.insert(
                *token_hash,
                TokenRecord {
                    state: S::Issued,
                    issued_at_ms: ts_ms,
                    expires_at_ms,
                    updated_at_ms: ts_ms,
                },
            );
            return Ok(S::Issued);
        };

        let expires_at_ms = record.expires_at_ms;
        let next = match (record.state, *transition) {
            (_, T::Register { .. }) => return Err(TokenError::AlreadyRegistered),
            (S::Issued, T::Begin) if ts_ms >= expires_at_ms => {
                return Err(TokenError::Expired {
                    expires_at_ms,
                    ts_ms,
                })
            }
            (S::Issued, T::Begin) => S::InFlight,
            // A joiner that began in time may finish after the expiry: validity
            // is judged when the token is presented, and an `Expire` committed
            // first has already made this transition illegal.
            (S::InFlight, T::Consume) => S::Consumed,
            (S::InFlight, T::Revert) => S::Issued,
            (S::Issued | S::InFlight, T::Expire) if ts_ms < expires_at_ms => {
                return Err(TokenError::NotYetExpired {
                    expires_at_ms,
                    ts_ms,
                })
            }
            (S::Issued | S::InFlight, T::Expire) => S::Expired,
            (from, T::Abort) if !from.is_terminal() => S::Aborted,
            (from, transition) => return Err(TokenError::IllegalTransition { from, transition }),
        };
        record.state = next;
        record.updated_at_ms = ts_ms;
        Ok(next)
    }

    pub fn get(&self, token_hash: &TokenHash) -> Option<&TokenRecord> {
        self.tokens.get(token_hash)
    }

    /// All tokens in hash order (deterministic, for snapshots and status).
    pub fn iter(&self) -> impl Iterator<Item = (&TokenHash, &TokenRecord)> {
        self.tokens.iter()
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// The prefix of every version-1 token string.
pub const TOKEN_PREFIX: &str = "keel-join-v1.";
/// Bytes of the token payload: CA fingerprint, secret, big-endian expiry.
const PAYLOAD_LEN: usize = 32 + 32 + 8;
/// Hex digits of the payload.
const PAYLOAD_HEX_LEN: usize = 2 * PAYLOAD_LEN;
/// Hex digits of the CRC32C checksum.
const CHECKSUM_HEX_LEN: usize = 8;
/// Characters of a whole token string.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + PAYLOAD_HEX_LEN + 1 + CHECKSUM_HEX_LEN;

/// The operator-facing join token.
///
/// Its string form is
/// `keel-join-v1.<hex(ca_fingerprint || secret || expires_at_ms as big-endian u64)>.<crc32c>`,
/// all hex lowercase, the checksum being 8 hex digits of the CRC32C of the
/// 72 payload bytes so a typo or truncation is reported as such rather than
/// as an unknown token. `Debug` redacts the secret so the token cannot leak
/// through logs; `Display` prints the whole token, deliberately.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JoinToken {
    pub ca_fingerprint: [u8; 32],
    pub secret: [u8; 32],
    pub expires_at_ms: u64,
}

/// Why an operator-supplied token string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum TokenParseError {
    #[error("the token does not start with \"{TOKEN_PREFIX}\", so it is not a keel join token (or comes from an incompatible keel version)")]
    WrongPrefix,
    #[error("the token is {found} characters long but a join token has {TOKEN_LEN}; it is mistyped or truncated")]
    WrongLength { found: usize },
    #[error(
        "character {found:?} at position {position} of the token is not a lowercase hex digit"
    )]
    NotHex { position: usize, found: char },
    #[error("character {found:?} at position {position} of the token should be the '.' before the checksum")]
    MissingSeparator { position: usize, found: char },
    #[error("the token is mistyped or truncated: its checksum does not match")]
    ChecksumMismatch,
}

impl JoinToken {
    fn payload(&self) -> [u8; PAYLOAD_LEN] {
        let mut bytes = [0u8; PAYLOAD_LEN];
        bytes[..32].copy_from_slice(&self.ca_fingerprint);
        bytes[32..64].copy_from_slice(&self.secret);
        bytes[64..].copy_from_slice(&self.expires_at_ms.to_be_bytes());
        bytes
    }

    /// The token string (see the type's documentation for the format).
    pub fn encode(&self) -> String {
        let payload = self.payload();
        let mut out = String::with_capacity(TOKEN_LEN);
        out.push_str(TOKEN_PREFIX);
        for byte in payload {
            out.push(HEX_DIGITS[usize::from(byte >> 4)]);
            out.push(HEX_DIGITS[usize::from(byte & 0xf)]);
        }
        out.push('.');
        out.push_str(&format!("{:08x}", crc32c::crc32c(&payload)));
        out
    }

    /// Parses untrusted operator input. Surrounding whitespace is ignored;
    /// positions in errors count characters (from 1) of the trimmed token.
    /// Never panics, whatever the input.
    pub fn parse(s: &str) -> Result<JoinToken, TokenParseError> {
        let s = s.trim();
        let Some(rest) = s.strip_prefix(TOKEN_PREFIX) else {
            return Err(TokenParseError::WrongPrefix);
        };
        let found = s.chars().count();
        if found != TOKEN_LEN {
            return Err(TokenParseError::WrongLength { found });
        }
        let mut nibbles = [0u8; PAYLOAD_HEX_LEN + CHECKSUM_HEX_LEN];
        let mut next = 0;
        for (i, c) in rest.chars().enumerate() {
            let position = TOKEN_PREFIX.len() + i + 1;
            if i == PAYLOAD_HEX_LEN {
                if c != '.' {
                    return Err(TokenParseError::MissingSeparator { position, found: c });
                }
                continue;
            }
            let nibble = hex_value(c).ok_or(TokenParseError::NotHex { position, found: c })?;
            // The length check above bounds `next`; `get_mut` keeps this panic-free regardless.
            if let Some(slot) = nibbles.get_mut(next) {
                *slot = nibble;
            }
            next += 1;
        }
        let mut payload = [0u8; PAYLOAD_LEN];
        for (byte, pair) in payload.iter_mut().zip(nibbles.chunks_exact(2)) {
            *byte = (pair[0] << 4) | pair[1];
        }
        let stored = nibbles[PAYLOAD_HEX_LEN..]
            .iter()
            .fold(0u32, |acc, &n| (acc << 4) | u32::from(n));
        if stored != crc32c::crc32c(&payload) {
            return Err(TokenParseError::ChecksumMismatch);
        }
        let mut ca_fingerprint = [0u8; 32];
        let mut secret = [0u8; 32];
        let mut expiry = [0u8; 8];
        ca_fingerprint.copy_from_slice(&payload[..32]);
        secret.copy_from_slice(&payload[32..64]);
        expiry.copy_from_slice(&payload[64..]);
        Ok(JoinToken {
            ca_fingerprint,
            secret,
            expires_at_ms: u64::from_be_bytes(expiry),
        })
    }

    /// The hash the log knows the token by: SHA-256 of the encoded string.
    pub fn hash(&self) -> TokenHash {
        Sha256::digest(self.encode().as_bytes()).into()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fingerprint: String = self
            .ca_fingerprint
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        f.debug_struct("JoinToken")
            .field("ca_fingerprint", &fingerprint)
            .field("secret", &"<redacted>")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

const HEX_DIGITS: [char; 16] = [
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f',
];

/// Lowercase only: one canonical spelling per token, so the string the
/// operator holds is exactly the one whose hash is in the log.
fn hex_value(c: char) -> Option<u8> {
    match c {
        '0'..='9' => Some(c as u8 - b'0'),
        'a'..='f' => Some(c as u8 - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use JoinTokenTransitionKind as T;
    use TokenState as S;

    const H: TokenHash = [7; 32];
    const EXPIRY: u64 = 1_000;

    /// A table holding `H` in `state`, registered at 0 and expiring at `EXPIRY`.
    fn table_in(state: S) -> TokenTable {
        let mut t = TokenTable::new();
        t.apply(
            &H,
            &T::Register {
                expires_at_ms: EXPIRY,
            },
            0,
        )
        .unwrap();
        let path: &[T] = match state {
            S::Issued => &[],
            S::InFlight => &[T::Begin],
            S::Consumed => &[T::Begin, T::Consume],
            S::Expired => &[T::Expire],
            S::Aborted => &[T::Abort],
        };
        for step in path {
            let ts = if *step == T::Expire { EXPIRY } else { 10 };
            t.apply(&H, step, ts).unwrap();
        }
        assert_eq!(t.get(&H).unwrap().state, state);
        t
    }

    /// Applies and checks that an `Err` left the table unchanged.
    fn apply_checked(t: &mut TokenTable, tr: T, ts: u64) -> Result<S, TokenError> {
        let before = t.clone();
        let result = t.apply(&H, &tr, ts);
        if result.is_err() {
            assert_eq!(*t, before);
        }
        result
    }

    #[test]
    fn register_creates_an_issued_record() {
        let mut t = TokenTable::new();
        assert!(t.is_empty());
        assert_eq!(
            t.apply(&H, &T::Register { expires_at_ms: 50 }, 5),
            Ok(S::Issued)
        );
        assert_eq!(
            t.get(&H),
            Some(&TokenRecord {
                state: S::Issued,
                issued_at_ms: 5,
                expires_at_ms: 50,
                updated_at_ms: 5
            })
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.iter().count(), 1);
    }

    #[test]
    fn every_legal_transition() {
        let cases = [
            (S::Issued, T::Begin, 10, S::InFlight),
            (S::InFlight, T::Consume, 20, S::Consumed),
            (S::InFlight, T::Revert, 20, S::Issued),
            (S::Issued, T::Expire, EXPIRY, S::Expired),
            (S::InFlight, T::Expire, EXPIRY + 5, S::Expired),
            (S::Issued, T::Abort, 20, S::Aborted),
            (S::InFlight, T::Abort, 20, S::Aborted),
        ];
        for (from, tr, ts, to) in cases {
            let mut t = table_in(from);
            assert_eq!(t.apply(&H, &tr, ts), Ok(to), "{from} --{tr}-->");
            let record = t.get(&H).unwrap();
            assert_eq!((record.state, record.updated_at_ms), (to, ts));
            assert_eq!((record.issued_at_ms, record.expires_at_ms), (0, EXPIRY));
        }
    }

    #[test]
    fn consume_after_expiry_of_an_in_flight_token_succeeds() {
        let mut t = table_in(S::InFlight);
        assert_eq!(t.apply(&H, &T::Consume, EXPIRY + 1), Ok(S::Consumed));
    }

    #[test]
    fn every_illegal_transition_is_refused_unchanged() {
        let states = [S::Issued, S::InFlight, S::Consumed, S::Expired, S::Aborted];
        let moves = [T::Begin, T::Consume, T::Revert, T::Expire, T::Abort];
        let legal = |from: S, tr: T| {
            matches!(
                (from, tr),
                (S::Issued, T::Begin)
                    | (S::InFlight, T::Consume | T::Revert)
                    | (S::Issued | S::InFlight, T::Expire | T::Abort)
            )
        };
        let mut refused = 0;
        for from in states {
            for tr in moves.into_iter().filter(|&tr| !legal(from, tr)) {
                let mut t = table_in(from);
                assert_eq!(
                    apply_checked(&mut t, tr, EXPIRY + 1),
                    Err(TokenError::IllegalTransition {
                        from,
                        transition: tr
                    })
                );
                refused += 1;
            }
        }
        // 25 pairs minus the 7 legal ones.
        assert_eq!(refused, 18);
    }

    #[test]
    fn register_twice_is_refused_in_every_state() {
        for state in [S::Issued, S::InFlight, S::Consumed, S::Expired, S::Aborted] {
            let mut t = table_in(state);
            assert_eq!(
                apply_checked(
                    &mut t,
                    T::Register {
                        expires_at_ms: 9_999
                    },
                    10
                ),
                Err(TokenError::AlreadyRegistered)
            );
        }
    }

    #[test]
    fn unknown_token_is_refused() {
        for tr in [T::Begin, T::Consume, T::Revert, T::Expire, T::Abort] {
            let mut t = TokenTable::new();
            assert_eq!(t.apply(&H, &tr, 10), Err(TokenError::UnknownToken));
            assert!(t.is_empty());
        }
    }

    #[test]
    fn register_with_expiry_not_after_issue_is_refused() {
        let mut t = TokenTable::new();
        for expires_at_ms in [99, 100] {
            assert_eq!(
                t.apply(&H, &T::Register { expires_at_ms }, 100),
                Err(TokenError::ExpiryNotAfterIssue {
                    issued_at_ms: 100,
                    expires_at_ms
                })
            );
        }
        assert!(t.is_empty());
        assert_eq!(
            t.apply(&H, &T::Register { expires_at_ms: 101 }, 100),
            Ok(S::Issued)
        );
    }

    #[test]
    fn begin_at_or_after_expiry_is_refused_and_state_kept() {
        for ts_ms in [EXPIRY, EXPIRY + 1] {
            let mut t = table_in(S::Issued);
            assert_eq!(
                apply_checked(&mut t, T::Begin, ts_ms),
                Err(TokenError::Expired {
                    expires_at_ms: EXPIRY,
                    ts_ms
                })
            );
            assert_eq!(t.get(&H).unwrap().state, S::Issued);
        }
        let mut t = table_in(S::Issued);
        assert_eq!(t.apply(&H, &T::Begin, EXPIRY - 1), Ok(S::InFlight));
    }

    #[test]
    fn expire_before_expiry_is_refused() {
        for from in [S::Issued, S::InFlight] {
            let mut t = table_in(from);
            assert_eq!(
                apply_checked(&mut t, T::Expire, EXPIRY - 1),
                Err(TokenError::NotYetExpired {
                    expires_at_ms: EXPIRY,
                    ts_ms: EXPIRY - 1
                })
            );
        }
    }

    #[test]
    fn revert_then_begin_again_works() {
        let mut t = table_in(S::InFlight);
        assert_eq!(t.apply(&H, &T::Revert, 20), Ok(S::Issued));
        assert_eq!(t.apply(&H, &T::Begin, 30), Ok(S::InFlight));
        assert_eq!(t.apply(&H, &T::Consume, 40), Ok(S::Consumed));
        assert_eq!(
            t.apply(&H, &T::Consume, 50),
            Err(TokenError::IllegalTransition {
                from: S::Consumed,
                transition: T::Consume
            })
        );
    }

    #[test]
    fn errors_read_as_sentences() {
        let e = TokenError::IllegalTransition {
            from: S::Consumed,
            transition: T::Begin,
        };
        assert_eq!(
            e.to_string(),
            "the join token is Consumed, so it cannot take the Begin transition"
        );
    }

    fn sample_token() -> JoinToken {
        JoinToken {
            ca_fingerprint: [0xab; 32],
            secret: [0x01; 32],
            expires_at_ms: 0x0102_0304_0506_0708,
        }
    }

    #[test]
    fn token_string_has_the_documented_layout() {
        let s = sample_token().encode();
        assert_eq!(s.len(), TOKEN_LEN);
        let payload_hex = format!("{}{}0102030405060708", "ab".repeat(32), "01".repeat(32));
        let mut payload = vec![0xab; 32];
        payload.extend([0x01; 32]);
        payload.extend(0x0102_0304_0506_0708u64.to_be_bytes());
        let expected = format!(
            "keel-join-v1.{payload_hex}.{:08x}",
            crc32c::crc32c(&payload)
        );
        assert_eq!(s, expected);
        assert_eq!(sample_token().to_string(), s);
        let hash: TokenHash = Sha256::digest(s.as_bytes()).into();
        assert_eq!(sample_token().hash(), hash);
    }

    #[test]
    fn parse_trims_whitespace() {
        let s = format!("  \n{}\t ", sample_token());
        assert_eq!(JoinToken::parse(&s), Ok(sample_token()));
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let good = sample_token().encode();
        assert_eq!(JoinToken::parse(""), Err(TokenParseError::WrongPrefix));
        assert_eq!(
            JoinToken::parse(&good.replace("v1", "v2")),
            Err(TokenParseError::WrongPrefix)
        );
        assert_eq!(
            JoinToken::parse(&good[..good.len() - 1]),
            Err(TokenParseError::WrongLength {
                found: TOKEN_LEN - 1
            })
        );
        // Position 14 is the first payload character.
        let bad_hex = good.replacen("keel-join-v1.a", "keel-join-v1.A", 1);
        assert_eq!(
            JoinToken::parse(&bad_hex),
            Err(TokenParseError::NotHex {
                position: 14,
                found: 'A'
            })
        );
        let mut no_dot = good.clone();
        no_dot.replace_range(157..158, "0");
        assert_eq!(
            JoinToken::parse(&no_dot),
            Err(TokenParseError::MissingSeparator {
                position: 158,
                found: '0'
            })
        );
        let mut typo = good.clone();
        typo.replace_range(20..21, "0");
        assert_eq!(
            JoinToken::parse(&typo),
            Err(TokenParseError::ChecksumMismatch)
        );
        // A multi-byte character counts as one position.
        let mut unicode = good.clone();
        unicode.replace_range(20..21, "é");
        assert_eq!(
            JoinToken::parse(&unicode),
            Err(TokenParseError::NotHex {
                position: 21,
                found: 'é'
            })
        );
    }

    #[test]
    fn debug_does_not_reveal_the_secret() {
        let token = JoinToken {
            secret: [0x5c; 32],
            ..sample_token()
        };
        let debug = format!("{token:?}");
        assert!(!debug.contains("5c5c"), "{debug}");
        assert!(!debug.contains("92, 92"), "{debug}"); // 0x5c = 92
        assert!(debug.contains("<redacted>"));
    }

    fn transition() -> impl Strategy<Value = T> {
        prop_oneof![
            (0u64..60).prop_map(|expires_at_ms| T::Register { expires_at_ms }),
            Just(T::Begin),
            Just(T::Consume),
            Just(T::Revert),
            Just(T::Expire),
            Just(T::Abort),
        ]
    }

    fn join_token() -> impl Strategy<Value = JoinToken> {
        (any::<[u8; 32]>(), any::<[u8; 32]>(), any::<u64>()).prop_map(
            |(ca_fingerprint, secret, expires_at_ms)| JoinToken {
                ca_fingerprint,
                secret,
                expires_at_ms,
            },
        )
    }

    proptest! {
        /// No sequence of transitions consumes a token twice; terminal states
        /// are final; a refused transition changes nothing.
        #[test]
        fn no_sequence_of_token_transitions_consumes_a_token_twice(
            steps in proptest::collection::vec((0usize..3, transition(), 0u64..80), 0..200)
        ) {
            let hashes: [TokenHash; 3] = [[1; 32], [2; 32], [3; 32]];
            let mut table = TokenTable::new();
            let mut consumed = [0u32; 3];
            let mut terminal: [Option<TokenRecord>; 3] = [None; 3];
            for (i, tr, ts) in steps {
                let before = table.clone();
                match table.apply(&hashes[i], &tr, ts) {
                    Ok(state) => {
                        prop_assert_eq!(table.get(&hashes[i]).map(|r| r.state), Some(state));
                        if tr == T::Consume {
                            consumed[i] += 1;
                        }
                    }
                    Err(_) => prop_assert_eq!(&table, &before),
                }
                for j in 0..3 {
                    prop_assert!(consumed[j] <= 1);
                    let now = table.get(&hashes[j]).copied();
                    match terminal[j] {
                        Some(fixed) => prop_assert_eq!(now, Some(fixed)),
                        None => terminal[j] = now.filter(|r| r.state.is_terminal()),
                    }
                }
            }
        }

        #[test]
        fn join_token_round_trips(token in join_token()) {
            let s = token.encode();
            prop_assert_eq!(s.len(), TOKEN_LEN);
            prop_assert_eq!(JoinToken::parse(&s), Ok(token));
        }

        #[test]
        fn parse_of_arbitrary_strings_never_panics(s in any::<String>(), t in "\\PC*") {
            let _ = JoinToken::parse(&s);
            let _ = JoinToken::parse(&t);
            let _ = JoinToken::parse(&format!("{TOKEN_PREFIX}{s}"));
        }

        /// A valid token with one character replaced is always refused.
        #[test]
        fn mutated_tokens_are_refused(
            token in join_token(),
            index in 0usize..TOKEN_LEN,
            replacement in any::<char>(),
        ) {
            let s = token.encode();
            let mut chars: Vec<char> = s.chars().collect();
            prop_assume!(chars[index] != replacement);
            chars[index] = replacement;
            let mutated: String = chars.into_iter().collect();
            prop_assert!(JoinToken::parse(&mutated).is_err(), "{} accepted", mutated);
        }

        /// Also with a hex digit replaced by another hex digit (the typo the
        /// checksum exists to catch).
        #[test]
        fn hex_typos_are_refused(
            token in join_token(),
            index in TOKEN_PREFIX.len()..TOKEN_LEN,
            digit in 0usize..16,
        ) {
            let s = token.encode();
            let mut chars: Vec<char> = s.chars().collect();
            prop_assume!(chars[index] != '.' && chars[index] != HEX_DIGITS[digit]);
            chars[index] = HEX_DIGITS[digit];
            let mutated: String = chars.into_iter().collect();
            prop_assert_eq!(JoinToken::parse(&mutated), Err(TokenParseError::ChecksumMismatch));
        }

        #[test]
        fn truncated_or_extended_tokens_are_refused(
            token in join_token(),
            len in 0usize..TOKEN_LEN,
            extra in "[0-9a-f.]{1,4}",
        ) {
            let s = token.encode();
            prop_assert!(JoinToken::parse(&s[..len]).is_err());
            let extended = format!("{s}{extra}");
            prop_assert!(JoinToken::parse(&extended).is_err());
        }

        #[test]
        fn transition_and_record_postcard_round_trip(
            tr in transition(),
            state in prop_oneof![
                Just(S::Issued), Just(S::InFlight), Just(S::Consumed),
                Just(S::Expired), Just(S::Aborted)
            ],
            times in any::<(u64, u64, u64)>(),
        ) {
            let bytes = postcard::to_allocvec(&tr).unwrap();
            prop_assert_eq!(postcard::from_bytes::<T>(&bytes).unwrap(), tr);
            let record = TokenRecord {
                state,
                issued_at_ms: times.0,
                expires_at_ms: times.1,
                updated_at_ms: times.2,
            };
            let bytes = postcard::to_allocvec(&record).unwrap();
            prop_assert_eq!(postcard::from_bytes::<TokenRecord>(&bytes).unwrap(), record);
        }
    }
}
