//! The envelope and `MetadataRecord` decoder on untrusted bytes: must return
//! an error or a value that re-encodes to the same bytes, never panic.
#![no_main]

use keel::core::codec;
use keel::core::entry::MetadataRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = codec::decode::<MetadataRecord>(data) {
        assert_eq!(record.encode(), data, "decode/encode must be canonical");
    }
});
