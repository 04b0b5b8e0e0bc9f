//! Deliberately planted bugs, to prove the simulator catches real mistakes
//! (issue: "proof that it finds bugs"). They exist only when keel is built
//! with the `planted-bugs` feature — which only the simulator enables — and
//! even then stay off unless a run plants one (`keel-sim run --plant BUG`).
//! In any other build `planted` is a constant `false` and the buggy branches
//! compile away.

/// A bug the simulator can plant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Bug {
    /// Commit storage writes without syncing them, yet acknowledge them.
    SkipFsync = 1,
    /// Forget the persisted vote when a node restarts.
    ForgetVote = 2,
    /// Serve "linearizable" reads from the local replica without a read index.
    StaleReads = 3,
}

impl Bug {
    pub const ALL: [Bug; 3] = [Bug::SkipFsync, Bug::ForgetVote, Bug::StaleReads];

    pub fn name(self) -> &'static str {
        match self {
            Bug::SkipFsync => "skip-fsync",
            Bug::ForgetVote => "forget-vote",
            Bug::StaleReads => "stale-reads",
        }
    }

    pub fn from_name(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == name)
    }
}

#[cfg(feature = "planted-bugs")]
static PLANTED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Plants `bug` for the rest of this process.
#[cfg(feature = "planted-bugs")]
pub fn plant(bug: Bug) {
    PLANTED.store(bug as u8, std::sync::atomic::Ordering::SeqCst);
}

/// Whether `bug` is planted.
#[inline]
pub fn planted(bug: Bug) -> bool {
    #[cfg(feature = "planted-bugs")]
    {
        PLANTED.load(std::sync::atomic::Ordering::Relaxed) == bug as u8
    }
    #[cfg(not(feature = "planted-bugs"))]
    {
        let _ = bug;
        false
    }
}
