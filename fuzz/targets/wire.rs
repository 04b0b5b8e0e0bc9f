//! Decoding one frame as one wire type, with the checks every decoder
//! target shares: bounded allocation, an error that names the right
//! defect, and a round trip for whatever decodes.

use super::alloc;
use super::{check_message, Verdict};
use keel::core::codec::{self, CodecError, Wire, FORMAT_VERSION, HEADER_LEN, MAX_BODY_LEN};
use std::fmt::Debug;

/// Decodes `frame` as a `T` under the allocation bound and checks the
/// outcome: a value must survive re-encoding (in the format version it was
/// read in) and decoding again unchanged; an error must have a message and
/// must blame the first defect of the header, if it has one.
pub(crate) fn decode_checked<T: Wire + PartialEq + Debug>(frame: &[u8]) -> Option<T> {
    let what = std::any::type_name::<T>();
    let result = alloc::bounded(what, frame.len(), || codec::decode_versioned::<T>(frame));
    match result {
        Ok((value, version)) => {
            let again = codec::encode_with_version(&value, version);
            match codec::decode_versioned::<T>(&again) {
                Ok((decoded, v)) => {
                    assert_eq!(v, version, "{what}: re-encoding changed the version");
                    assert_eq!(
                        decoded, value,
                        "{what}: re-encoded value decodes differently"
                    );
                }
                Err(e) => panic!("{what}: re-encoded value {value:?} does not decode: {e}"),
            }
            // Re-encoding writes the shortest form, so it is never longer
            // than what was read: a longer one would mean the decoder
            // invented data that was not in the frame.
            assert!(
                again.len() <= frame.len(),
                "{what}: {} input bytes re-encode to {} bytes",
                frame.len(),
                again.len()
            );
            Some(value)
        }
        Err(e) => {
            check_error::<T>(frame, &e);
            None
        }
    }
}

/// Wraps `body` in a valid header of `T`'s kind and decodes it: the
/// checksum would otherwise stop nearly every mutated input before postcard
/// ever sees it.
pub(crate) fn decode_sealed<T: Wire + PartialEq + Debug>(body: &[u8]) -> Option<T> {
    let frame = codec::seal(T::KIND, FORMAT_VERSION, body);
    decode_checked::<T>(&frame)
}

/// The verdict of decoding `frame` as `T`.
pub(crate) fn verdict<T>(decoded: &Option<T>) -> Verdict {
    if decoded.is_some() {
        Verdict::Accepted
    } else {
        Verdict::Rejected
    }
}

/// Checks that a refused frame was refused for the first thing wrong with
/// its header, and that a frame with a sound header is only ever refused
/// for its body.
fn check_error<T: Wire>(frame: &[u8], error: &CodecError) {
    check_message(error);
    let what = std::any::type_name::<T>();
    if frame.len() < HEADER_LEN {
        assert_eq!(
            error,
            &CodecError::TooShort { len: frame.len() },
            "{what}: short frame"
        );
        return;
    }
    if frame[0] != T::KIND as u8 {
        assert!(
            matches!(error, CodecError::BadMagic { found, .. } if *found == frame[0]),
            "{what}: wrong magic reported as {error:?}"
        );
        return;
    }
    let declared = u32::from_be_bytes([frame[3], frame[4], frame[5], frame[6]]) as usize;
    let sound_header = declared <= MAX_BODY_LEN
        && declared == frame.len() - HEADER_LEN
        && codec::open(T::KIND, frame).is_ok();
    let body_error = matches!(
        error,
        CodecError::Body(_) | CodecError::TrailingBytes(_) | CodecError::TooDeep
    );
    assert_eq!(
        sound_header, body_error,
        "{what}: error {error:?} does not match the frame's header"
    );
}
