//! The simulated disk (DESIGN.md §8 "Disk faults", §10).
//!
//! madsim's file system never loses data on a crash, so it cannot show whether
//! keel (through redb) survives power loss. [`SimDisk`] is an in-memory disk
//! that keeps what was written but not yet synced apart from what is durable,
//! and [`SimBackend`] plugs it into redb unchanged as its
//! [`redb::StorageBackend`].
//!
//! # Model
//!
//! * **Durable image.** The bytes that survived the last `sync_data` (or crash).
//! * **Unsynced overlay.** Every write lands in an overlay of whole 512-byte
//!   sectors. A sector enters the overlay holding its current visible content
//!   and the write is copied over it (read-modify-write), so writes of any
//!   alignment and length work. Reads see the durable image overlaid with these
//!   sectors, i.e. always the latest writes.
//! * **Length is unsynced metadata too.** `set_len`, and writes past the end
//!   (which extend the file as `pwrite` does), change only the visible length.
//!   Bytes exposed by growing the file read as zero, including bytes that an
//!   earlier shrink cut off (the durable image is hidden above the lowest
//!   length set since the last sync).
//! * **`sync_data`** makes the visible file, length included, durable.
//! * **`crash`** (power loss) drops the overlay except a seeded subset of its
//!   sectors, each kept with probability [`DiskFaults::keep_unsynced`] (torn
//!   writes: a multi-sector write may survive in part, but a sector is atomic).
//!   A pending length change survives as one unit with the same probability;
//!   otherwise the durable length (and the durable bytes a shrink had hidden)
//!   come back, and kept sectors past that length are cut off. Reverting the
//!   length independently of the sectors is deliberate: on a real file system
//!   an in-place overwrite (redb's header at offset 0) can reach the platter
//!   while the journaled size change of the same transaction does not.
//! * **Fencing.** `crash` also fences every backend handed out before it: the
//!   crashed process's redb `Database` may still be dropped afterwards, and its
//!   flushes must not reach the disk the restarted node opens. A fenced backend
//!   fails every operation with an `io::Error`.
//!   [`SimDisk::kill_process`] fences without losing anything (the process
//!   died, the operating system did not).
//! * **Injected I/O errors.** Each `write` and `sync_data` fails with
//!   probability [`DiskFaults::io_error_rate`] and then changes nothing.
//! * **Bit rot.** With probability [`DiskFaults::bit_flip_rate`] a crash also
//!   flips one seeded bit of the durable image: data at rest that went bad
//!   while the machine was down, which the restarted node meets when redb
//!   opens the file and verifies its pages. The bit is drawn from everything
//!   past the first [`UNCHECKED_HEADER`] bytes: redb's header prefix (magic
//!   number, god byte, layout) is the one place its format carries no
//!   checksum, so no checksum could catch a flip there. Everything else —
//!   commit slots, tree pages, keel's own envelopes inside them, and space
//!   no commit uses — can rot. Half of the flips strike a sector synced
//!   since the previous crash: most of the file is space no commit uses, and
//!   a sweep should meet damaged live data often, not once in a hundred
//!   seeds.
//!
//! Every fault decision comes from ChaCha8 streams seeded from the disk's seed,
//! so a run replays exactly. I/O errors and crash decisions use separate
//! streams, so turning error injection on or off does not change which
//! sectors a crash keeps.
//!
//! The disk has no byte-range locks (redb's default `Unsupported`), which
//! restricts redb to its default `ExclusiveWriter` concurrency mode; one node
//! owns one disk, so nothing else is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keel::io::StorageLatency;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The unit a crash keeps or loses atomically.
pub const SECTOR_SIZE: usize = 512;

/// [`SECTOR_SIZE`] as a file offset.
const SECTOR: u64 = SECTOR_SIZE as u64;

/// The ChaCha stream that decides injected I/O errors.
const IO_ERROR_STREAM: u64 = 1;

/// The ChaCha stream that decides what a crash keeps.
const CRASH_STREAM: u64 = 2;

/// The random stream that draws sync latencies.
const LATENCY_STREAM: u64 = 3;

/// The ChaCha stream that decides bit rot.
const BIT_FLIP_STREAM: u64 = 4;

/// redb's header prefix: magic number, god byte and layout, which no
/// checksum covers (its commit slots follow, each with its own checksum).
pub const UNCHECKED_HEADER: u64 = 64;

/// Fault knobs, drawn per seed by the swarm configuration.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DiskFaults {
    /// On a crash, each unsynced 512-byte sector survives with this
    /// probability (torn writes); a pending length change survives with it
    /// too. 0.0 = lose all unsynced data.
    pub keep_unsynced: f64,
    /// Probability that a write or sync_data call fails with an io::Error
    /// (nothing changes).
    pub io_error_rate: f64,
    /// Each `sync_data` takes a seeded 0..=this many milliseconds, which
    /// the node waits out through [`StorageLatency`] (0: instant).
    pub sync_latency_ms: u64,
    /// Probability that a crash also flips one bit of the durable image past
    /// [`UNCHECKED_HEADER`] (bit rot while the machine is down).
    pub bit_flip_rate: f64,
}

/// Counters over the disk's whole life, for code probes and reports.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct DiskStats {
    /// Successful `write` calls.
    pub writes: u64,
    /// Bytes written by successful `write` calls.
    pub bytes_written: u64,
    /// Successful `sync_data` calls.
    pub syncs: u64,
    /// Successful `set_len` calls.
    pub set_lens: u64,
    /// `crash` calls.
    pub crashes: u64,
    /// `kill_process` calls.
    pub process_kills: u64,
    /// Crashes that kept some, but not all, unsynced sectors.
    pub torn_crashes: u64,
    /// Unsynced sectors that survived a crash.
    pub sectors_kept: u64,
    /// Unsynced sectors that a crash dropped.
    pub sectors_lost: u64,
    /// Crashes at which a pending length change survived.
    pub lengths_kept: u64,
    /// Crashes at which a pending length change reverted to the durable length.
    pub lengths_reverted: u64,
    /// `write` and `sync_data` calls failed by error injection.
    pub injected_errors: u64,
    /// Operations refused because their backend was fenced by a crash.
    pub fenced_ops: u64,
    /// Bits flipped by bit rot.
    pub bit_flips: u64,
}

/// One node's disk. Clone shares it (the supervisor keeps a clone to crash it;
/// the node's redb gets [`SimDisk::backend`]).
#[derive(Clone)]
pub struct SimDisk {
    inner: Arc<Mutex<State>>,
}

impl StorageLatency for SimDisk {
    fn take(&self) -> Duration {
        std::mem::take(&mut self.lock().pending_latency)
    }
}

/// A redb backend over a [`SimDisk`], valid until the disk's next crash or
/// process kill.
pub struct SimBackend {
    disk: SimDisk,
    /// The disk's generation when this backend was made; a crash moves the
    /// disk on and so fences this backend.
    generation: u64,
}

struct State {
    /// Bytes that survived the last sync or crash.
    durable: Vec<u8>,
    /// Written-but-unsynced sectors, by sector index, holding the sector's full
    /// visible content. A BTreeMap so a crash walks them in a seeded, stable order.
    overlay: BTreeMap<u64, Box<[u8; SECTOR_SIZE]>>,
    /// The visible length.
    len: u64,
    /// The lowest length set since the last sync: durable bytes at or above it
    /// were cut off by a shrink and read as zero if the file grows again.
    floor: u64,
    /// Bumped by every crash and process kill; backends from older
    /// generations are fenced.
    generation: u64,
    faults: DiskFaults,
    io_rng: ChaCha8Rng,
    crash_rng: ChaCha8Rng,
    latency_rng: ChaCha8Rng,
    flip_rng: ChaCha8Rng,
    /// Sectors synced since the last crash, where bit rot strikes half the
    /// time (see the module docs).
    synced: BTreeSet<u64>,
    /// Modelled sync time not yet waited out by the node.
    pending_latency: Duration,
    stats: DiskStats,
}

impl SimDisk {
    /// An empty disk whose every fault decision is driven by `seed`.
    pub fn new(seed: u64, faults: DiskFaults) -> Self {
        let stream = |n| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(n);
            rng
        };
        let state = State {
            durable: Vec::new(),
            overlay: BTreeMap::new(),
            len: 0,
            floor: 0,
            generation: 0,
            faults,
            io_rng: stream(IO_ERROR_STREAM),
            crash_rng: stream(CRASH_STREAM),
            latency_rng: stream(LATENCY_STREAM),
            flip_rng: stream(BIT_FLIP_STREAM),
            synced: BTreeSet::new(),
            pending_latency: Duration::ZERO,
            stats: DiskStats::default(),
        };
        SimDisk {
            inner: Arc::new(Mutex::new(state)),
        }
    }

    /// A redb backend over this disk
    /// (`redb::Database::builder().create_with_backend(disk.backend())`).
    /// It stays usable until the next [`SimDisk::crash`] or
    /// [`SimDisk::kill_process`].
    pub fn backend(&self) -> SimBackend {
        SimBackend {
            disk: self.clone(),
            generation: self.lock().generation,
        }
    }

    /// Simulates power loss: unsynced data is dropped except a seeded subset of
    /// the 512-byte sectors that had been written (torn writes), and a pending
    /// length change survives or reverts to the durable length as one seeded
    /// decision (see the module docs). Every backend handed out so far is
    /// fenced, so the dead process's redb cannot write to the disk any more.
    /// Returns the offset of the byte in which bit rot flipped a bit, if it
    /// struck (see [`DiskFaults::bit_flip_rate`]).
    pub fn crash(&self) -> Option<u64> {
        self.lock().crash()
    }

    /// Simulates the process dying while the machine stays up (SIGKILL): the
    /// operating system still holds every write, so nothing is lost, but the
    /// backends handed out so far are fenced, as after [`SimDisk::crash`], so
    /// that dropping the dead process's redb (which a killed madsim task does,
    /// and a killed real process would not) cannot write to the disk.
    pub fn kill_process(&self) {
        let mut state = self.lock();
        state.generation += 1;
        state.stats.process_kills += 1;
    }

    /// Replaces the fault knobs, e.g. to heal every fault for the liveness
    /// phase of a simulation. The random streams carry on, so the run stays
    /// determined by the seed.
    pub fn set_faults(&self, faults: DiskFaults) {
        self.lock().faults = faults;
    }

    /// The counters so far.
    pub fn stats(&self) -> DiskStats {
        self.lock().stats
    }

    /// Locks the state. No code panics while holding the lock, but a panic in
    /// a test thread must not turn into a second panic here, so poison is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // try_lock: formatting must not deadlock if it ever runs under the lock.
        let Ok(state) = self.inner.try_lock() else {
            return f.write_str("SimDisk { <busy> }");
        };
        f.debug_struct("SimDisk")
            .field("len", &state.len)
            .field("durable_len", &state.durable.len())
            .field("unsynced_sectors", &state.overlay.len())
            .field("generation", &state.generation)
            .finish()
    }
}

impl fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimBackend")
            .field("generation", &self.generation)
            .field("disk", &self.disk)
            .finish()
    }
}

impl SimBackend {
    /// Locks the disk for one operation of this backend, unless a crash or a
    /// process kill has fenced it.
    fn live(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut state = self.disk.lock();
        if state.generation != self.generation {
            state.stats.fenced_ops += 1;
            return Err(io::Error::other(
                "simulated disk was crashed or its process killed after this backend was opened; open a new one with SimDisk::backend",
            ));
        }
        Ok(state)
    }
}

impl redb::StorageBackend for SimBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.live()?.len)
    }

    /// Reads the latest writes; reading past the end is an error, as redb's
    /// contract requires.
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.live()?;
        let end = span_end(offset, out.len())?;
        if end > state.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at offset {offset} runs past the end of the {}-byte simulated disk",
                    out.len(),
                    state.len
                ),
            ));
        }
        state.read_visible(offset, out);
        Ok(())
    }

    /// Sets the visible length; the change is unsynced metadata until the next
    /// `sync_data`. New bytes read as zero.
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.live()?;
        state.set_len(len)?;
        state.stats.set_lens += 1;
        Ok(())
    }

    /// Makes the visible file durable, or fails (changing nothing) by error injection.
    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.live()?;
        state.maybe_inject_error("sync_data")?;
        state.sync();
        state.stats.syncs += 1;
        let max = state.faults.sync_latency_ms;
        if max > 0 {
            let ms = state.latency_rng.next_u64() % (max + 1);
            state.pending_latency += Duration::from_millis(ms);
        }
        Ok(())
    }

    /// Writes into the unsynced overlay, extending the file if the write runs
    /// past its end, or fails (changing nothing) by error injection.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.live()?;
        let end = span_end(offset, data.len())?;
        addressable(end)?;
        state.maybe_inject_error("write")?;
        state.write(offset, end, data);
        state.stats.writes += 1;
        state.stats.bytes_written += data.len() as u64;
        Ok(())
    }
}

impl State {
    /// The part of the durable image that is still visible: a shrink since the
    /// last sync hides what lies above it.
    fn durable_visible(&self) -> u64 {
        (self.durable.len() as u64).min(self.floor)
    }

    /// Copies the visible bytes of `[offset, offset + out.len())` into `out`;
    /// the caller has checked that the span lies within the file.
    fn read_visible(&self, offset: u64, out: &mut [u8]) {
        let durable_visible = self.durable_visible();
        let mut pos = offset;
        let mut done = 0;
        while done < out.len() {
            let sector = pos / SECTOR;
            let in_sector = (pos % SECTOR) as usize;
            let take = (SECTOR_SIZE - in_sector).min(out.len() - done);
            let chunk = &mut out[done..done + take];
            match self.overlay.get(&sector) {
                Some(data) => chunk.copy_from_slice(&data[in_sector..in_sector + take]),
                None => copy_durable(&self.durable, durable_visible, pos, chunk),
            }
            pos += take as u64;
            done += take;
        }
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        addressable(len)?;
        if len < self.len {
            // Cut what lies past the new end out of the overlay, so that growing
            // the file again shows zeros.
            let first_gone = len.div_ceil(SECTOR);
            self.overlay.retain(|&sector, _| sector < first_gone);
            let in_sector = (len % SECTOR) as usize;
            if in_sector != 0 {
                if let Some(data) = self.overlay.get_mut(&(len / SECTOR)) {
                    data[in_sector..].fill(0);
                }
            }
            self.floor = self.floor.min(len);
        }
        self.len = len;
        Ok(())
    }

    /// Writes `data` at `[offset, end)` into the overlay, sector by sector.
    /// The caller has checked that `end` is addressable.
    fn write(&mut self, offset: u64, end: u64, data: &[u8]) {
        let durable_visible = self.durable_visible();
        let mut pos = offset;
        let mut done = 0;
        while done < data.len() {
            let sector = pos / SECTOR;
            let in_sector = (pos % SECTOR) as usize;
            let take = (SECTOR_SIZE - in_sector).min(data.len() - done);
            let len = self.len;
            let durable = &self.durable;
            let slot = self.overlay.entry(sector).or_insert_with(|| {
                // Start from the sector's visible content; bytes at or past the
                // old end are zero, as the gap of a write past the end must be.
                let mut fresh = Box::new([0u8; SECTOR_SIZE]);
                let start = sector * SECTOR;
                let visible = (len.saturating_sub(start)).min(SECTOR) as usize;
                copy_durable(durable, durable_visible, start, &mut fresh[..visible]);
                fresh
            });
            slot[in_sector..in_sector + take].copy_from_slice(&data[done..done + take]);
            pos += take as u64;
            done += take;
        }
        self.len = self.len.max(end);
    }

    /// Folds the overlay and the visible length into the durable image.
    fn sync(&mut self) {
        let keep_all = self.overlay.keys().copied().collect::<Vec<_>>();
        self.synced.extend(&keep_all);
        self.settle(true, &keep_all);
    }

    fn crash(&mut self) -> Option<u64> {
        self.stats.crashes += 1;
        self.generation += 1;
        let keep = self.faults.keep_unsynced;
        let durable_len = self.durable.len() as u64;
        let length_pending = self.len != durable_len || self.floor < durable_len;
        let length_kept = if length_pending {
            let kept = draw(&mut self.crash_rng) < keep;
            if kept {
                self.stats.lengths_kept += 1;
            } else {
                self.stats.lengths_reverted += 1;
            }
            kept
        } else {
            true
        };
        let mut kept = Vec::new();
        for &sector in self.overlay.keys() {
            if draw(&mut self.crash_rng) < keep {
                kept.push(sector);
            }
        }
        let lost = self.overlay.len() - kept.len();
        if !kept.is_empty() && lost > 0 {
            self.stats.torn_crashes += 1;
        }
        self.stats.sectors_kept += kept.len() as u64;
        self.stats.sectors_lost += lost as u64;
        self.settle(length_kept, &kept);
        self.rot()
    }

    /// Bit rot: with [`DiskFaults::bit_flip_rate`], flips one seeded bit of
    /// the durable image past [`UNCHECKED_HEADER`]; returns its byte offset.
    fn rot(&mut self) -> Option<u64> {
        let synced = std::mem::take(&mut self.synced);
        let len = self.durable.len() as u64;
        if len <= UNCHECKED_HEADER || draw(&mut self.flip_rng) >= self.faults.bit_flip_rate {
            return None;
        }
        let recent = synced
            .range(UNCHECKED_HEADER / SECTOR..len.div_ceil(SECTOR))
            .copied()
            .collect::<Vec<_>>();
        let (low, high) = match self.flip_rng.next_u64() % 2 {
            0 if !recent.is_empty() => {
                let sector = recent[(self.flip_rng.next_u64() % recent.len() as u64) as usize];
                (sector * SECTOR, ((sector + 1) * SECTOR).min(len))
            }
            _ => (0, len),
        };
        let low = low.max(UNCHECKED_HEADER);
        let offset = low + self.flip_rng.next_u64() % (high - low);
        let bit = self.flip_rng.next_u64() % 8;
        // `offset < len`, the length of an in-memory Vec.
        self.durable[offset as usize] ^= 1 << bit;
        self.stats.bit_flips += 1;
        Some(offset)
    }

    /// Makes a new durable image: the pending length (and the zeroing of what a
    /// shrink cut off) if `length_kept`, else the durable length, then the
    /// `kept` overlay sectors that fit. Clears the overlay.
    fn settle(&mut self, length_kept: bool, kept: &[u64]) {
        if length_kept {
            // Both values are at most `len`, which `addressable` bounded to usize.
            self.durable.truncate(self.durable_visible() as usize);
            self.durable.resize(self.len as usize, 0);
        }
        let end = self.durable.len() as u64;
        for sector in kept {
            let start = sector * SECTOR;
            if start >= end {
                continue;
            }
            if let Some(data) = self.overlay.get(sector) {
                let take = (end - start).min(SECTOR) as usize;
                let start = start as usize;
                self.durable[start..start + take].copy_from_slice(&data[..take]);
            }
        }
        self.overlay.clear();
        self.len = end;
        self.floor = end;
    }

    /// Draws whether this call fails by error injection.
    fn maybe_inject_error(&mut self, op: &str) -> io::Result<()> {
        let rate = self.faults.io_error_rate;
        if rate > 0.0 && draw(&mut self.io_rng) < rate {
            self.stats.injected_errors += 1;
            return Err(io::Error::other(format!(
                "injected simulated disk error in {op}"
            )));
        }
        Ok(())
    }
}

/// Copies durable bytes of the visible durable prefix `[0, durable_visible)`
/// at `pos` into `out`; bytes past that prefix are zero.
fn copy_durable(durable: &[u8], durable_visible: u64, pos: u64, out: &mut [u8]) {
    let available = durable_visible.saturating_sub(pos).min(out.len() as u64) as usize;
    // `available > 0` implies `pos < durable_visible <= durable.len()`, a usize.
    if available > 0 {
        let pos = pos as usize;
        out[..available].copy_from_slice(&durable[pos..pos + available]);
    }
    out[available..].fill(0);
}

/// The end of the span `[offset, offset + len)`, or an error if it overflows.
fn span_end(offset: u64, len: usize) -> io::Result<u64> {
    offset.checked_add(len as u64).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("span of {len} bytes at offset {offset} overflows the simulated disk's address space"),
        )
    })
}

/// Refuses lengths that the in-memory image could not hold.
fn addressable(len: u64) -> io::Result<()> {
    usize::try_from(len).map(|_| ()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("length {len} is larger than the simulated disk can hold in memory"),
        )
    })
}

/// A uniform draw from [0, 1): 53 random bits, so a probability of 0.0 never
/// fires and 1.0 always does.
fn draw(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{
        Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageBackend,
        TableDefinition, TableError,
    };
    use std::panic::{catch_unwind, AssertUnwindSafe};

    fn faults(keep_unsynced: f64, io_error_rate: f64) -> DiskFaults {
        DiskFaults {
            keep_unsynced,
            io_error_rate,
            sync_latency_ms: 0,
            bit_flip_rate: 0.0,
        }
    }

    #[test]
    fn syncs_accrue_seeded_latency_until_taken() {
        let latency = |seed| {
            let disk = SimDisk::new(
                seed,
                DiskFaults {
                    sync_latency_ms: 20,
                    ..faults(0.0, 0.0)
                },
            );
            let backend = disk.backend();
            for _ in 0..50 {
                backend.write(0, &[1; 8]).unwrap();
                backend.sync_data().unwrap();
            }
            let total = disk.take();
            assert_eq!(disk.take(), Duration::ZERO, "taking resets it");
            total
        };
        let total = latency(9);
        assert_eq!(total, latency(9), "the seed fixes the latencies");
        assert!(total > Duration::ZERO && total <= Duration::from_millis(50 * 20));
        let instant = SimDisk::new(9, faults(0.0, 0.0));
        instant.backend().sync_data().unwrap();
        assert_eq!(instant.take(), Duration::ZERO);
    }

    fn read_all(backend: &SimBackend) -> Vec<u8> {
        let mut out = vec![0; backend.len().unwrap() as usize];
        backend.read(0, &mut out).unwrap();
        out
    }

    /// A pattern that differs in every byte of a sector, so a sector that is
    /// part old and part new shows.
    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) | 1)
            .collect()
    }

    #[test]
    fn reads_see_the_latest_writes_over_the_durable_image() {
        let disk = SimDisk::new(1, faults(0.0, 0.0));
        let b = disk.backend();
        b.set_len(2048).unwrap();
        b.write(0, &[7; 2048]).unwrap();
        b.sync_data().unwrap();
        b.write(100, &[9; 10]).unwrap();
        let mut expected = vec![7; 2048];
        expected[100..110].fill(9);
        assert_eq!(read_all(&b), expected);
        let mut one = [0u8; 3];
        b.read(98, &mut one).unwrap();
        assert_eq!(one, [7, 7, 9]);
    }

    #[test]
    fn unaligned_writes_across_sectors_read_back_and_keep_their_neighbours() {
        let disk = SimDisk::new(2, faults(0.0, 0.0));
        let b = disk.backend();
        let base = pattern(4096, 3);
        b.write(0, &base).unwrap();
        b.sync_data().unwrap();
        let data = pattern(1500, 77);
        b.write(300, &data).unwrap();
        let mut expected = base.clone();
        expected[300..1800].copy_from_slice(&data);
        assert_eq!(read_all(&b), expected);
        // Unaligned reads straddling the overlay and the durable image.
        let mut out = vec![0; 700];
        b.read(1500, &mut out).unwrap();
        assert_eq!(out, expected[1500..2200]);
        b.sync_data().unwrap();
        disk.crash();
        assert_eq!(read_all(&disk.backend()), expected);
    }

    #[test]
    fn reads_past_the_end_fail() {
        let disk = SimDisk::new(3, faults(0.0, 0.0));
        let b = disk.backend();
        b.set_len(1000).unwrap();
        let mut out = [0u8; 10];
        assert!(b.read(995, &mut out).is_err());
        assert!(b.read(u64::MAX, &mut out).is_err());
        assert!(b.read(990, &mut out).is_ok());
    }

    #[test]
    fn writes_past_the_end_extend_the_file_with_zeros() {
        let disk = SimDisk::new(4, faults(0.0, 0.0));
        let b = disk.backend();
        b.write(1000, &[5; 24]).unwrap();
        assert_eq!(b.len().unwrap(), 1024);
        let all = read_all(&b);
        assert!(all[..1000].iter().all(|&x| x == 0));
        assert!(all[1000..].iter().all(|&x| x == 5));
        assert!(b.write(u64::MAX, &[1]).is_err());
    }

    #[test]
    fn set_len_grows_with_zeros_and_shrinking_hides_old_bytes() {
        let disk = SimDisk::new(5, faults(0.0, 0.0));
        let b = disk.backend();
        b.write(0, &[1; 3000]).unwrap();
        b.sync_data().unwrap();
        b.write(1000, &[2; 2000]).unwrap();
        // Shrink into the middle of an unsynced sector, and past durable bytes.
        b.set_len(1100).unwrap();
        assert_eq!(b.len().unwrap(), 1100);
        b.set_len(4000).unwrap();
        let all = read_all(&b);
        assert!(all[..1000].iter().all(|&x| x == 1));
        assert!(all[1000..1100].iter().all(|&x| x == 2));
        assert!(
            all[1100..].iter().all(|&x| x == 0),
            "regrown bytes must be zero"
        );
        // A write into the regrown area must not resurrect cut-off bytes around it.
        b.write(2500, &[3; 10]).unwrap();
        let all = read_all(&b);
        assert!(all[1100..2500].iter().all(|&x| x == 0));
        assert!(all[2510..].iter().all(|&x| x == 0));
        b.sync_data().unwrap();
        disk.crash();
        assert_eq!(read_all(&disk.backend()), all);
    }

    #[test]
    fn shrink_then_regrow_to_the_same_length_is_still_a_pending_change() {
        let disk = SimDisk::new(6, faults(1.0, 0.0));
        let b = disk.backend();
        b.write(0, &[1; 1024]).unwrap();
        b.sync_data().unwrap();
        b.set_len(512).unwrap();
        b.set_len(1024).unwrap();
        disk.crash();
        let all = read_all(&disk.backend());
        assert!(all[..512].iter().all(|&x| x == 1));
        assert!(all[512..].iter().all(|&x| x == 0));
        assert_eq!(disk.stats().lengths_kept, 1);
    }

    #[test]
    fn crash_without_keep_drops_all_unsynced_data_and_length() {
        let disk = SimDisk::new(7, faults(0.0, 0.0));
        let b = disk.backend();
        let durable = pattern(2048, 1);
        b.write(0, &durable).unwrap();
        b.sync_data().unwrap();
        b.write(10, &[0xee; 3000]).unwrap();
        b.set_len(100).unwrap();
        b.write(200, &[0xdd; 10]).unwrap();
        disk.crash();
        assert_eq!(read_all(&disk.backend()), durable);
        let stats = disk.stats();
        assert_eq!(stats.crashes, 1);
        assert_eq!(stats.sectors_kept, 0);
        assert_eq!(stats.sectors_lost, 1);
        assert_eq!(stats.lengths_reverted, 1);
        assert_eq!(stats.torn_crashes, 0);
    }

    #[test]
    fn crash_with_full_keep_keeps_everything() {
        let disk = SimDisk::new(8, faults(1.0, 0.0));
        let b = disk.backend();
        b.write(0, &[1; 1000]).unwrap();
        b.sync_data().unwrap();
        b.write(700, &pattern(5000, 9)).unwrap();
        let before = read_all(&b);
        disk.crash();
        assert_eq!(read_all(&disk.backend()), before);
        assert_eq!(disk.stats().sectors_lost, 0);
    }

    /// The per-sector outcome of one crash: `Some(true)` new, `Some(false)` old.
    fn torn_outcome(seed: u64) -> Vec<bool> {
        let disk = SimDisk::new(seed, faults(0.5, 0.0));
        let b = disk.backend();
        let sectors = 64;
        b.write(0, &vec![0xaa; sectors * SECTOR_SIZE]).unwrap();
        b.sync_data().unwrap();
        // An unaligned write covering every sector at least partly.
        b.write(100, &vec![0xbb; sectors * SECTOR_SIZE - 200])
            .unwrap();
        disk.crash();
        let all = read_all(&disk.backend());
        assert_eq!(all.len(), sectors * SECTOR_SIZE);
        let outcome: Vec<bool> = all
            .chunks(SECTOR_SIZE)
            .enumerate()
            .map(|(i, sector)| {
                let lo = if i == 0 { 100 } else { 0 };
                let hi = if i == sectors - 1 {
                    SECTOR_SIZE - 100
                } else {
                    SECTOR_SIZE
                };
                let new = sector[lo..hi].iter().all(|&x| x == 0xbb);
                let old = sector[lo..hi].iter().all(|&x| x == 0xaa);
                assert!(new || old, "sector {i} is torn inside itself");
                // The bytes the write did not cover keep their old content either way.
                assert!(sector[..lo].iter().chain(&sector[hi..]).all(|&x| x == 0xaa));
                new
            })
            .collect();
        let stats = disk.stats();
        assert_eq!(
            stats.sectors_kept,
            outcome.iter().filter(|&&kept| kept).count() as u64
        );
        assert_eq!(stats.sectors_kept + stats.sectors_lost, sectors as u64);
        outcome
    }

    #[test]
    fn torn_crash_keeps_a_seeded_subset_of_whole_sectors() {
        let a = torn_outcome(11);
        assert!(a.iter().any(|&k| k) && a.iter().any(|&k| !k), "{a:?}");
        assert_eq!(a, torn_outcome(11), "same seed, same sectors");
        assert_ne!(a, torn_outcome(12), "another seed, other sectors");
    }

    #[test]
    fn a_crash_fences_old_backends() {
        let disk = SimDisk::new(13, faults(0.0, 0.0));
        let old = disk.backend();
        old.write(0, &[1; 512]).unwrap();
        old.sync_data().unwrap();
        disk.crash();
        assert!(old.write(0, &[2; 512]).is_err());
        assert!(old.sync_data().is_err());
        assert!(old.len().is_err());
        assert!(old.read(0, &mut [0; 1]).is_err());
        assert!(old.set_len(0).is_err());
        assert_eq!(disk.stats().fenced_ops, 5);
        assert_eq!(read_all(&disk.backend()), vec![1; 512]);
    }

    #[test]
    fn a_process_kill_fences_but_keeps_unsynced_writes() {
        let disk = SimDisk::new(14, faults(0.0, 0.0));
        let old = disk.backend();
        old.write(0, &[1; 700]).unwrap();
        disk.kill_process();
        assert!(old.write(0, &[2; 700]).is_err());
        let new = disk.backend();
        assert_eq!(read_all(&new), vec![1; 700]);
        // Still unsynced: a later power loss drops it.
        disk.crash();
        assert_eq!(disk.backend().len().unwrap(), 0);
        assert_eq!(disk.stats().process_kills, 1);
    }

    /// The outcome (ok or failed) of a fixed sequence of writes and syncs.
    fn error_pattern(seed: u64, rate: f64) -> (Vec<bool>, Vec<u8>) {
        let disk = SimDisk::new(seed, faults(0.0, rate));
        let b = disk.backend();
        let mut outcomes = Vec::new();
        for i in 0..200u64 {
            outcomes.push(b.write(i * 7, &[i as u8; 7]).is_ok());
            if i % 10 == 9 {
                outcomes.push(b.sync_data().is_ok());
            }
        }
        let failed = outcomes.iter().filter(|&&ok| !ok).count() as u64;
        assert_eq!(disk.stats().injected_errors, failed);
        (outcomes, read_all(&b))
    }

    #[test]
    fn io_error_injection_is_deterministic_per_seed() {
        let (a, image_a) = error_pattern(21, 0.3);
        assert!(a.iter().any(|&ok| ok) && a.iter().any(|&ok| !ok));
        assert_eq!((a.clone(), image_a), error_pattern(21, 0.3));
        assert_ne!(a, error_pattern(22, 0.3).0);
    }

    #[test]
    fn injected_errors_change_nothing_and_healing_stops_them() {
        let disk = SimDisk::new(23, faults(0.0, 1.0));
        let b = disk.backend();
        b.set_len(512).unwrap();
        assert!(b.write(0, &[9; 600]).is_err());
        assert_eq!(b.len().unwrap(), 512);
        assert_eq!(read_all(&b), vec![0; 512]);
        assert!(b.sync_data().is_err());
        disk.crash();
        assert_eq!(
            disk.backend().len().unwrap(),
            0,
            "the failed sync made nothing durable"
        );
        let b = disk.backend();
        disk.set_faults(faults(0.0, 0.0));
        b.write(0, &[9; 600]).unwrap();
        b.sync_data().unwrap();
        assert_eq!(disk.stats().injected_errors, 2);
        assert_eq!(disk.stats().syncs, 1);
    }

    #[test]
    fn io_errors_do_not_shift_crash_decisions() {
        // The same crash after a different number of injected errors.
        let run = |failed_syncs: usize| {
            let disk = SimDisk::new(31, faults(0.5, 0.0));
            let b = disk.backend();
            b.set_len(32 * SECTOR).unwrap();
            b.sync_data().unwrap();
            disk.set_faults(faults(0.5, 1.0));
            for _ in 0..failed_syncs {
                assert!(b.sync_data().is_err());
            }
            disk.set_faults(faults(0.5, 0.0));
            b.write(0, &[1; 32 * SECTOR_SIZE]).unwrap();
            disk.crash();
            read_all(&disk.backend())
        };
        let image = run(0);
        assert!(
            image.contains(&0) && image.contains(&1),
            "the crash is torn"
        );
        assert_eq!(image, run(5));
    }

    // ---- redb end to end -------------------------------------------------

    const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("t");

    type Model = BTreeMap<u64, Vec<u8>>;

    /// Opens a database on a fresh backend of `disk`, turning a panic into a
    /// test failure that names `what`.
    fn open(disk: &SimDisk, cache: usize, what: &str) -> Result<Database, DatabaseError> {
        let backend = disk.backend();
        catch_unwind(AssertUnwindSafe(|| {
            Database::builder()
                .set_cache_size(cache)
                .create_with_backend(backend)
        }))
        .unwrap_or_else(|_| panic!("redb panicked opening the simulated disk ({what})"))
    }

    /// Drops a database (and anything else of the dead process) after a
    /// crash; its backend is fenced, and dropping must not panic.
    fn drop_dead<T>(dead: T, what: &str) {
        if catch_unwind(AssertUnwindSafe(move || drop(dead))).is_err() {
            panic!("redb panicked dropping a crashed database ({what})");
        }
    }

    /// Everything in the table; a missing table is an empty one.
    fn contents(db: &Database) -> Result<Model, String> {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let table = match txn.open_table(TABLE) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Model::new()),
            Err(e) => return Err(e.to_string()),
        };
        let mut out = Model::new();
        for entry in table.iter().map_err(|e| e.to_string())? {
            let (k, v) = entry.map_err(|e| e.to_string())?;
            out.insert(k.value(), v.value().to_vec());
        }
        Ok(out)
    }

    /// Applies `changes` in one write transaction; `Err` if any step fails.
    fn commit(
        db: &Database,
        durability: Durability,
        changes: &[(u64, Option<Vec<u8>>)],
    ) -> Result<(), String> {
        commit_in_phases(db, durability, false, changes)
    }

    /// [`commit`], in two phases if `two_phase` (as keel's storage commits).
    fn commit_in_phases(
        db: &Database,
        durability: Durability,
        two_phase: bool,
        changes: &[(u64, Option<Vec<u8>>)],
    ) -> Result<(), String> {
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_two_phase_commit(two_phase);
        txn.set_durability(durability).map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
            for (k, v) in changes {
                match v {
                    Some(v) => table.insert(k, v.as_slice()).map(|_| ()),
                    None => table.remove(k).map(|_| ()),
                }
                .map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    }

    fn apply(model: &Model, changes: &[(u64, Option<Vec<u8>>)]) -> Model {
        let mut next = model.clone();
        for (k, v) in changes {
            match v {
                Some(v) => next.insert(*k, v.clone()),
                None => next.remove(k),
            };
        }
        next
    }

    fn random_changes(rng: &mut ChaCha8Rng, max: u64) -> Vec<(u64, Option<Vec<u8>>)> {
        let n = 1 + rng.next_u64() % max;
        (0..n)
            .map(|_| {
                let key = rng.next_u64() % 300;
                if rng.next_u64() % 5 == 0 {
                    (key, None)
                } else {
                    let len = (rng.next_u64() % 3000) as usize;
                    (key, Some(pattern(len, rng.next_u64() as u8)))
                }
            })
            .collect()
    }

    fn committed_immediate_writes_survive_crashes(keep: f64) {
        let disk = SimDisk::new(41, faults(keep, 0.0));
        let mut rng = ChaCha8Rng::seed_from_u64(41);
        let mut model = Model::new();
        let mut db = open(&disk, 1 << 20, "create").unwrap();
        for round in 0..4 {
            for _ in 0..20 {
                let changes = random_changes(&mut rng, 20);
                commit(&db, Durability::Immediate, &changes).unwrap();
                model = apply(&model, &changes);
            }
            disk.crash();
            drop_dead(db, "end to end");
            db = open(&disk, 1 << 20, "end to end")
                .unwrap_or_else(|e| panic!("reopen after crash {round} failed: {e}"));
            assert_eq!(contents(&db).unwrap(), model, "after crash {round}");
        }
        assert_eq!(disk.stats().crashes, 4);
    }

    #[test]
    fn committed_immediate_writes_survive_crashes_that_lose_everything_unsynced() {
        committed_immediate_writes_survive_crashes(0.0);
    }

    #[test]
    fn committed_immediate_writes_survive_torn_crashes() {
        committed_immediate_writes_survive_crashes(0.5);
    }

    // ---- bit rot ----------------------------------------------------------

    #[test]
    fn a_crash_with_bit_rot_flips_one_seeded_bit_past_the_header() {
        let rotted = |seed| {
            let disk = SimDisk::new(
                seed,
                DiskFaults {
                    bit_flip_rate: 1.0,
                    ..faults(0.0, 0.0)
                },
            );
            let b = disk.backend();
            b.write(0, &pattern(8 * SECTOR_SIZE, 3)).unwrap();
            b.sync_data().unwrap();
            let at = disk.crash().expect("rot strikes at rate 1");
            (at, read_all(&disk.backend()))
        };
        let before = pattern(8 * SECTOR_SIZE, 3);
        for seed in 0..50 {
            let (at, after) = rotted(seed);
            assert_eq!(rotted(seed), (at, after.clone()), "the seed fixes the flip");
            assert!((UNCHECKED_HEADER..8 * SECTOR).contains(&at));
            let diff: Vec<usize> = (0..before.len())
                .filter(|&i| before[i] != after[i])
                .collect();
            assert_eq!(diff, vec![at as usize], "seed {seed}");
            assert_eq!((before[diff[0]] ^ after[diff[0]]).count_ones(), 1);
        }
        let quiet = SimDisk::new(1, faults(0.0, 0.0));
        quiet.backend().write(0, &before).unwrap();
        quiet.backend().sync_data().unwrap();
        assert_eq!(quiet.crash(), None, "no rot at rate 0");
        assert_eq!(quiet.stats().bit_flips, 0);
    }

    /// A database of a few durable commits (in two phases if `two_phase`),
    /// crashed, or closed cleanly unless `crash`: the disk image a restart
    /// finds, and what it must hold.
    fn stored_database(two_phase: bool, crash: bool) -> (Vec<u8>, Model) {
        let disk = SimDisk::new(5, faults(0.0, 0.0));
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut model = Model::new();
        let db = open(&disk, 1 << 20, "create").unwrap();
        for _ in 0..6 {
            let changes = random_changes(&mut rng, 8);
            commit_in_phases(&db, Durability::Immediate, two_phase, &changes).unwrap();
            model = apply(&model, &changes);
        }
        if crash {
            disk.crash();
            drop_dead(db, "rot fixture");
        } else {
            drop(db);
        }
        (read_all(&disk.backend()), model)
    }

    /// Reopens `image` with one bit of byte `at` flipped: what redb finds,
    /// opened as keel opens it if `as_keel` (see
    /// `keel::io::database_builder`), else plainly.
    fn reopen_rotted(image: &[u8], at: u64, as_keel: bool) -> Result<Model, String> {
        let disk = SimDisk::new(0, faults(0.0, 0.0));
        disk.lock().durable = image.to_vec();
        disk.lock().len = image.len() as u64;
        disk.lock().floor = image.len() as u64;
        disk.lock().durable[at as usize] ^= 1 << (at % 8);
        let db = if as_keel {
            let backend = disk.backend();
            catch_unwind(AssertUnwindSafe(|| {
                keel::io::database_builder().create_with_backend(backend)
            }))
            .unwrap_or_else(|_| panic!("redb panicked opening byte {at} rotted as keel does"))
        } else {
            open(&disk, 1 << 20, "rotted")
        };
        contents(&db.map_err(|e| e.to_string())?)
    }

    /// Rots one byte in each sector of `image` in turn; returns how many
    /// reopens failed, and the bytes whose rot served data other than `model`.
    fn rot_every_sector(image: &[u8], model: &Model, as_keel: bool) -> (usize, Vec<u64>) {
        let mut caught = 0;
        let mut served_other = Vec::new();
        for sector in 0..image.len() as u64 / SECTOR {
            let at = (sector * SECTOR + sector * 37 % SECTOR).max(UNCHECKED_HEADER);
            match reopen_rotted(image, at, as_keel) {
                Ok(found) if found != *model => served_other.push(at),
                Ok(_) => {}
                Err(_) => caught += 1,
            }
        }
        (caught, served_other)
    }

    /// Rots every sector of a two-phase database (crashed, or closed
    /// cleanly unless `crash`) in turn: each reopen must fail or serve
    /// exactly the last commit, and some must fail.
    fn assert_rot_caught_or_harmless(crash: bool, as_keel: bool) {
        let (image, model) = stored_database(true, crash);
        let (caught, served_other) = rot_every_sector(&image, &model, as_keel);
        assert_eq!(
            served_other,
            Vec::<u64>::new(),
            "rot at these bytes served other data"
        );
        assert!(caught > 0, "some flips land in live pages");
    }

    /// After a crash redb verifies every page as it opens: in a two-phase
    /// database a bad page is rot, never a torn write, and is reported.
    /// This is what keel's storage relies on
    /// (`raft::storage::begin_durable_write`).
    #[test]
    fn rot_in_a_two_phase_database_is_caught_or_harmless() {
        assert_rot_caught_or_harmless(true, false);
    }

    /// After a clean shutdown a plain open trusts the file, so rot goes
    /// unseen there (simulator seed 257: a log that had lost entries). keel
    /// opens with every page verified, and catches it.
    #[test]
    fn rot_after_a_clean_shutdown_is_caught_by_keels_open() {
        assert_rot_caught_or_harmless(false, true);
    }

    /// The same rot in a one-phase database: redb takes a bad primary for a
    /// torn write and falls back to the previous commit, so an acknowledged
    /// commit quietly disappears. This is why keel commits in two phases.
    #[test]
    fn rot_in_a_one_phase_database_can_roll_back_a_commit_silently() {
        let (image, model) = stored_database(false, true);
        let (_, served_other) = rot_every_sector(&image, &model, false);
        assert!(!served_other.is_empty());
    }

    /// What one seed of the crash sweep saw.
    #[derive(Debug, Default, PartialEq)]
    struct SweepOutcome {
        reopened: u64,
        clean_errors: u64,
        stats: DiskStats,
    }

    /// One seed: a few cycles of random transactions (Immediate and None,
    /// some failing by injected I/O errors, sometimes one left uncommitted),
    /// a crash (or a process kill), and a reopen that must not panic and must
    /// find exactly one of the states the crash may leave.
    fn crash_sweep_seed(seed: u64) -> SweepOutcome {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let keep = match rng.next_u64() % 4 {
            0 => 0.0,
            1 => 1.0,
            _ => draw(&mut rng),
        };
        let io_error_rate = if rng.next_u64() % 4 == 0 { 0.02 } else { 0.0 };
        let chaos = faults(keep, io_error_rate);
        let cache = if rng.next_u64() % 2 == 0 {
            32 << 10
        } else {
            4 << 20
        };
        let disk = SimDisk::new(seed, chaos.clone());
        // The states a reopen may find: the last durable one and any later
        // non-durable or failed commits.
        let mut acceptable = vec![Model::new()];
        let mut outcome = SweepOutcome::default();
        for cycle in 0..4 {
            let what = format!("seed {seed}, cycle {cycle}, keep {keep}");
            // Opening runs healed: an injected error there says nothing about recovery.
            disk.set_faults(faults(keep, 0.0));
            let opened = open(&disk, cache, &what);
            disk.set_faults(chaos.clone());
            let db = match opened {
                Ok(db) => db,
                Err(e) => {
                    assert!(
                        keep > 0.0,
                        "{what}: only torn writes may break a reopen: {e}"
                    );
                    outcome.clean_errors += 1;
                    break;
                }
            };
            if cycle > 0 {
                outcome.reopened += 1;
            }
            let found = contents(&db).unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
            assert!(
                acceptable.contains(&found),
                "{what}: reopened state is none of the {} states the crash may leave",
                acceptable.len()
            );
            if cycle == 3 {
                break;
            }
            let mut model = found;
            acceptable = vec![model.clone()];
            for _ in 0..rng.next_u64() % 8 {
                let changes = random_changes(&mut rng, 15);
                let durability = if rng.next_u64() % 4 == 0 {
                    Durability::None
                } else {
                    Durability::Immediate
                };
                let next = apply(&model, &changes);
                match commit(&db, durability, &changes) {
                    Ok(()) => {
                        if matches!(durability, Durability::Immediate) {
                            acceptable.clear();
                        }
                        acceptable.push(next.clone());
                        model = next;
                    }
                    Err(_) => {
                        // The outcome of a failed commit is unknown, and so is
                        // the database's state after it: stop writing.
                        acceptable.push(next);
                        break;
                    }
                }
            }
            // Sometimes crash in the middle of a large uncommitted transaction,
            // whose pages a small cache spills to the disk.
            let in_flight = if rng.next_u64() % 2 == 0 {
                db.begin_write().ok().inspect(|txn| {
                    if let Ok(mut table) = txn.open_table(TABLE) {
                        for (k, v) in random_changes(&mut rng, 60) {
                            let _ = table.insert(k, v.unwrap_or_default().as_slice());
                        }
                    }
                })
            } else {
                None
            };
            // Mostly power loss; sometimes only the process dies.
            if rng.next_u64() % 4 == 0 {
                disk.kill_process();
            } else {
                disk.crash();
            }
            drop_dead((in_flight, db), &what);
        }
        outcome.stats = disk.stats();
        outcome
    }

    #[test]
    fn redb_recovers_or_fails_cleanly_after_random_crashes() {
        let mut total = SweepOutcome::default();
        for seed in 0..200 {
            let outcome = crash_sweep_seed(seed);
            total.reopened += outcome.reopened;
            total.clean_errors += outcome.clean_errors;
        }
        eprintln!(
            "crash sweep: {} reopens found a valid state, {} failed cleanly",
            total.reopened, total.clean_errors
        );
        assert!(total.reopened > 400, "the sweep barely reopened anything");
    }

    #[test]
    fn the_crash_sweep_is_deterministic() {
        // Also shows that redb itself writes deterministically.
        assert_eq!(crash_sweep_seed(7), crash_sweep_seed(7));
        assert_ne!(crash_sweep_seed(7).stats, crash_sweep_seed(8).stats);
    }
}
