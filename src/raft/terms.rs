//! The terms of a group's uncompacted log, run-length encoded.
//!
//! A log's term changes only when leadership does, so the terms of even a
//! 10,000-entry log are a handful of runs. Storage keeps them in memory to
//! answer raft-rs's `term` queries without reading the disk, and copies them
//! each time a round stages a write of the group; as a plain `Vec<u64>` that
//! copy was 80 KB per group per round at the compaction threshold, the
//! largest single cost of a busy node (`memmove` under `Mirror::clone`).

/// Terms of the entries at offsets `0..len()` of a log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Terms {
    /// `(offset of the run's first entry, term)`: offsets strictly rising
    /// from 0, neighbouring terms different.
    runs: Vec<(u64, u64)>,
    len: u64,
}

impl Terms {
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The term of the entry at `offset`, if there is one.
    pub(crate) fn get(&self, offset: u64) -> Option<u64> {
        if offset >= self.len {
            return None;
        }
        let run = self.runs.partition_point(|&(start, _)| start <= offset) - 1;
        Some(self.runs[run].1)
    }

    pub(crate) fn push(&mut self, term: u64) {
        if self.runs.last().map(|&(_, t)| t) != Some(term) {
            self.runs.push((self.len, term));
        }
        self.len += 1;
    }

    /// Keeps the first `len` terms.
    pub(crate) fn truncate(&mut self, len: u64) {
        if len >= self.len {
            return;
        }
        let keep = self.runs.partition_point(|&(start, _)| start < len);
        self.runs.truncate(keep);
        self.len = len;
    }

    /// Drops the first `count` terms (a compaction); offsets shift down.
    pub(crate) fn drain_front(&mut self, count: u64) {
        if count >= self.len {
            self.clear();
            return;
        }
        // The run holding offset `count` becomes the first one.
        let first = self.runs.partition_point(|&(start, _)| start <= count) - 1;
        self.runs.drain(..first);
        for run in &mut self.runs {
            run.0 = run.0.saturating_sub(count);
        }
        self.len -= count;
    }

    pub(crate) fn clear(&mut self) {
        self.runs.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Push(u64),
        Truncate(u64),
        DrainFront(u64),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (1u64..4).prop_map(Op::Push),
            2 => (0u64..40).prop_map(Op::Truncate),
            2 => (0u64..40).prop_map(Op::DrainFront),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// Every operation agrees with a plain vector of terms.
        #[test]
        fn runs_agree_with_a_vector(ops in proptest::collection::vec(op(), 0..200)) {
            let mut terms = Terms::default();
            let mut model: Vec<u64> = Vec::new();
            for op in ops {
                match op {
                    Op::Push(t) => {
                        terms.push(t);
                        model.push(t);
                    }
                    Op::Truncate(n) => {
                        terms.truncate(n);
                        model.truncate(n as usize);
                    }
                    Op::DrainFront(n) => {
                        terms.drain_front(n);
                        model.drain(..(n as usize).min(model.len()));
                    }
                    Op::Clear => {
                        terms.clear();
                        model.clear();
                    }
                }
                prop_assert_eq!(terms.len(), model.len() as u64);
                for offset in 0..model.len() as u64 + 2 {
                    prop_assert_eq!(terms.get(offset), model.get(offset as usize).copied());
                }
                // Runs stay minimal: one per change of term.
                let changes = model.windows(2).filter(|w| w[0] != w[1]).count();
                prop_assert_eq!(terms.runs.len(), if model.is_empty() { 0 } else { changes + 1 });
            }
        }
    }

    #[test]
    fn a_long_log_of_few_terms_is_a_few_runs() {
        let mut terms = Terms::default();
        for t in [1, 1, 2, 2, 2, 5] {
            terms.push(t);
        }
        for _ in 0..10_000 {
            terms.push(5);
        }
        assert_eq!(terms.runs.len(), 3);
        assert_eq!(terms.get(1), Some(1));
        assert_eq!(terms.get(4), Some(2));
        assert_eq!(terms.get(10_005), Some(5));
        assert_eq!(terms.get(10_006), None);
    }
}
