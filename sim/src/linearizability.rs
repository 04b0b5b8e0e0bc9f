//! Linearizability checker for the key-value history (DESIGN.md §8
//! "Checkers"): a Wing–Gong search with Porcupine's refinements, run key by
//! key because linearizability is compositional (a history is linearizable
//! iff each key's sub-history is).
//!
//! **Model.** Each key is a register that starts absent. `Put(v)` sets `v`;
//! `Get` returns the current value; `Cas { expected, new }` sets `new` if the
//! current value equals `expected` and otherwise fails without effect.
//!
//! **Outcomes.** `Fail` operations definitely had no effect and are dropped
//! (as Jepsen does; a failed CAS is not checked for a justifying mismatch,
//! because `Fail` also covers requests the cluster refused). A `Get` with an
//! unknown (`Info`) outcome observed nothing and is dropped. A `Put` or `Cas`
//! with an unknown outcome may take effect at any time after its call: its
//! return is +infinity, so the search may place it anywhere later, including
//! after everything else, which is the same as never taking effect. An
//! unknown CAS that is placed where the value does not match is a failed CAS.
//!
//! **Real time.** Operation `a` precedes `b` iff `a` returned strictly before
//! `b` was called; equal times count as concurrent, which can only accept
//! more histories, never reject a correct one.
//!
//! **Search.** Calls and returns form a doubly linked list in time order. The
//! search walks it, linearizing a pending call whenever the model allows and
//! the pair (set of linearized operations, register value) has not been
//! explored before, and backtracks when it meets the return of an operation
//! it has not linearized. The memo cache makes the work roughly
//! *operations × 2^concurrency* rather than factorial: thousands of
//! operations per key at a handful of concurrent clients check in
//! milliseconds.
//!
//! **Limits.** Unknown writes stay pending to the end of the history, so each
//! one multiplies the state space. Before searching, exact reductions remove
//! most of them: unknown writes whose value nobody observes are dropped
//! ([`drop_unobserved_unknown_writes`]), an observed unknown write that is its
//! value's only writer gets the first observer's return as its own
//! ([`bound_observed_unique_writes`]), and unknown writes with identical
//! effects are linearized in call order only (see `Search::prev_twin`). So a
//! workload that writes unique values costs no more than one without
//! timeouts; many unknown writes of *repeated* values can still be
//! exponential. The search has a step budget per key
//! ([`DEFAULT_STEP_BUDGET`]); exhausting it yields [`CheckError::TooLarge`],
//! which is "no verdict", never a violation.

use crate::history::{History, Op, Operation, Outcome};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// Search steps allowed per key before giving up with
/// [`CheckError::TooLarge`]; a few seconds of work in a debug build.
pub const DEFAULT_STEP_BUDGET: u64 = 10_000_000;

/// A key whose sub-history has no linearization.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("key {key:?} is not linearizable: {message}")]
pub struct Violation {
    pub key: String,
    /// What broke: the operations involved, their times and values.
    pub message: String,
}

/// Why [`check`] did not accept the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Violation(#[from] Violation),
    #[error("the linearizability search for key {key:?} ({ops} operations) reached its budget of {steps} steps without a verdict")]
    TooLarge { key: String, ops: usize, steps: u64 },
}

/// Checks every key's sub-history with [`DEFAULT_STEP_BUDGET`]; keys are
/// checked in sorted order and the first failure is returned.
pub fn check(history: &History) -> Result<(), CheckError> {
    check_with_budget(history, DEFAULT_STEP_BUDGET)
}

/// [`check`] with an explicit step budget per key.
pub fn check_with_budget(history: &History, steps_per_key: u64) -> Result<(), CheckError> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history.ops() {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in by_key {
        check_key(key, &ops, steps_per_key)?;
    }
    Ok(())
}

fn check_key(key: &str, ops: &[&Operation], budget: u64) -> Result<(), CheckError> {
    let mut values = Values::default();
    let mut key_ops: Vec<KeyOp> = ops
        .iter()
        .filter_map(|op| KeyOp::new(op, &mut values))
        .collect();
    if let Some(message) = never_written(&key_ops, &values) {
        return Err(violation(key, message));
    }
    drop_unobserved_unknown_writes(&mut key_ops);
    bound_observed_unique_writes(&mut key_ops);
    match Search::new(&key_ops).run(budget) {
        Ok(()) => Ok(()),
        Err(Failure::NoLinearization(deepest)) => Err(violation(
            key,
            explain(&key_ops, &values, ops.len(), &deepest),
        )),
        Err(Failure::Budget(steps)) => Err(CheckError::TooLarge {
            key: key.to_owned(),
            ops: key_ops.len(),
            steps,
        }),
    }
}

fn violation(key: &str, message: String) -> CheckError {
    CheckError::Violation(Violation {
        key: key.to_owned(),
        message,
    })
}

/// Interned register values, so that states compare as integers; id 0 is
/// "absent".
#[derive(Default)]
struct Values<'a> {
    ids: BTreeMap<&'a str, u32>,
    names: Vec<&'a str>,
}

impl<'a> Values<'a> {
    fn id(&mut self, value: Option<&'a str>) -> u32 {
        let Some(value) = value else { return 0 };
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        self.names.push(value);
        // `names` never outgrows the operations of one key, so this fits.
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.ids.insert(value, id);
        id
    }

    fn show(&self, id: u32) -> String {
        let index = (id as usize).checked_sub(1);
        match index.and_then(|i| self.names.get(i)) {
            Some(name) => format!("{name:?}"),
            None => "absent".to_owned(),
        }
    }
}

/// What an operation does to the register, with interned values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Effect {
    /// A put, known or unknown to have happened: sets the value.
    Write(u32),
    /// A get that returned: the value must be this.
    Read(u32),
    /// A cas that succeeded: the value must be `expected`; it becomes `new`.
    Cas { expected: u32, new: u32 },
    /// A cas with an unknown outcome: sets `new` if the value is `expected`,
    /// otherwise fails without effect.
    MaybeCas { expected: u32, new: u32 },
}

impl Effect {
    /// The register value after this operation from `state`, or `None` if
    /// the operation cannot happen in that state.
    fn step(self, state: u32) -> Option<u32> {
        match self {
            Effect::Write(v) => Some(v),
            Effect::Read(v) => (v == state).then_some(state),
            Effect::Cas { expected, new } => (expected == state).then_some(new),
            Effect::MaybeCas { expected, new } => Some(if expected == state { new } else { state }),
        }
    }
}

/// One operation of a key as the search sees it.
struct KeyOp<'a> {
    source: &'a Operation,
    effect: Effect,
    call: u64,
    /// `u64::MAX` (+infinity) for unknown outcomes.
    ret: u64,
    unknown: bool,
}

impl<'a> KeyOp<'a> {
    /// `None` for operations that cannot affect the verdict: failures, and
    /// gets with unknown results.
    fn new(source: &'a Operation, values: &mut Values<'a>) -> Option<Self> {
        let effect = match (&source.op, &source.outcome) {
            (_, Outcome::Fail) | (Op::Get, Outcome::Info) => return None,
            (Op::Get, Outcome::Ok(read)) => Effect::Read(values.id(read.as_deref())),
            (Op::Put { value }, _) => Effect::Write(values.id(Some(value))),
            (Op::Cas { expected, new }, outcome) => {
                let expected = values.id(expected.as_deref());
                let new = values.id(Some(new));
                if *outcome == Outcome::Info {
                    Effect::MaybeCas { expected, new }
                } else {
                    Effect::Cas { expected, new }
                }
            }
        };
        let unknown = source.outcome == Outcome::Info;
        Some(KeyOp {
            source,
            effect,
            call: source.call,
            ret: match source.ret {
                Some(ret) if !unknown => ret,
                _ => u64::MAX,
            },
            unknown,
        })
    }
}

/// A read or successful cas of a value that no put or cas ever wrote cannot
/// be linearized anywhere; say so directly rather than through the search.
fn never_written(ops: &[KeyOp], values: &Values) -> Option<String> {
    let written: BTreeSet<u32> = ops
        .iter()
        .filter_map(|op| match op.effect {
            Effect::Write(v) | Effect::Cas { new: v, .. } | Effect::MaybeCas { new: v, .. } => {
                Some(v)
            }
            Effect::Read(_) => None,
        })
        .collect();
    ops.iter().find_map(|op| {
        let (observed, verb) = match op.effect {
            Effect::Read(v) => (v, "read"),
            Effect::Cas { expected, .. } => (expected, "succeeded expecting"),
            Effect::Write(_) | Effect::MaybeCas { .. } => return None,
        };
        (observed != 0 && !written.contains(&observed)).then(|| {
            format!(
                "{} {verb} {}, a value no put or cas wrote (failed writes excluded)",
                describe(op.source),
                values.show(observed)
            )
        })
    })
}

/// Drops unknown writes (put or cas) whose written value no get returns and
/// no cas expects, repeating until none is left, since dropping an unknown
/// cas can orphan another value.
///
/// Sound and complete: take a linearization that includes such a write `w`
/// of value `v`, and remove `w`. Until the next put, the old order held `v`,
/// so it contained no get (none returns `v`) and no successful cas (none
/// expects `v`); the only operations there are unknown cases that failed on
/// `v`, and moving those to the very end (their return is +infinity) keeps
/// them harmless. From the next put on, the register holds the same values
/// as before. So the history is linearizable with `w` iff without it, and
/// the search is spared one pending operation per dropped write.
fn drop_unobserved_unknown_writes(ops: &mut Vec<KeyOp>) {
    loop {
        let observed: BTreeSet<u32> = ops
            .iter()
            .filter_map(|op| match op.effect {
                Effect::Read(v)
                | Effect::Cas { expected: v, .. }
                | Effect::MaybeCas { expected: v, .. } => Some(v),
                Effect::Write(_) => None,
            })
            .collect();
        let before = ops.len();
        ops.retain(|op| match op.effect {
            Effect::Write(v) | Effect::MaybeCas { new: v, .. } if op.unknown => {
                observed.contains(&v)
            }
            _ => true,
        });
        if ops.len() == before {
            return;
        }
    }
}

/// Gives a finite return to each unknown write that is the only writer of
/// its value when some get returns that value or some successful cas expects
/// it: the write must have taken effect before every such observer, so before
/// the first observer returned.
///
/// Exact: every linearization of the original history orders the write
/// before its observers, hence before anything called after the first
/// observer returned, which is all the new return time demands; and adding a
/// constraint only removes linearizations. With unique values (as a workload
/// should write) every unknown write is then either dropped or bounded, and
/// the search costs what a history without unknown writes costs.
fn bound_observed_unique_writes(ops: &mut [KeyOp]) {
    let mut writers: BTreeMap<u32, usize> = BTreeMap::new();
    let mut first_observer: BTreeMap<u32, u64> = BTreeMap::new();
    for op in ops.iter() {
        match op.effect {
            Effect::Write(v) | Effect::MaybeCas { new: v, .. } => {
                *writers.entry(v).or_default() += 1
            }
            Effect::Cas { expected, new } => {
                *writers.entry(new).or_default() += 1;
                observe(&mut first_observer, expected, op.ret);
            }
            Effect::Read(v) => observe(&mut first_observer, v, op.ret),
        }
    }
    for op in ops.iter_mut().filter(|op| op.unknown) {
        let (Effect::Write(v) | Effect::MaybeCas { new: v, .. }) = op.effect else {
            continue;
        };
        if let (Some(1), Some(&first)) = (writers.get(&v), first_observer.get(&v)) {
            // An observer returning before the call makes the history fail
            // anyway; keep the call before the return.
            op.ret = first.max(op.call);
        }
    }
}

fn observe(first_observer: &mut BTreeMap<u32, u64>, value: u32, ret: u64) {
    let first = first_observer.entry(value).or_insert(ret);
    *first = (*first).min(ret);
}

/// Index of the list's head sentinel, and "no node".
const HEAD: usize = 0;
const NIL: usize = usize::MAX;

/// The call/return list of one key. Node 0 is the head; every operation has a
/// call node and, later in the list, a return node.
struct Search<'o, 'a> {
    ops: &'o [KeyOp<'a>],
    op_of: Vec<usize>,
    is_call: Vec<bool>,
    /// For a call node, its return node.
    partner: Vec<usize>,
    prev: Vec<usize>,
    next: Vec<usize>,
    /// For an unknown operation still returning at +infinity, the previously
    /// called such operation with the same effect. Both may take effect at any time after both
    /// were called, so they are interchangeable: the search only linearizes
    /// a twin after its predecessor, which turns 2^n subsets of n twins into
    /// n + 1 prefixes (values repeat; unknown writes of one value are common).
    prev_twin: Vec<Option<usize>>,
}

/// The furthest the search got, kept to explain a failure.
struct Deepest {
    /// The linearized operations, in order.
    prefix: Vec<usize>,
    state: u32,
    /// The operation whose return the search met without having linearized it.
    blocked: usize,
    /// Operations called but not linearized at that point, in call order.
    pending: Vec<usize>,
}

enum Failure {
    NoLinearization(Deepest),
    Budget(u64),
}

impl<'o, 'a> Search<'o, 'a> {
    fn new(ops: &'o [KeyOp<'a>]) -> Self {
        // Calls sort before returns at equal times, making them concurrent.
        let mut entries: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            entries.push((op.call, false, i));
            entries.push((op.ret, true, i));
        }
        entries.sort_unstable();
        let nodes = entries.len() + 1;
        let mut search = Search {
            ops,
            op_of: vec![0; nodes],
            is_call: vec![false; nodes],
            partner: vec![NIL; nodes],
            prev: (0..nodes).map(|n| n.wrapping_sub(1)).collect(),
            next: (1..=nodes)
                .map(|n| if n == nodes { NIL } else { n })
                .collect(),
            prev_twin: vec![None; ops.len()],
        };
        let mut call_node = vec![NIL; ops.len()];
        let mut last_twin: BTreeMap<Effect, usize> = BTreeMap::new();
        for (node, &(_, is_return, op)) in (1..).zip(&entries) {
            search.op_of[node] = op;
            search.is_call[node] = !is_return;
            if is_return {
                search.partner[call_node[op]] = node;
            } else {
                call_node[op] = node;
                if ops[op].unknown && ops[op].ret == u64::MAX {
                    search.prev_twin[op] = last_twin.insert(ops[op].effect, op);
                }
            }
        }
        search
    }

    /// Unlinks a call node and its return node.
    fn lift(&mut self, call: usize) {
        let ret = self.partner[call];
        self.next[self.prev[call]] = self.next[call];
        self.prev[self.next[call]] = self.prev[call];
        self.next[self.prev[ret]] = self.next[ret];
        if self.next[ret] != NIL {
            self.prev[self.next[ret]] = self.prev[ret];
        }
    }

    /// Undoes the most recent [`Search::lift`] still in effect.
    fn unlift(&mut self, call: usize) {
        let ret = self.partner[call];
        self.next[self.prev[ret]] = ret;
        if self.next[ret] != NIL {
            self.prev[self.next[ret]] = ret;
        }
        self.next[self.prev[call]] = call;
        self.prev[self.next[call]] = call;
    }

    fn run(mut self, budget: u64) -> Result<(), Failure> {
        let mut linearized = vec![0u64; self.ops.len().div_ceil(64)];
        let mut cache: HashSet<(Vec<u64>, u32)> = HashSet::new();
        // Linearized call nodes with the register value before each.
        let mut calls: Vec<(usize, u32)> = Vec::new();
        let mut state = 0;
        let mut deepest: Option<Deepest> = None;
        let mut entry = self.next[HEAD];
        let mut steps = 0;
        while self.next[HEAD] != NIL {
            if steps == budget {
                return Err(Failure::Budget(steps));
            }
            steps += 1;
            let op = self.op_of[entry];
            let twin_first = self.prev_twin[op]
                .is_some_and(|twin| linearized[twin / 64] & (1 << (twin % 64)) == 0);
            if self.is_call[entry] && !twin_first {
                if let Some(after) = self.ops[op].effect.step(state) {
                    linearized[op / 64] |= 1 << (op % 64);
                    if cache.insert((linearized.clone(), after)) {
                        calls.push((entry, state));
                        state = after;
                        self.lift(entry);
                        entry = self.next[HEAD];
                        continue;
                    }
                    linearized[op / 64] &= !(1 << (op % 64));
                }
                // A call is always followed by its own return, so this is a node.
                entry = self.next[entry];
            } else if self.is_call[entry] {
                entry = self.next[entry];
            } else {
                if deepest
                    .as_ref()
                    .is_none_or(|d| calls.len() > d.prefix.len())
                {
                    deepest = Some(self.snapshot(&calls, state, entry));
                }
                let Some((call, before)) = calls.pop() else {
                    let deepest = deepest.unwrap_or_else(|| self.snapshot(&calls, state, entry));
                    return Err(Failure::NoLinearization(deepest));
                };
                let undone = self.op_of[call];
                linearized[undone / 64] &= !(1 << (undone % 64));
                state = before;
                self.unlift(call);
                entry = self.next[call];
            }
        }
        Ok(())
    }

    /// Records where the search stands when it meets the return `entry`.
    fn snapshot(&self, calls: &[(usize, u32)], state: u32, entry: usize) -> Deepest {
        // Everything before the first unmatched return is a pending call.
        let mut pending = Vec::new();
        let mut node = self.next[HEAD];
        while node != entry && node != NIL {
            if self.is_call[node] {
                pending.push(self.op_of[node]);
            }
            node = self.next[node];
        }
        Deepest {
            prefix: calls.iter().map(|&(call, _)| self.op_of[call]).collect(),
            state,
            blocked: self.op_of[entry],
            pending,
        }
    }
}

const SHOWN_PENDING: usize = 10;
const SHOWN_PREFIX: usize = 5;

fn explain(ops: &[KeyOp], values: &Values, total: usize, deepest: &Deepest) -> String {
    let blocked = &ops[deepest.blocked];
    let mut message = format!(
        "no order of its {total} operations respects both real time and the register. \
         The longest linearizable prefix orders {} operations and leaves the value {}; \
         then {} had to take effect before it returned, but none of the operations \
         pending by then can go next:",
        deepest.prefix.len(),
        values.show(deepest.state),
        describe(blocked.source),
    );
    for &i in deepest.pending.iter().take(SHOWN_PENDING) {
        let op = &ops[i];
        let why = match op.effect {
            Effect::Read(v) => format!(
                "reads {} but the value is {}",
                values.show(v),
                values.show(deepest.state)
            ),
            Effect::Cas { expected, .. } if expected != deepest.state => format!(
                "expects {} but the value is {}",
                values.show(expected),
                values.show(deepest.state)
            ),
            _ => "could go next, but every order continuing from it fails".to_owned(),
        };
        message.push_str(&format!("\n  {}: {why}", describe(op.source)));
    }
    if deepest.pending.len() > SHOWN_PENDING {
        message.push_str(&format!(
            "\n  ... and {} more",
            deepest.pending.len() - SHOWN_PENDING
        ));
    }
    if !deepest.prefix.is_empty() {
        let skip = deepest.prefix.len().saturating_sub(SHOWN_PREFIX);
        message.push_str("\nThe prefix ends with:");
        if skip > 0 {
            message.push_str(&format!("\n  ... {skip} earlier operations"));
        }
        for &i in &deepest.prefix[skip..] {
            message.push_str(&format!("\n  {}", describe(ops[i].source)));
        }
    }
    message
}

/// One operation for a failure message, e.g.
/// `#7 process 2 get -> "a" ok [call 120, return 180]`.
fn describe(op: &Operation) -> String {
    fn show(value: Option<&str>) -> String {
        value.map_or_else(|| "absent".to_owned(), |v| format!("{v:?}"))
    }
    let what = match (&op.op, &op.outcome) {
        (Op::Put { value }, _) => format!("put {value:?}"),
        (Op::Get, Outcome::Ok(read)) => format!("get -> {}", show(read.as_deref())),
        (Op::Get, _) => "get".to_owned(),
        (Op::Cas { expected, new }, _) => format!("cas {} -> {new:?}", show(expected.as_deref())),
    };
    let outcome = match op.outcome {
        Outcome::Ok(_) => "ok",
        Outcome::Fail => "fail",
        Outcome::Info => "info",
    };
    let ret = op.ret.map_or_else(|| "none".to_owned(), |t| t.to_string());
    format!(
        "#{} process {} {what} {outcome} [call {}, return {ret}]",
        op.id.0, op.process, op.call
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::OpId;
    use proptest::prelude::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// One operation to record: its interval and outcome (`ret: None` means
    /// it never completes).
    #[derive(Clone, Debug)]
    struct Spec {
        op: Op,
        outcome: Outcome,
        call: u64,
        ret: Option<u64>,
    }

    fn spec(op: Op, outcome: Outcome, call: u64, ret: u64) -> Spec {
        Spec {
            op,
            outcome,
            call,
            ret: Some(ret),
        }
    }

    fn put(v: &str) -> Op {
        Op::Put { value: v.into() }
    }

    fn cas(expected: Option<&str>, new: &str) -> Op {
        Op::Cas {
            expected: expected.map(Into::into),
            new: new.into(),
        }
    }

    fn ok() -> Outcome {
        Outcome::Ok(None)
    }

    fn read(v: Option<&str>) -> Outcome {
        Outcome::Ok(v.map(Into::into))
    }

    /// Records specs on key "k" in time order (returns before calls at equal
    /// times), giving each call the lowest free process id, as a Jepsen
    /// client pool would.
    fn record(specs: &[Spec]) -> History {
        // (time, rank, index): at equal times returns (rank 0) come before
        // calls (1), except that an instant operation returns after its call.
        let mut events: Vec<(u64, u8, usize)> = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            events.push((s.call, 1, i));
            if let Some(ret) = s.ret {
                events.push((ret, if ret == s.call { 2 } else { 0 }, i));
            }
        }
        events.sort();
        let mut h = History::new();
        let mut ids = vec![OpId(0); specs.len()];
        let mut free: BTreeSet<u64> = BTreeSet::new();
        let mut next_process = 0;
        for (time, rank, i) in events {
            if rank == 1 {
                let process = free.pop_first().unwrap_or_else(|| {
                    next_process += 1;
                    next_process - 1
                });
                ids[i] = h.invoke(process, "k", specs[i].op.clone(), time).unwrap();
            } else {
                h.complete(ids[i], specs[i].outcome.clone(), time).unwrap();
                if specs[i].outcome != Outcome::Info {
                    free.insert(h.ops()[ids[i].0].process);
                }
            }
        }
        h
    }

    fn violation_of(specs: &[Spec]) -> Violation {
        match check(&record(specs)) {
            Err(CheckError::Violation(v)) => v,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    fn accepts(specs: &[Spec]) {
        assert_eq!(check(&record(specs)), Ok(()));
    }

    #[test]
    fn empty_and_sequential_histories_pass() {
        accepts(&[]);
        accepts(&[
            spec(Op::Get, read(None), 0, 1),
            spec(put("a"), ok(), 2, 3),
            spec(Op::Get, read(Some("a")), 4, 5),
            spec(cas(Some("a"), "b"), ok(), 6, 7),
            spec(Op::Get, read(Some("b")), 8, 9),
        ]);
    }

    #[test]
    fn stale_read_after_completed_write_fails() {
        let v = violation_of(&[
            spec(put("a"), ok(), 0, 10),
            spec(put("b"), ok(), 20, 30),
            spec(Op::Get, read(Some("a")), 40, 50),
        ]);
        assert_eq!(v.key, "k");
        assert!(
            v.message
                .contains(r#"#2 process 0 get -> "a" ok [call 40, return 50]"#),
            "{}",
            v.message
        );
        assert!(
            v.message.contains(r#"reads "a" but the value is "b""#),
            "{}",
            v.message
        );
        assert!(
            v.message
                .contains(r#"#1 process 0 put "b" ok [call 20, return 30]"#),
            "{}",
            v.message
        );
    }

    #[test]
    fn read_of_absent_after_completed_write_fails() {
        violation_of(&[
            spec(put("a"), ok(), 0, 10),
            spec(Op::Get, read(None), 11, 12),
        ]);
        // Concurrent with the write it may see either.
        accepts(&[
            spec(put("a"), ok(), 0, 10),
            spec(Op::Get, read(None), 5, 12),
        ]);
    }

    #[test]
    fn concurrent_writes_may_be_observed_in_either_order() {
        for (first, second) in [("a", "b"), ("b", "a")] {
            accepts(&[
                spec(put("a"), ok(), 0, 10),
                spec(put("b"), ok(), 0, 10),
                spec(Op::Get, read(Some(first)), 1, 9),
                spec(Op::Get, read(Some(second)), 20, 30),
            ]);
        }
        // ...but two later sequential reads cannot disagree.
        violation_of(&[
            spec(put("a"), ok(), 0, 10),
            spec(put("b"), ok(), 0, 10),
            spec(Op::Get, read(Some("a")), 20, 30),
            spec(Op::Get, read(Some("b")), 40, 50),
        ]);
    }

    #[test]
    fn read_of_a_value_never_written_fails() {
        let v = violation_of(&[
            spec(put("a"), ok(), 0, 10),
            spec(Op::Get, read(Some("z")), 0, 10),
        ]);
        assert!(
            v.message
                .contains(r#"read "z", a value no put or cas wrote"#),
            "{}",
            v.message
        );
        // A failed write does not count as writing it.
        violation_of(&[
            spec(put("z"), Outcome::Fail, 0, 10),
            spec(Op::Get, read(Some("z")), 0, 10),
        ]);
    }

    #[test]
    fn read_going_back_in_time_fails() {
        let v = violation_of(&[
            spec(put("a"), ok(), 0, 10),
            spec(put("b"), ok(), 5, 100),
            spec(Op::Get, read(Some("b")), 20, 30),
            spec(Op::Get, read(Some("a")), 40, 50),
        ]);
        assert!(
            v.message.contains(r#"reads "a" but the value is "b""#),
            "{}",
            v.message
        );
    }

    #[test]
    fn read_of_a_write_invoked_later_fails() {
        violation_of(&[
            spec(Op::Get, read(Some("a")), 0, 10),
            spec(put("a"), ok(), 20, 30),
        ]);
    }

    #[test]
    fn cas_success_and_failure() {
        accepts(&[
            spec(cas(None, "a"), ok(), 0, 1),
            spec(cas(Some("a"), "b"), ok(), 2, 3),
            spec(cas(Some("a"), "c"), Outcome::Fail, 4, 5),
            spec(Op::Get, read(Some("b")), 6, 7),
        ]);
        // A cas cannot succeed on a value that has been overwritten.
        let v = violation_of(&[
            spec(put("a"), ok(), 0, 1),
            spec(put("b"), ok(), 2, 3),
            spec(cas(Some("a"), "c"), ok(), 4, 5),
        ]);
        assert!(
            v.message.contains(r#"expects "a" but the value is "b""#),
            "{}",
            v.message
        );
        // Two successful cas from the same value cannot both happen.
        violation_of(&[
            spec(put("a"), ok(), 0, 1),
            spec(cas(Some("a"), "b"), ok(), 2, 10),
            spec(cas(Some("a"), "c"), ok(), 2, 10),
        ]);
        // A cas expecting a never-written value cannot succeed.
        let v = violation_of(&[spec(cas(Some("q"), "c"), ok(), 0, 1)]);
        assert!(
            v.message.contains(r#"succeeded expecting "q""#),
            "{}",
            v.message
        );
        // A failed cas is ignored, even one that "should" have succeeded.
        accepts(&[
            spec(cas(None, "a"), Outcome::Fail, 0, 1),
            spec(Op::Get, read(None), 2, 3),
        ]);
    }

    #[test]
    fn unknown_writes_may_or_may_not_take_effect() {
        for pending in [false, true] {
            let ret = if pending { None } else { Some(10) };
            let unknown_at = |op: Op, call: u64| Spec {
                op,
                outcome: Outcome::Info,
                call,
                ret: ret.map(|r| call + r),
            };
            let unknown = |op: Op| unknown_at(op, 0);
            // Took effect, observed long after it timed out.
            accepts(&[unknown(put("a")), spec(Op::Get, read(Some("a")), 100, 110)]);
            // Did not take effect.
            accepts(&[unknown(put("a")), spec(Op::Get, read(None), 100, 110)]);
            // Took effect late: absent, then "a".
            accepts(&[
                unknown(put("a")),
                spec(Op::Get, read(None), 100, 110),
                spec(Op::Get, read(Some("a")), 120, 130),
            ]);
            // Same for a cas.
            accepts(&[
                unknown(cas(None, "a")),
                spec(Op::Get, read(Some("a")), 100, 110),
            ]);
            accepts(&[unknown(cas(None, "a")), spec(Op::Get, read(None), 100, 110)]);
            // But it cannot take effect before it was called...
            violation_of(&[
                spec(Op::Get, read(Some("a")), 0, 10),
                unknown_at(put("a"), 20),
            ]);
            // ...nor be undone once observed...
            violation_of(&[
                unknown(put("a")),
                spec(Op::Get, read(Some("a")), 100, 110),
                spec(Op::Get, read(None), 120, 130),
            ]);
            // ...and an unknown cas only applies when its expectation holds.
            violation_of(&[
                spec(put("b"), ok(), 0, 5),
                unknown_at(cas(None, "a"), 6),
                spec(Op::Get, read(Some("a")), 100, 110),
            ]);
        }
    }

    #[test]
    fn unknown_reads_and_failed_operations_are_ignored() {
        accepts(&[
            spec(put("a"), ok(), 0, 1),
            spec(put("b"), Outcome::Fail, 2, 3),
            spec(Op::Get, Outcome::Fail, 4, 5),
            spec(Op::Get, Outcome::Info, 6, 7),
            spec(Op::Get, read(Some("a")), 8, 9),
        ]);
    }

    #[test]
    fn unobserved_unknown_writes_are_dropped_transitively() {
        let mut values = Values::default();
        let sources: Vec<Operation> = [
            (put("a"), Outcome::Info),
            (cas(Some("a"), "b"), Outcome::Info),
            (put("c"), Outcome::Info),
            (Op::Get, read(Some("c"))),
            (put("d"), ok()),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (op, outcome))| Operation {
            id: OpId(i),
            process: i as u64,
            key: "k".into(),
            op,
            call: 0,
            ret: Some(1),
            outcome,
        })
        .collect();
        let mut ops: Vec<KeyOp> = sources
            .iter()
            .filter_map(|o| KeyOp::new(o, &mut values))
            .collect();
        drop_unobserved_unknown_writes(&mut ops);
        // "b" is never observed, so its cas goes; then nothing expects "a".
        let kept: Vec<usize> = ops.iter().map(|o| o.source.id.0).collect();
        assert_eq!(kept, vec![2, 3, 4]);
    }

    #[test]
    fn many_keys_are_checked_independently() {
        let mut h = History::new();
        let a = h.invoke(1, "x", put("1"), 0).unwrap();
        let b = h.invoke(2, "y", put("2"), 0).unwrap();
        h.complete(a, ok(), 1).unwrap();
        h.complete(b, ok(), 1).unwrap();
        let c = h.invoke(1, "x", Op::Get, 2).unwrap();
        let d = h.invoke(2, "y", Op::Get, 2).unwrap();
        h.complete(c, read(Some("1")), 3).unwrap();
        h.complete(d, read(Some("2")), 3).unwrap();
        assert_eq!(check(&h), Ok(()));
        // "2" was written, but to the other key.
        let e = h.invoke(1, "x", Op::Get, 4).unwrap();
        h.complete(e, read(Some("2")), 5).unwrap();
        match check(&h) {
            Err(CheckError::Violation(v)) => assert_eq!(v.key, "x"),
            other => panic!("expected a violation on x, got {other:?}"),
        }
    }

    #[test]
    fn budget_exhaustion_is_no_verdict() {
        let specs = clients_history(&draws(7, 200, 5), false);
        let h = record(&specs);
        assert_eq!(
            check_with_budget(&h, 10),
            Err(CheckError::TooLarge {
                key: "k".into(),
                ops: Search::ops_for_test(&h),
                steps: 10
            })
        );
        assert_eq!(check(&h), Ok(()));
    }

    impl Search<'_, '_> {
        fn ops_for_test(h: &History) -> usize {
            let mut values = Values::default();
            let mut ops: Vec<KeyOp> = h
                .ops()
                .iter()
                .filter_map(|o| KeyOp::new(o, &mut values))
                .collect();
            drop_unobserved_unknown_writes(&mut ops);
            ops.len()
        }
    }

    /// One client step: which client, its think time and duration, where in
    /// its interval it takes effect (per mille), and what it does.
    #[derive(Clone, Debug)]
    struct Draw {
        client: u64,
        gap: u64,
        len: u64,
        at: u64,
        kind: u8,
        value: u8,
        expect: u8,
        fate: u8,
    }

    const POOL: [&str; 3] = ["a", "b", "c"];

    fn draw_strategy(clients: u64) -> impl Strategy<Value = Draw> {
        (
            0..clients,
            0u64..30,
            1u64..80,
            0u64..=1000,
            0u8..4,
            0u8..3,
            0u8..5,
            0u8..10,
        )
            .prop_map(|(client, gap, len, at, kind, value, expect, fate)| Draw {
                client,
                gap,
                len,
                at,
                kind,
                value,
                expect,
                fate,
            })
    }

    fn draws(seed: u64, n: usize, clients: u64) -> Vec<Draw> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut below = |n: u64| rng.next_u64() % n;
        (0..n)
            .map(|_| Draw {
                client: below(clients),
                gap: below(30),
                len: 1 + below(79),
                at: below(1001),
                kind: below(4) as u8,
                value: below(3) as u8,
                expect: below(5) as u8,
                fate: below(10) as u8,
            })
            .collect()
    }

    /// Runs the draws against a real register: each client issues its
    /// operations back to back, each takes effect at one instant inside its
    /// interval, and outcomes are what the register did. Values are unique
    /// per draw, or else repeat (a pool of three) so that unknown writes that
    /// did not happen can still look observed. Always linearizable.
    fn clients_history(draws: &[Draw], unique: bool) -> Vec<Spec> {
        let mut free_at: BTreeMap<u64, u64> = BTreeMap::new();
        // (effect instant, index) of each draw, executed in instant order.
        let mut timed: Vec<(u64, usize, u64, u64)> = Vec::new();
        for (i, d) in draws.iter().enumerate() {
            let free = free_at.entry(d.client).or_insert(0);
            let call = *free + d.gap;
            let ret = call + d.len;
            *free = ret;
            timed.push((call + d.len * d.at / 1000, i, call, ret));
        }
        timed.sort();
        let mut state: Option<String> = None;
        let mut specs = Vec::new();
        for (_, i, call, ret) in timed {
            let d = &draws[i];
            let value = if unique {
                format!("{}{i}", POOL[d.value as usize])
            } else {
                POOL[d.value as usize].to_owned()
            };
            // fate 8: timed out; fate 9: never heard back.
            let unknown_ret = if d.fate == 9 { None } else { Some(ret) };
            let (op, outcome, ret) = match d.kind {
                0 => {
                    state = Some(value.clone());
                    let op = Op::Put { value };
                    if d.fate >= 8 {
                        (op, Outcome::Info, unknown_ret)
                    } else {
                        (op, ok(), Some(ret))
                    }
                }
                1 => match d.fate {
                    8 => (Op::Get, Outcome::Info, Some(ret)),
                    9 => (Op::Get, Outcome::Fail, Some(ret)),
                    _ => (Op::Get, Outcome::Ok(state.clone()), Some(ret)),
                },
                2 => {
                    let expected = match d.expect {
                        0 | 1 => state.clone(),
                        2 => None,
                        e => Some(POOL[e as usize - 2].to_owned()),
                    };
                    let applies = expected == state;
                    if applies {
                        state = Some(value.clone());
                    }
                    let op = Op::Cas {
                        expected,
                        new: value,
                    };
                    match (applies, d.fate >= 8) {
                        (_, true) => (op, Outcome::Info, unknown_ret),
                        (true, false) => (op, ok(), Some(ret)),
                        (false, false) => (op, Outcome::Fail, Some(ret)),
                    }
                }
                // A write that never happened: refused or lost.
                _ => {
                    let op = Op::Put { value };
                    if d.fate >= 5 {
                        (op, Outcome::Info, unknown_ret)
                    } else {
                        (op, Outcome::Fail, Some(ret))
                    }
                }
            };
            specs.push(Spec {
                op,
                outcome,
                call,
                ret,
            });
        }
        specs
    }

    /// Reference model: tries every subset of unknown writes and every order
    /// that respects real time. Exponential; for tiny histories only.
    fn brute_force(specs: &[Spec]) -> bool {
        let ops: Vec<&Spec> = specs
            .iter()
            .filter(|s| {
                !matches!(
                    (&s.op, &s.outcome),
                    (_, Outcome::Fail) | (Op::Get, Outcome::Info)
                )
            })
            .collect();
        let unknown: Vec<usize> = (0..ops.len())
            .filter(|&i| ops[i].outcome == Outcome::Info)
            .collect();
        (0u32..1 << unknown.len()).any(|mask| {
            let chosen: Vec<usize> = (0..ops.len())
                .filter(|i| match unknown.iter().position(|u| u == i) {
                    Some(bit) => mask & (1 << bit) != 0,
                    None => true,
                })
                .collect();
            orders(&ops, &chosen, &mut vec![false; ops.len()], None)
        })
    }

    fn end(s: &Spec) -> u64 {
        match (s.ret, &s.outcome) {
            (Some(ret), outcome) if *outcome != Outcome::Info => ret,
            _ => u64::MAX,
        }
    }

    fn orders(
        ops: &[&Spec],
        chosen: &[usize],
        done: &mut Vec<bool>,
        state: Option<String>,
    ) -> bool {
        let left: Vec<usize> = chosen.iter().copied().filter(|&i| !done[i]).collect();
        if left.is_empty() {
            return true;
        }
        left.iter().any(|&i| {
            let s = ops[i];
            if left.iter().any(|&j| end(ops[j]) < s.call) {
                return false;
            }
            let after = match (&s.op, &s.outcome) {
                (Op::Put { value }, _) => Some(Some(value.clone())),
                (Op::Get, Outcome::Ok(v)) => (*v == state).then(|| state.clone()),
                (Op::Cas { expected, new }, Outcome::Info) => Some(if *expected == state {
                    Some(new.clone())
                } else {
                    state.clone()
                }),
                (Op::Cas { expected, new }, _) => (*expected == state).then(|| Some(new.clone())),
                _ => None,
            };
            let Some(after) = after else { return false };
            done[i] = true;
            let found = orders(ops, chosen, done, after);
            done[i] = false;
            found
        })
    }

    fn arbitrary_spec() -> impl Strategy<Value = Spec> {
        let value = prop::sample::select(vec!["a", "b"]);
        let maybe = prop::option::of(prop::sample::select(vec!["a", "b"]));
        let op = prop_oneof![
            value.clone().prop_map(put),
            Just(Op::Get),
            (maybe.clone(), value).prop_map(|(e, n)| cas(e, n)),
        ];
        let outcome = prop_oneof![
            4 => maybe.prop_map(read),
            1 => Just(Outcome::Fail),
            2 => Just(Outcome::Info),
        ];
        (op, outcome, 0u64..30, 0u64..30, any::<bool>()).prop_map(
            |(op, outcome, call, len, pending)| {
                // Gets and puts report `Ok(None)`-shaped results only as models allow.
                let outcome = match (&op, outcome) {
                    (Op::Get, o) => o,
                    (_, Outcome::Ok(_)) => ok(),
                    (_, o) => o,
                };
                let ret = (!(pending && outcome == Outcome::Info)).then_some(call + len);
                Spec {
                    op,
                    outcome,
                    call,
                    ret,
                }
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn executions_of_a_real_register_are_linearizable(
            draws in prop::collection::vec(draw_strategy(4), 0..60),
            unique in any::<bool>(),
        ) {
            let h = record(&clients_history(&draws, unique));
            prop_assert_eq!(check(&h), Ok(()));
        }

        #[test]
        fn a_corrupted_read_is_caught(
            draws in prop::collection::vec(draw_strategy(4), 1..60),
            unique in any::<bool>(),
            pick in any::<prop::sample::Index>(),
        ) {
            let mut specs = clients_history(&draws, unique);
            let reads: Vec<usize> = (0..specs.len())
                .filter(|&i| specs[i].op == Op::Get && matches!(specs[i].outcome, Outcome::Ok(_)))
                .collect();
            prop_assume!(!reads.is_empty());
            specs[reads[pick.index(reads.len())]].outcome = read(Some("never-written"));
            let h = record(&specs);
            prop_assert!(matches!(check(&h), Err(CheckError::Violation(_))));
            // The search alone, without the never-written shortcut, agrees.
            let ops: Vec<&Operation> = h.ops().iter().collect();
            let mut values = Values::default();
            let mut key_ops: Vec<KeyOp> = ops.iter().filter_map(|o| KeyOp::new(o, &mut values)).collect();
            drop_unobserved_unknown_writes(&mut key_ops);
            bound_observed_unique_writes(&mut key_ops);
            prop_assert!(matches!(
                Search::new(&key_ops).run(DEFAULT_STEP_BUDGET),
                Err(Failure::NoLinearization(_))
            ));
        }

        #[test]
        fn agrees_with_brute_force(specs in prop::collection::vec(arbitrary_spec(), 0..9)) {
            let verdict = check(&record(&specs));
            prop_assert!(!matches!(verdict, Err(CheckError::TooLarge { .. })), "{:?}", verdict);
            prop_assert_eq!(verdict.is_ok(), brute_force(&specs), "{:?}", verdict);
        }
    }

    #[test]
    fn two_thousand_ops_with_five_clients() {
        let specs = clients_history(&draws(42, 2000, 5), true);
        assert!(specs.iter().any(|s| s.outcome == Outcome::Info));
        let h = record(&specs);
        assert_eq!(h.len(), 2000);
        assert_eq!(check(&h), Ok(()));
    }

    /// Unknown writes of repeated values are the expensive case; with unique
    /// values a failing search over 2,000 operations is as quick as a
    /// passing one.
    #[test]
    fn two_thousand_ops_with_a_late_corrupted_read() {
        let mut specs = clients_history(&draws(43, 2000, 5), true);
        let last_read = (0..specs.len())
            .rev()
            .find(|&i| specs[i].op == Op::Get && matches!(specs[i].outcome, Outcome::Ok(_)))
            .unwrap();
        specs[last_read].outcome = read(Some("never-written"));
        let h = record(&specs);
        assert!(matches!(check(&h), Err(CheckError::Violation(_))));
        // Without the never-written shortcut the search must exhaust every
        // order up to that read.
        let mut values = Values::default();
        let mut key_ops: Vec<KeyOp> = h
            .ops()
            .iter()
            .filter_map(|o| KeyOp::new(o, &mut values))
            .collect();
        drop_unobserved_unknown_writes(&mut key_ops);
        bound_observed_unique_writes(&mut key_ops);
        assert!(key_ops.iter().any(|o| o.unknown));
        assert!(matches!(
            Search::new(&key_ops).run(DEFAULT_STEP_BUDGET),
            Err(Failure::NoLinearization(_))
        ));
    }

    #[test]
    fn observed_unique_unknown_writes_are_bounded() {
        let mut values = Values::default();
        let sources: Vec<Operation> = [
            (put("a"), Outcome::Info, 0, None),
            (Op::Get, read(Some("a")), 50, Some(60)),
            (Op::Get, read(Some("a")), 30, Some(40)),
            (put("b"), Outcome::Info, 0, Some(5)),
            (put("b"), ok(), 0, Some(5)),
            (Op::Get, read(Some("b")), 30, Some(40)),
            (cas(Some("c"), "d"), Outcome::Info, 45, None),
            (put("c"), Outcome::Info, 0, Some(5)),
            (cas(Some("d"), "e"), ok(), 0, Some(44)),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (op, outcome, call, ret))| Operation {
            id: OpId(i),
            process: i as u64,
            key: "k".into(),
            op,
            call,
            ret,
            outcome,
        })
        .collect();
        let mut ops: Vec<KeyOp> = sources
            .iter()
            .filter_map(|o| KeyOp::new(o, &mut values))
            .collect();
        bound_observed_unique_writes(&mut ops);
        let rets: Vec<u64> = ops.iter().map(|o| o.ret).collect();
        // "a": first observer returned at 40. "b" has two writers. "c" is
        // expected only by an unknown cas, which needs nothing. "d" is
        // observed at 44, before its only writer was called at 45.
        assert_eq!(rets, vec![40, 60, 40, u64::MAX, 5, 40, 45, u64::MAX, 44]);
    }
}
