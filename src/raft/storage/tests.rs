use super::rows::encode_entry;
use super::*;
use crate::core::codec::{self, FrameKind};
use crate::core::ids::GroupId;
use proptest::prelude::*;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::GetEntriesContext;
use raft::{RawNode, Storage};
use redb::backends::InMemoryBackend;
use redb::{Database, ReadableDatabase, TableDefinition};
use std::path::Path;
use std::sync::Arc;

const G1: GroupId = GroupId(1);

/// Compaction records the membership at the snapshot point, which is
/// what a restart must begin from (simulator seed 2 found a restarted
/// node electing itself under the older, single-voter configuration).
#[test]
fn compaction_persists_the_membership_at_the_snapshot() {
    let db = memory_db();
    let store = RaftStore::new(Arc::clone(&db));
    let storage = store.open_group(G1, &[1]).expect("open");
    let mut batch = WriteBatch::default();
    batch.append(&storage, &[entry(1, 1), entry(2, 1), entry(3, 1)]);
    let hs = HardState {
        term: 1,
        commit: 3,
        ..Default::default()
    };
    batch.set_hard_state(&storage, &hs);
    store.write(batch).expect("write");
    let grown = ConfState {
        voters: vec![1, 2, 4],
        ..Default::default()
    };
    let mut batch = WriteBatch::default();
    batch.compact(&storage, 3, 1, &grown, b"state".to_vec());
    store.write(batch).expect("compact");
    drop(storage);
    let reopened = RaftStore::new(db).open_group(G1, &[]).expect("reopen");
    let state = reopened.initial_state().expect("initial state");
    assert_eq!(state.conf_state.voters, vec![1, 2, 4]);
}
const G2: GroupId = GroupId(2);
const G3: GroupId = GroupId(3);

fn memory_db() -> Arc<Database> {
    Arc::new(
        Database::builder()
            .create_with_backend(InMemoryBackend::new())
            .expect("in-memory database"),
    )
}

fn file_db(path: &Path) -> Arc<Database> {
    Arc::new(Database::create(path).expect("file database"))
}

/// Every write commits in two phases (see [`begin_durable_write`]).
/// redb flags a primary committed so in its god byte: byte 9 of the
/// file, flag 4.
#[test]
fn writes_commit_in_two_phases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("raft.redb");
    let db = file_db(&path);
    let two_phase = || std::fs::read(&path).expect("read the file")[9] & 4 != 0;
    let one_phase_commit = || db.begin_write().expect("begin").commit().expect("commit");
    let store = RaftStore::new(Arc::clone(&db));
    one_phase_commit();
    assert!(!two_phase(), "a plain redb commit is one phase");
    let storage = store.open_group(G1, &[1]).expect("open");
    let mut batch = WriteBatch::default();
    batch.append(&storage, &[entry(1, 1)]);
    store.write(batch).expect("write");
    assert!(two_phase(), "a batch write");
    drop(storage);
    one_phase_commit();
    store.destroy_group(G1).expect("destroy");
    assert!(two_phase(), "a group's destruction");
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("entry {index} of term {term}").into_bytes().into(),
        ..Entry::default()
    }
}

fn entries(indexes: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    indexes.map(|i| entry(i, term)).collect()
}

fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
    ConfState::from((voters.iter().copied(), learners.iter().copied()))
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..HardState::default()
    }
}

fn read_all(storage: &GroupStorage, low: u64, high: u64) -> raft::Result<Vec<Entry>> {
    storage.entries(low, high, None, GetEntriesContext::empty(false))
}

fn write(store: &RaftStore, f: impl FnOnce(&mut WriteBatch)) -> Result<(), StorageError> {
    let mut batch = WriteBatch::default();
    f(&mut batch);
    store.write(batch)
}

/// The storage error inside a raft error, if it is one of ours.
fn ours(error: &raft::Error) -> Option<&StorageError> {
    match error {
        raft::Error::Store(raft::StorageError::Other(inner)) => inner.downcast_ref(),
        _ => None,
    }
}

fn compacted<T>() -> raft::Result<T> {
    Err(raft::Error::Store(raft::StorageError::Compacted))
}

fn unavailable<T>() -> raft::Result<T> {
    Err(raft::Error::Store(raft::StorageError::Unavailable))
}

fn put_raw_entry(db: &Database, group: GroupId, index: u64, bytes: &[u8]) {
    let txn = db.begin_write().expect("begin write");
    {
        let mut table = txn.open_table(RAFT_LOG).expect("open log");
        table.insert((group.0, index), bytes).expect("insert");
    }
    txn.commit().expect("commit");
}

fn stored_keys(db: &Database, group: GroupId) -> Vec<u64> {
    let txn = db.begin_read().expect("begin read");
    let table = txn.open_table(RAFT_LOG).expect("open log");
    table
        .range((group.0, 0)..=(group.0, u64::MAX))
        .expect("range")
        .map(|item| item.expect("item").0.value().1)
        .collect()
}

/// A group with entries 1..=5 of term 1, all committed.
fn five_entries(store: &RaftStore, group: GroupId) -> GroupStorage {
    let storage = store.open_group(group, &[1]).expect("open");
    write(store, |b| {
        b.append(&storage, &entries(1..=5, 1));
        b.set_commit(&storage, 5);
    })
    .expect("write");
    storage
}

#[test]
fn group_storage_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<GroupStorage>();
    check::<RaftStore>();
    check::<WriteBatch>();
}

#[test]
fn a_bootstrap_group_starts_from_its_voters_and_a_joining_one_from_nothing() {
    let store = RaftStore::new(memory_db());
    let boot = store.open_group(G1, &[1, 2, 3]).expect("open");
    let state = boot.initial_state().expect("state");
    assert!(state.initialized());
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    assert_eq!((boot.first_index(), boot.last_index()), (1, 0));
    assert_eq!(boot.term(0), Ok(0));
    let joining = store.open_group(G2, &[]).expect("open");
    assert!(!joining.initial_state().expect("state").initialized());
    // Nothing is persisted until the first write.
    assert_eq!(store.groups(), Ok(vec![]));
    write(&store, |b| b.set_applied(&boot, 0)).expect("write");
    assert_eq!(store.groups(), Ok(vec![G1]));
    assert_eq!(
        RaftStore::new(Arc::clone(&store.db))
            .open_group(G1, &[])
            .expect("reopen")
            .conf_state()
            .voters,
        vec![1, 2, 3]
    );
}

#[test]
fn appended_entries_read_back_with_terms_and_bounds() {
    let store = RaftStore::new(memory_db());
    let storage = store.open_group(G1, &[1]).expect("open");
    let mut ents = entries(1..=3, 1);
    ents.extend(entries(4..=5, 2));
    write(&store, |b| b.append(&storage, &ents)).expect("write");
    assert_eq!((storage.first_index(), storage.last_index()), (1, 5));
    assert_eq!(Storage::first_index(&storage), Ok(1));
    assert_eq!(Storage::last_index(&storage), Ok(5));
    assert_eq!(read_all(&storage, 1, 6), Ok(ents.clone()));
    assert_eq!(read_all(&storage, 2, 4), Ok(ents[1..3].to_vec()));
    assert_eq!(read_all(&storage, 3, 3), Ok(vec![]));
    assert_eq!(storage.term(0), Ok(0));
    assert_eq!(storage.term(3), Ok(1));
    assert_eq!(storage.term(4), Ok(2));
    assert_eq!(storage.term(6), unavailable());
    assert_eq!(read_all(&storage, 0, 2), compacted());
    assert_eq!(read_all(&storage, 1, 7), unavailable());
    assert_eq!(read_all(&storage, 4, 3), unavailable());
    // max_size: always at least one entry, then as many as fit.
    let one = u64::from(ents[0].compute_size());
    let ctx = || GetEntriesContext::empty(false);
    assert_eq!(storage.entries(1, 6, 0, ctx()), Ok(ents[..1].to_vec()));
    assert_eq!(
        storage.entries(1, 6, 2 * one, ctx()),
        Ok(ents[..2].to_vec())
    );
    assert_eq!(
        storage.entries(1, 6, raft::NO_LIMIT, ctx()),
        Ok(ents.clone())
    );
}

#[test]
fn a_conflicting_append_truncates_the_suffix_durably() {
    let db = memory_db();
    let store = RaftStore::new(Arc::clone(&db));
    let storage = store.open_group(G1, &[1]).expect("open");
    write(&store, |b| {
        b.append(&storage, &entries(1..=5, 1));
        b.set_commit(&storage, 2);
    })
    .expect("write");
    write(&store, |b| b.append(&storage, &entries(3..=4, 2))).expect("truncate");
    let mut expected = entries(1..=2, 1);
    expected.extend(entries(3..=4, 2));
    assert_eq!(storage.last_index(), 4);
    assert_eq!(storage.term(3), Ok(2));
    assert_eq!(storage.term(5), unavailable());
    assert_eq!(read_all(&storage, 1, 5), Ok(expected.clone()));
    assert_eq!(stored_keys(&db, G1), vec![1, 2, 3, 4]);
    // The same batch can truncate what it appended itself.
    write(&store, |b| {
        b.append(&storage, &entries(5..=8, 2));
        b.append(&storage, &entries(4..=5, 3));
    })
    .expect("write");
    expected.truncate(3);
    expected.extend(entries(4..=5, 3));
    assert_eq!(read_all(&storage, 1, 6), Ok(expected.clone()));
    assert_eq!(stored_keys(&db, G1), vec![1, 2, 3, 4, 5]);
    let reopened = RaftStore::new(db).open_group(G1, &[]).expect("reopen");
    assert_eq!(read_all(&reopened, 1, 6), Ok(expected));
}

#[test]
fn invalid_operations_fail_the_whole_batch_and_change_nothing() {
    let db = memory_db();
    let store = RaftStore::new(Arc::clone(&db));
    let storage = five_entries(&store, G1);
    let other = store.open_group(G2, &[1]).expect("open");
    let mut shifted = entries(6..=7, 1);
    shifted[1].index = 9;
    type Case<'a> = (&'a str, Box<dyn Fn(&mut WriteBatch) + 'a>);
    let cases: Vec<Case> = vec![
        ("gap", Box::new(|b| b.append(&storage, &entries(7..=8, 1)))),
        ("not contiguous", Box::new(|b| b.append(&storage, &shifted))),
        (
            "index space",
            Box::new(|b| b.append(&storage, &[entry(u64::MAX, 1)])),
        ),
        (
            "truncates below commit",
            Box::new(|b| b.append(&storage, &entries(3..=4, 2))),
        ),
        ("commit beyond log", Box::new(|b| b.set_commit(&storage, 6))),
        (
            "applied beyond commit",
            Box::new(|b| b.set_applied(&storage, 6)),
        ),
        (
            "compaction beyond commit",
            Box::new(|b| {
                b.append(&storage, &entries(6..=6, 1));
                b.compact(&storage, 6, 1, &conf(&[1], &[]), vec![]);
            }),
        ),
        (
            "compaction with the wrong term",
            Box::new(|b| b.compact(&storage, 3, 2, &conf(&[1], &[]), vec![])),
        ),
        (
            "compaction beyond the log",
            Box::new(|b| {
                b.set_commit(&storage, 5);
                b.compact(&storage, 9, 1, &conf(&[1], &[]), vec![]);
            }),
        ),
        (
            "compaction at the snapshot",
            Box::new(|b| b.compact(&storage, 0, 0, &conf(&[1], &[]), vec![])),
        ),
        (
            "stale snapshot",
            Box::new(|b| {
                b.apply_snapshot(&storage, &Snapshot::default());
            }),
        ),
        (
            "one bad group fails the others",
            Box::new(|b| {
                b.append(&other, &entries(1..=1, 1));
                b.append(&storage, &entries(9..=9, 1));
            }),
        ),
    ];
    let before = read_all(&storage, 1, 6).expect("read");
    for (name, case) in cases {
        let result = write(&store, |b| case(b));
        assert!(
            matches!(result, Err(StorageError::InvalidWrite { .. })),
            "{name}: {result:?}"
        );
        assert_eq!(read_all(&storage, 1, 6), Ok(before.clone()), "{name}");
        assert_eq!(storage.hard_state(), hard_state(0, 0, 5), "{name}");
        assert_eq!((storage.applied(), storage.first_index()), (0, 1), "{name}");
        assert_eq!(stored_keys(&db, G1), vec![1, 2, 3, 4, 5], "{name}");
        assert_eq!(other.last_index(), 0, "{name}");
    }
    assert_eq!(store.groups(), Ok(vec![G1]));
    // A storage of another database is refused too.
    let foreign_store = RaftStore::new(memory_db());
    let foreign = foreign_store.open_group(G3, &[1]).expect("open");
    let result = write(&store, |b| b.set_applied(&foreign, 0));
    assert!(matches!(result, Err(StorageError::InvalidWrite { .. })));
    assert_eq!(store.groups(), Ok(vec![G1]));
}

#[test]
fn a_batch_staged_before_another_write_is_refused() {
    let store = RaftStore::new(memory_db());
    let storage = five_entries(&store, G1);
    let mut first = WriteBatch::default();
    first.append(&storage, &entries(6..=6, 1));
    let mut second = WriteBatch::default();
    second.append(&storage, &entries(6..=7, 1));
    store.write(first).expect("first write");
    assert_eq!(
        store.write(second),
        Err(StorageError::Conflict { group: G1 })
    );
    assert_eq!(storage.last_index(), 6);
}

#[test]
fn opening_an_open_group_shares_its_state() {
    let store = RaftStore::new(memory_db());
    let a = store.open_group(G1, &[1]).expect("open");
    let b = store.open_group(G1, &[7]).expect("open again");
    write(&store, |batch| batch.append(&a, &entries(1..=2, 1))).expect("write");
    assert_eq!(b.last_index(), 2);
    assert_eq!(b.conf_state().voters, vec![1]);
}

#[test]
fn hard_state_conf_state_and_applied_survive_a_reopen_from_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("raft.redb");
    let cs = {
        let mut cs = conf(&[1, 2, 3], &[4]);
        cs.voters_outgoing = vec![1, 2, 5];
        cs.learners_next = vec![5];
        cs.auto_leave = true;
        cs
    };
    {
        let store = RaftStore::new(file_db(&path));
        let g1 = store.open_group(G1, &[1]).expect("open");
        let g2 = store.open_group(G2, &[1]).expect("open");
        write(&store, |b| {
            b.append(&g1, &entries(1..=4, 3));
            b.set_hard_state(&g1, &hard_state(3, 2, 4));
            b.set_conf_state(&g1, &cs);
            b.set_applied(&g1, 3);
            b.append(&g2, &entries(1..=1, 1));
        })
        .expect("write");
    }
    let store = RaftStore::new(file_db(&path));
    assert_eq!(store.groups(), Ok(vec![G1, G2]));
    let g1 = store.open_group(G1, &[9]).expect("reopen");
    let state = g1.initial_state().expect("state");
    assert_eq!(state.hard_state, hard_state(3, 2, 4));
    assert_eq!(state.conf_state, cs);
    assert_eq!(g1.applied(), 3);
    assert_eq!((g1.first_index(), g1.last_index()), (1, 4));
    assert_eq!(read_all(&g1, 1, 5), Ok(entries(1..=4, 3)));
    let g2 = store.open_group(G2, &[]).expect("reopen");
    assert_eq!(read_all(&g2, 1, 2), Ok(entries(1..=1, 1)));
}

#[test]
fn compaction_stores_the_snapshot_and_drops_the_prefix() {
    let db = memory_db();
    let store = RaftStore::new(Arc::clone(&db));
    let storage = store.open_group(G1, &[1]).expect("open");
    assert_eq!(storage.snapshot_data(), Ok(None));
    assert_eq!(
        storage.snapshot(0, 2),
        Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable
        ))
    );
    let mut ents = entries(1..=3, 1);
    ents.extend(entries(4..=6, 2));
    let cs = conf(&[1, 2], &[3]);
    write(&store, |b| {
        b.append(&storage, &ents);
        b.set_commit(&storage, 5);
        b.compact(&storage, 4, 2, &cs, b"state at 4".to_vec());
    })
    .expect("write");
    assert_eq!((storage.first_index(), storage.last_index()), (5, 6));
    assert_eq!(storage.applied(), 4);
    assert_eq!(storage.term(4), Ok(2));
    assert_eq!(storage.term(3), compacted());
    assert_eq!(read_all(&storage, 4, 7), compacted());
    assert_eq!(read_all(&storage, 5, 7), Ok(ents[4..].to_vec()));
    assert_eq!(stored_keys(&db, G1), vec![5, 6]);
    let snapshot = storage.snapshot(0, 2).expect("snapshot");
    assert_eq!(snapshot.get_data(), b"state at 4");
    let meta = snapshot.get_metadata();
    assert_eq!((meta.index, meta.term), (4, 2));
    assert_eq!(meta.get_conf_state(), &cs);
    assert_eq!(storage.snapshot(4, 2), Ok(snapshot.clone()));
    assert_eq!(
        storage.snapshot(5, 2),
        Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable
        ))
    );
    let (data_meta, data) = storage.snapshot_data().expect("read").expect("stored");
    assert_eq!((data_meta, data), (meta.clone(), b"state at 4".to_vec()));
    let reopened = RaftStore::new(db).open_group(G1, &[]).expect("reopen");
    assert_eq!((reopened.first_index(), reopened.last_index()), (5, 6));
    assert_eq!(reopened.term(4), Ok(2));
    assert_eq!(reopened.snapshot(0, 2), Ok(snapshot));
}

#[test]
fn an_applied_snapshot_replaces_the_log() {
    let db = memory_db();
    let store = RaftStore::new(Arc::clone(&db));
    let storage = store.open_group(G1, &[]).expect("open");
    write(&store, |b| {
        b.append(&storage, &entries(1..=5, 1));
        b.set_hard_state(&storage, &hard_state(1, 1, 3));
    })
    .expect("write");
    let mut snapshot = Snapshot {
        data: b"leader state".to_vec().into(),
        ..Snapshot::default()
    };
    snapshot.mut_metadata().index = 10;
    snapshot.mut_metadata().term = 4;
    snapshot
        .mut_metadata()
        .set_conf_state(conf(&[1, 2, 3], &[]));
    write(&store, |b| b.apply_snapshot(&storage, &snapshot)).expect("write");
    assert_eq!((storage.first_index(), storage.last_index()), (11, 10));
    assert_eq!(storage.term(10), Ok(4));
    assert_eq!(storage.hard_state(), hard_state(4, 1, 10));
    assert_eq!(storage.applied(), 10);
    assert_eq!(storage.conf_state(), conf(&[1, 2, 3], &[]));
    assert_eq!(read_all(&storage, 1, 6), compacted());
    assert_eq!(stored_keys(&db, G1), Vec::<u64>::new());
    assert_eq!(storage.snapshot(10, 2), Ok(snapshot.clone()));
    // The log continues after the snapshot.
    write(&store, |b| b.append(&storage, &entries(11..=12, 4))).expect("write");
    let reopened = RaftStore::new(db).open_group(G1, &[]).expect("reopen");
    assert_eq!(reopened.hard_state(), hard_state(4, 1, 10));
    assert_eq!(read_all(&reopened, 11, 13), Ok(entries(11..=12, 4)));
    assert_eq!(reopened.snapshot(0, 2), Ok(snapshot));
}

#[test]
fn groups_in_one_batch_are_isolated() {
    let db = memory_db();
    let store = RaftStore::new(Arc::clone(&db));
    let groups: Vec<GroupStorage> = [G1, G2, G3]
        .iter()
        .map(|&g| store.open_group(g, &[1]).expect("open"))
        .collect();
    write(&store, |b| {
        for (term, storage) in (1..).zip(&groups) {
            b.append(storage, &entries(1..=5, term));
            b.set_hard_state(storage, &hard_state(term, 1, 5));
        }
    })
    .expect("write");
    // The middle group drops its whole log; its neighbours keep theirs.
    let mut snapshot = Snapshot::default();
    snapshot.mut_metadata().index = 7;
    snapshot.mut_metadata().term = 9;
    write(&store, |b| {
        b.apply_snapshot(&groups[1], &snapshot);
        b.compact(&groups[2], 2, 3, &conf(&[1], &[]), vec![3]);
    })
    .expect("write");
    assert_eq!(stored_keys(&db, G1), vec![1, 2, 3, 4, 5]);
    assert_eq!(stored_keys(&db, G2), Vec::<u64>::new());
    assert_eq!(stored_keys(&db, G3), vec![3, 4, 5]);
    let reopened = RaftStore::new(db);
    assert_eq!(reopened.groups(), Ok(vec![G1, G2, G3]));
    let g1 = reopened.open_group(G1, &[]).expect("open");
    assert_eq!(read_all(&g1, 1, 6), Ok(entries(1..=5, 1)));
    assert_eq!(g1.hard_state(), hard_state(1, 1, 5));
    let g2 = reopened.open_group(G2, &[]).expect("open");
    assert_eq!((g2.first_index(), g2.last_index()), (8, 7));
    let g3 = reopened.open_group(G3, &[]).expect("open");
    assert_eq!(read_all(&g3, 3, 6), Ok(entries(3..=5, 3)));
    assert_eq!(
        g3.snapshot_data().expect("read").map(|s| s.1),
        Some(vec![3])
    );
}

#[test]
fn corrupt_log_entries_are_clean_errors() {
    let db = memory_db();
    let store = RaftStore::new(Arc::clone(&db));
    let storage = five_entries(&store, G1);
    let good = encode_entry(&entry(2, 1)).expect("encode");
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    let misplaced = encode_entry(&entry(3, 1)).expect("encode");
    let not_protobuf = codec::seal(FrameKind::Row, codec::FORMAT_VERSION, &[0xFF; 7]);
    for bad in [b"garbage".to_vec(), flipped, misplaced, not_protobuf] {
        put_raw_entry(&db, G1, 2, &bad);
        let error = read_all(&storage, 1, 4).expect_err("corrupt entry served");
        assert!(
            matches!(ours(&error), Some(StorageError::Corrupt { group: G1, .. })),
            "{error:?}"
        );
        assert!(matches!(
            RaftStore::new(Arc::clone(&db)).open_group(G1, &[]),
            Err(StorageError::Corrupt { group: G1, .. })
        ));
        // Other entries still read.
        assert_eq!(read_all(&storage, 3, 6), Ok(entries(3..=5, 1)));
    }
    put_raw_entry(&db, G1, 2, &good);
    assert_eq!(read_all(&storage, 1, 6), Ok(entries(1..=5, 1)));
    // A missing entry, a stray one, and entries without a state row.
    {
        let txn = db.begin_write().expect("begin write");
        txn.open_table(RAFT_LOG)
            .expect("open log")
            .remove((G1.0, 3))
            .expect("remove");
        txn.commit().expect("commit");
    }
    let error = read_all(&storage, 1, 6).expect_err("gap served");
    assert!(matches!(ours(&error), Some(StorageError::Corrupt { .. })));
    let three = 3 * u64::from(entry(1, 1).compute_size());
    let error = storage
        .entries(1, 6, three, GetEntriesContext::empty(false))
        .expect_err("gap served within the size limit");
    assert!(matches!(ours(&error), Some(StorageError::Corrupt { .. })));
    assert!(matches!(
        RaftStore::new(Arc::clone(&db)).open_group(G1, &[]),
        Err(StorageError::Corrupt { .. })
    ));
    // A stray entry below the snapshot index.
    let storage2 = five_entries(&store, G2);
    write(&store, |b| {
        b.compact(&storage2, 2, 1, &conf(&[1], &[]), vec![]);
    })
    .expect("compact");
    put_raw_entry(&db, G2, 1, &encode_entry(&entry(1, 1)).expect("encode"));
    assert!(matches!(
        RaftStore::new(Arc::clone(&db)).open_group(G2, &[]),
        Err(StorageError::Corrupt { group: G2, .. })
    ));
    put_raw_entry(&db, G3, 1, &encode_entry(&entry(1, 1)).expect("encode"));
    assert!(matches!(
        store.open_group(G3, &[1]),
        Err(StorageError::Corrupt { group: G3, .. })
    ));
}

#[test]
fn corrupt_state_and_snapshot_rows_are_clean_errors() {
    let db = memory_db();
    let store = RaftStore::new(Arc::clone(&db));
    let storage = five_entries(&store, G1);
    write(&store, |b| {
        b.compact(&storage, 2, 1, &conf(&[1], &[]), vec![1, 2])
    })
    .expect("write");
    let put = |table: TableDefinition<u64, &[u8]>, bytes: &[u8]| {
        let txn = db.begin_write().expect("begin write");
        txn.open_table(table)
            .expect("open")
            .insert(G1.0, bytes)
            .expect("insert");
        txn.commit().expect("commit");
    };
    put(RAFT_SNAPSHOT, b"not a snapshot");
    assert!(matches!(
        storage.snapshot_data(),
        Err(StorageError::Corrupt { group: G1, .. })
    ));
    let error = storage.snapshot(0, 2).expect_err("corrupt snapshot served");
    assert!(matches!(ours(&error), Some(StorageError::Corrupt { .. })));
    put(RAFT_STATE, b"not a state");
    assert!(matches!(
        RaftStore::new(Arc::clone(&db)).open_group(G1, &[]),
        Err(StorageError::Corrupt { group: G1, .. })
    ));
    // A state that decodes but breaks raft's ordering is corrupt too.
    let broken = GroupState {
        commit: 9,
        snapshot_index: 2,
        applied: 2,
        ..GroupState::default()
    };
    put(RAFT_STATE, &codec::encode(&broken));
    assert!(matches!(
        RaftStore::new(Arc::clone(&db)).open_group(G1, &[]),
        Err(StorageError::Corrupt { group: G1, .. })
    ));
}

#[derive(Clone, Debug)]
enum Op {
    /// Append `len` entries starting at a point chosen by `at` among the
    /// indexes raft could append at.
    Append { at: u64, len: u64 },
    /// Commit everything appended so far.
    Commit,
    /// Compact at a committed index chosen by `at`.
    Compact { at: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<u64>(), 1..6u64).prop_map(|(at, len)| Op::Append { at, len }),
        1 => Just(Op::Commit),
        1 => any::<u64>().prop_map(|at| Op::Compact { at }),
    ]
}

/// Compares everything both storages must agree on. raft's `MemStorage`
/// only knows the term below its first index before any compaction
/// (keel keeps it: `snapshot_term`), and reports a stale term for 0 after.
fn assert_agree(ours: &GroupStorage, model: &MemStorage, snapshot_term: u64) {
    let (first, last) = (model.first_index().unwrap(), model.last_index().unwrap());
    assert_eq!(Storage::first_index(ours), Ok(first));
    assert_eq!(Storage::last_index(ours), Ok(last));
    for index in 0..=last + 1 {
        let expected = match index {
            _ if index + 1 < first => compacted(),
            _ if index + 1 == first => Ok(snapshot_term),
            _ => model.term(index),
        };
        assert_eq!(ours.term(index), expected, "term of {index}");
    }
    assert_eq!(ours.term(last + 1), unavailable());
    if last >= first {
        let ctx = || GetEntriesContext::empty(false);
        assert_eq!(
            ours.entries(first, last + 1, None, ctx()),
            model.entries(first, last + 1, None, ctx())
        );
        let size = u64::from(entry(1, 1).compute_size()) * 2;
        assert_eq!(
            ours.entries(first, last + 1, size, ctx()),
            model.entries(first, last + 1, size, ctx())
        );
        assert_eq!(ours.entries(first - 1, last, None, ctx()), compacted());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn agrees_with_raft_mem_storage(
        batches in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 1..20)
    ) {
        let db = memory_db();
        let store = RaftStore::new(Arc::clone(&db));
        let storage = store.open_group(G1, &[1]).expect("open");
        let model = MemStorage::new_with_conf_state(conf(&[1], &[]));
        let (mut term, mut commit, mut snapshot_term) = (0, 0, 0);
        for ops in batches {
            let mut batch = WriteBatch::default();
            for op in ops {
                let (first, last) = (model.first_index().unwrap(), model.last_index().unwrap());
                match op {
                    Op::Append { at, len } => {
                        // Raft never rewrites committed entries.
                        let lowest = first.max(commit + 1);
                        let start = lowest + at % (last + 2 - lowest);
                        term += 1;
                        let ents = entries(start..=start + len - 1, term);
                        model.wl().append(&ents).unwrap();
                        batch.append(&storage, &ents);
                    }
                    Op::Commit => {
                        commit = last;
                        batch.set_commit(&storage, commit);
                    }
                    Op::Compact { at } => {
                        // MemStorage misreports its bounds once empty, so
                        // keep one entry.
                        let highest = commit.min(last.saturating_sub(1));
                        if highest < first {
                            continue;
                        }
                        let index = first + at % (highest + 1 - first);
                        snapshot_term = model.term(index).unwrap();
                        model.wl().compact(index + 1).unwrap();
                        batch.compact(&storage, index, snapshot_term, &conf(&[1], &[]), vec![]);
                    }
                }
            }
            store.write(batch).expect("write");
            assert_agree(&storage, &model, snapshot_term);
        }
        let reopened = RaftStore::new(db).open_group(G1, &[]).expect("reopen");
        assert_agree(&reopened, &model, snapshot_term);
        prop_assert_eq!(reopened.hard_state().commit, commit);
    }
}

/// Persists every ready of `raw` the way the engine does, returning the
/// entries committed meanwhile (applied once their commit is durable).
fn drive(raw: &mut RawNode<GroupStorage>, store: &RaftStore) -> Vec<Entry> {
    let mut applied = Vec::new();
    while raw.has_ready() {
        let mut ready = raw.ready();
        let storage = raw.store().clone();
        let mut batch = WriteBatch::default();
        if !ready.snapshot().is_empty() {
            batch.apply_snapshot(&storage, ready.snapshot());
        }
        batch.append(&storage, ready.entries());
        if let Some(hs) = ready.hs() {
            batch.set_hard_state(&storage, hs);
        }
        store.write(batch).expect("persist ready");
        let mut committed = ready.take_committed_entries();
        let mut light = raw.advance_append(ready);
        let mut batch = WriteBatch::default();
        if let Some(commit) = light.commit_index() {
            batch.set_commit(&storage, commit);
        }
        committed.extend(light.take_committed_entries());
        if let Some(last) = committed.last() {
            batch.set_applied(&storage, last.index);
        }
        store.write(batch).expect("persist commit and applied");
        applied.extend(committed);
        raw.advance_apply();
    }
    applied
}

fn raw_node(storage: GroupStorage) -> RawNode<GroupStorage> {
    let config = raft::Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 1,
        applied: storage.applied(),
        ..Default::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    RawNode::new(&config, storage, &logger).expect("raw node")
}

fn proposals(applied: &[Entry]) -> Vec<Vec<u8>> {
    applied
        .iter()
        .filter(|e| !e.data.is_empty())
        .map(|e| e.data.to_vec())
        .collect()
}

#[test]
fn a_single_voter_raw_node_commits_and_recovers_from_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("raft.redb");
    let expected: Vec<Vec<u8>> = (0..100).map(|i| format!("p{i}").into_bytes()).collect();
    {
        let store = RaftStore::new(file_db(&path));
        let mut raw = raw_node(store.open_group(G1, &[1]).expect("open"));
        raw.campaign().expect("campaign");
        let mut applied = drive(&mut raw, &store);
        assert_eq!(raw.raft.state, raft::StateRole::Leader);
        for chunk in expected.chunks(10) {
            for data in chunk {
                raw.propose(vec![], data.clone()).expect("propose");
            }
            applied.extend(drive(&mut raw, &store));
        }
        assert_eq!(proposals(&applied), expected);
        let storage = raw.store();
        // The leader's empty entry of term 1, then the proposals.
        assert_eq!(storage.last_index(), 101);
        assert_eq!(storage.hard_state().commit, 101);
        assert_eq!(storage.applied(), 101);
    }
    let store = RaftStore::new(file_db(&path));
    let mut raw = raw_node(store.open_group(G1, &[1]).expect("reopen"));
    assert_eq!(raw.raft.raft_log.committed, 101);
    assert_eq!(raw.raft.raft_log.last_index(), 101);
    let stored = read_all(raw.store(), 1, 102).expect("entries");
    assert_eq!(proposals(&stored), expected);
    // Nothing is applied twice, and the group goes on.
    raw.campaign().expect("campaign");
    let mut applied = drive(&mut raw, &store);
    raw.propose(vec![], b"after restart".to_vec())
        .expect("propose");
    applied.extend(drive(&mut raw, &store));
    assert_eq!(proposals(&applied), vec![b"after restart".to_vec()]);
    assert_eq!(raw.raft.term, 2);
}

/// A node that learned the cluster retired it must still know after a
/// restart, or it would host its stale groups again; a mark that is
/// damaged or names another node is an error, never read as "not retired".
#[test]
fn the_retirement_mark_survives_a_reopen_and_is_checked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("node.redb");
    let me = NodeId::new(3).expect("node id");
    let store = RaftStore::new(file_db(&path));
    assert!(!store.retired(me).expect("read the mark"));
    store.mark_retired(me).expect("mark");
    drop(store);
    let reopened = RaftStore::new(file_db(&path));
    assert!(reopened.retired(me).expect("read the mark"));
    let other = NodeId::new(4).expect("node id");
    assert!(matches!(
        reopened.retired(other),
        Err(StorageError::CorruptRetirement(_))
    ));
    let txn = reopened.db.begin_write().expect("begin write");
    txn.open_table(NODE_RETIRED)
        .expect("open")
        .insert(0, b"not a mark".as_slice())
        .expect("insert");
    txn.commit().expect("commit");
    assert!(matches!(
        reopened.retired(me),
        Err(StorageError::CorruptRetirement(_))
    ));
}

/// A peer the group now has as a learner is sent only a snapshot that lists
/// it as one: the stored snapshot may be from before it was removed and
/// added back, when it was a voter, and a replica without a log refuses
/// such a snapshot (`raft::engine`). The storage asks for a fresh one
/// instead (simulator seed 14260: a re-added replica refused its leader's
/// old snapshot until the next compaction).
#[test]
fn a_learner_is_sent_only_a_snapshot_that_lists_it_as_one() {
    let store = RaftStore::new(memory_db());
    let storage = five_entries(&store, G1);
    write(&store, |b| {
        b.compact(&storage, 4, 1, &conf(&[1, 2, 3], &[]), b"old".to_vec())
    })
    .expect("compact");
    assert!(
        storage.snapshot(0, 3).is_ok(),
        "3 is a voter as far as raft knows"
    );
    storage.note_learners(&[3]);
    assert_eq!(
        storage.snapshot(0, 3),
        Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable
        ))
    );
    assert!(storage.snapshot_wanted());
    assert!(storage.snapshot(0, 2).is_ok(), "a voter still gets it");
    write(&store, |b| {
        b.compact(&storage, 5, 1, &conf(&[1, 2], &[3]), b"new".to_vec())
    })
    .expect("compact");
    let snapshot = storage.snapshot(0, 3).expect("the fresh snapshot");
    assert_eq!(snapshot.get_data(), b"new");
}
