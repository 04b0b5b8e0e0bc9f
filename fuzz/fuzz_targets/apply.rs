//! The metadata applier fed arbitrary committed bytes: every input is either
//! applied, deterministically rejected, or fail-stops the group — never a
//! panic. Input: a sequence of `u16 length | bytes` committed entries.
#![no_main]

use keel::core::cache::{Bootstrap, MetadataCache};
use keel::core::ids::NodeId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cache = MetadataCache::bootstrap(&Bootstrap {
        cluster_id: [0; 16],
        node_id: NodeId::new(1).unwrap(),
        addr: "127.0.0.1:7000".into(),
        data_groups: 4,
        replication_factor: 3,
        ca_cert_der: b"fuzz CA".to_vec(),
    })
    .unwrap();
    let mut entries = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        entries.push((entries.len() as u64 + 1, rest[2..2 + len].to_vec()));
        rest = &rest[2 + len..];
    }
    let _ = cache.apply(&entries, &mut ());
});
