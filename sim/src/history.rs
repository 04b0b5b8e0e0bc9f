//! The client history a simulation records (DESIGN.md §8 "Checkers"), and its
//! JSON-lines form that Jepsen-style tools read.
//!
//! Clients call [`History::invoke`] when they send a request and
//! [`History::complete`] when they learn its outcome. The history keeps both
//! views: the event log in recording order (what [`History::write_jsonl`]
//! emits) and one [`Operation`] per invocation with its call and return times
//! (what the linearizability checker reads).
//!
//! **Time** is simulated nanoseconds since the start of the run, Jepsen's
//! convention for `:time`. The checker only compares times, so any monotonic
//! unit works, but every event must be recorded in non-decreasing time order:
//! Jepsen tools (Knossos) take real-time precedence from the *order* of the
//! lines, our checker takes it from `time`, and refusing out-of-order events
//! keeps the two in agreement.
//!
//! **Processes** follow Jepsen's rules so that the JSON lines are well formed:
//! a process has at most one operation outstanding, and a process whose
//! operation ended `info` (or never ended) is crashed for good, because that
//! operation may still take effect at any later time; the client continues
//! under a fresh process id.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io;

/// An operation on one key's register.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    Put {
        value: String,
    },
    Get,
    Cas {
        expected: Option<String>,
        new: String,
    },
}

/// How an operation ended, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// It took effect. Carries the value read for `Get` (`None`: the key was
    /// absent); `Put` and `Cas` carry `None`.
    Ok(Option<String>),
    /// It definitely did not take effect (a CAS whose expected value did not
    /// match, or a request the cluster refused before proposing it).
    Fail,
    /// Unknown (e.g. a timeout): it may or may not have taken effect, at any
    /// time after its call.
    Info,
}

/// Identifies one invocation in a [`History`]; it is the operation's index in
/// [`History::ops`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId(pub usize);

/// One invocation with its call time and, once known, its outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub id: OpId,
    pub process: u64,
    pub key: String,
    pub op: Op,
    pub call: u64,
    /// When the outcome was recorded; `None` if it never was. A checker treats
    /// the return of an `Info` operation as +infinity whatever this says.
    pub ret: Option<u64>,
    /// `Info` until completed, so an operation that never completes counts as
    /// unknown.
    pub outcome: Outcome,
}

impl Operation {
    /// Whether this operation has been completed.
    pub fn is_completed(&self) -> bool {
        self.ret.is_some()
    }
}

/// The `type` of a JSON-lines event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// The `f` of a JSON-lines event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Function {
    Put,
    Get,
    Cas,
}

/// The `value` of a JSON-lines event, following Jepsen's register
/// conventions: a put carries its value, a get carries `null` on invocation
/// and the value read (or `null` for absent) on `ok`, and a cas carries
/// `[expected, new]`. Completions of puts and cas operations repeat the invoked value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventValue {
    /// `null` or a string.
    One(Option<String>),
    /// `[expected, new]` of a cas.
    Pair(Option<String>, String),
}

/// One line of the JSON-lines history; fields serialize in this order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub f: Function,
    pub key: String,
    pub value: EventValue,
    /// Simulated nanoseconds since the start of the run.
    pub time: u64,
}

/// Why the history refused to record an event; the history is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum HistoryError {
    #[error("process {process} invoked a new operation while its operation {pending:?} is still outstanding")]
    ProcessBusy { process: u64, pending: OpId },
    #[error("process {process} invoked an operation after crashing with an unknown outcome; continue under a fresh process id")]
    ProcessCrashed { process: u64 },
    #[error("operation {id:?} does not exist in this history")]
    UnknownOp { id: OpId },
    #[error("operation {id:?} was already completed")]
    AlreadyCompleted { id: OpId },
    #[error("event at time {time} was recorded after an event at time {last}; events must be recorded in time order")]
    TimeWentBackwards { time: u64, last: u64 },
}

/// A recorded client history over any number of keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    ops: Vec<Operation>,
    events: Vec<Event>,
    /// The outstanding operation of each busy process.
    pending: BTreeMap<u64, OpId>,
    /// Processes whose last operation ended `Info`; they may not invoke again.
    crashed: BTreeSet<u64>,
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the invocation of `op` on `key` by `process` at `time`.
    pub fn invoke(
        &mut self,
        process: u64,
        key: &str,
        op: Op,
        time: u64,
    ) -> Result<OpId, HistoryError> {
        self.check_time(time)?;
        if let Some(&pending) = self.pending.get(&process) {
            return Err(HistoryError::ProcessBusy { process, pending });
        }
        if self.crashed.contains(&process) {
            return Err(HistoryError::ProcessCrashed { process });
        }
        let id = OpId(self.ops.len());
        self.events.push(Event {
            process,
            kind: EventType::Invoke,
            f: function(&op),
            key: key.to_owned(),
            value: invoke_value(&op),
            time,
        });
        self.ops.push(Operation {
            id,
            process,
            key: key.to_owned(),
            op,
            call: time,
            ret: None,
            outcome: Outcome::Info,
        });
        self.pending.insert(process, id);
        Ok(id)
    }

    /// Records the outcome of operation `id` at `time`.
    pub fn complete(&mut self, id: OpId, outcome: Outcome, time: u64) -> Result<(), HistoryError> {
        self.check_time(time)?;
        let operation = self
            .ops
            .get_mut(id.0)
            .ok_or(HistoryError::UnknownOp { id })?;
        if operation.ret.is_some() {
            return Err(HistoryError::AlreadyCompleted { id });
        }
        let (kind, value) = match &outcome {
            Outcome::Ok(read) => match operation.op {
                Op::Get => (EventType::Ok, EventValue::One(read.clone())),
                _ => (EventType::Ok, invoke_value(&operation.op)),
            },
            Outcome::Fail => (EventType::Fail, invoke_value(&operation.op)),
            Outcome::Info => (EventType::Info, invoke_value(&operation.op)),
        };
        if outcome == Outcome::Info {
            self.crashed.insert(operation.process);
        }
        self.pending.remove(&operation.process);
        self.events.push(Event {
            process: operation.process,
            kind,
            f: function(&operation.op),
            key: operation.key.clone(),
            value,
            time,
        });
        operation.ret = Some(time);
        operation.outcome = outcome;
        Ok(())
    }

    /// Every invocation in call order, completed or not; an operation never
    /// completed has `ret: None` and outcome `Info`.
    pub fn ops(&self) -> &[Operation] {
        &self.ops
    }

    /// The event log in recording order.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Writes one JSON object per event, in recording order. Operations that
    /// never completed appear only as their `invoke` line, which Jepsen tools
    /// read as indeterminate.
    pub fn write_jsonl(&self, w: &mut impl io::Write) -> io::Result<()> {
        for event in &self.events {
            serde_json::to_writer(&mut *w, event)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    }

    /// The number of invocations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Every key an operation touched, sorted.
    pub fn keys(&self) -> BTreeSet<&str> {
        self.ops.iter().map(|o| o.key.as_str()).collect()
    }

    fn check_time(&self, time: u64) -> Result<(), HistoryError> {
        match self.events.last() {
            Some(last) if last.time > time => Err(HistoryError::TimeWentBackwards {
                time,
                last: last.time,
            }),
            _ => Ok(()),
        }
    }
}

fn function(op: &Op) -> Function {
    match op {
        Op::Put { .. } => Function::Put,
        Op::Get => Function::Get,
        Op::Cas { .. } => Function::Cas,
    }
}

fn invoke_value(op: &Op) -> EventValue {
    match op {
        Op::Put { value } => EventValue::One(Some(value.clone())),
        Op::Get => EventValue::One(None),
        Op::Cas { expected, new } => EventValue::Pair(expected.clone(), new.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(v: &str) -> Op {
        Op::Put { value: v.into() }
    }

    #[test]
    fn jsonl_output_is_exact() {
        let mut h = History::new();
        let a = h.invoke(1, "k", put("a"), 10).unwrap();
        let b = h.invoke(2, "k", Op::Get, 12).unwrap();
        let c = h
            .invoke(
                3,
                "k\"2",
                Op::Cas {
                    expected: None,
                    new: "x".into(),
                },
                13,
            )
            .unwrap();
        h.complete(a, Outcome::Ok(None), 20).unwrap();
        h.complete(b, Outcome::Ok(Some("a".into())), 21).unwrap();
        h.complete(c, Outcome::Fail, 22).unwrap();
        let d = h.invoke(1, "k", Op::Get, 30).unwrap();
        h.complete(d, Outcome::Ok(None), 31).unwrap();
        let e = h
            .invoke(
                2,
                "k",
                Op::Cas {
                    expected: Some("a".into()),
                    new: "b".into(),
                },
                40,
            )
            .unwrap();
        h.complete(e, Outcome::Info, 50).unwrap();
        h.invoke(4, "k", Op::Get, 60).unwrap();

        let mut out = Vec::new();
        h.write_jsonl(&mut out).unwrap();
        let expected = concat!(
            r#"{"process":1,"type":"invoke","f":"put","key":"k","value":"a","time":10}"#,
            "\n",
            r#"{"process":2,"type":"invoke","f":"get","key":"k","value":null,"time":12}"#,
            "\n",
            r#"{"process":3,"type":"invoke","f":"cas","key":"k\"2","value":[null,"x"],"time":13}"#,
            "\n",
            r#"{"process":1,"type":"ok","f":"put","key":"k","value":"a","time":20}"#,
            "\n",
            r#"{"process":2,"type":"ok","f":"get","key":"k","value":"a","time":21}"#,
            "\n",
            r#"{"process":3,"type":"fail","f":"cas","key":"k\"2","value":[null,"x"],"time":22}"#,
            "\n",
            r#"{"process":1,"type":"invoke","f":"get","key":"k","value":null,"time":30}"#,
            "\n",
            r#"{"process":1,"type":"ok","f":"get","key":"k","value":null,"time":31}"#,
            "\n",
            r#"{"process":2,"type":"invoke","f":"cas","key":"k","value":["a","b"],"time":40}"#,
            "\n",
            r#"{"process":2,"type":"info","f":"cas","key":"k","value":["a","b"],"time":50}"#,
            "\n",
            r#"{"process":4,"type":"invoke","f":"get","key":"k","value":null,"time":60}"#,
            "\n",
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn events_round_trip_through_json() {
        for value in [
            EventValue::One(None),
            EventValue::One(Some("v".into())),
            EventValue::Pair(None, "n".into()),
            EventValue::Pair(Some("e".into()), "n".into()),
        ] {
            let event = Event {
                process: 7,
                kind: EventType::Info,
                f: Function::Cas,
                key: "k".into(),
                value,
                time: 3,
            };
            let json = serde_json::to_string(&event).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);
        }
    }

    #[test]
    fn ops_track_call_return_and_outcome() {
        let mut h = History::new();
        assert!(h.is_empty());
        let a = h.invoke(1, "x", put("a"), 5).unwrap();
        let b = h.invoke(2, "y", Op::Get, 6).unwrap();
        h.complete(b, Outcome::Ok(Some("q".into())), 9).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h.keys().into_iter().collect::<Vec<_>>(), vec!["x", "y"]);
        let ops = h.ops();
        assert_eq!(ops[a.0].call, 5);
        assert_eq!(ops[a.0].ret, None);
        assert_eq!(ops[a.0].outcome, Outcome::Info);
        assert!(!ops[a.0].is_completed());
        assert_eq!(ops[b.0].ret, Some(9));
        assert_eq!(ops[b.0].outcome, Outcome::Ok(Some("q".into())));
        assert_eq!(h.events().len(), 3);
    }

    #[test]
    fn busy_process_is_refused() {
        let mut h = History::new();
        let a = h.invoke(1, "k", Op::Get, 0).unwrap();
        let before = h.clone();
        assert_eq!(
            h.invoke(1, "k", Op::Get, 1),
            Err(HistoryError::ProcessBusy {
                process: 1,
                pending: a
            })
        );
        assert_eq!(h, before);
        // After an ok or fail completion the process may go on.
        h.complete(a, Outcome::Fail, 2).unwrap();
        let b = h.invoke(1, "k", Op::Get, 3).unwrap();
        h.complete(b, Outcome::Ok(None), 4).unwrap();
        h.invoke(1, "k", Op::Get, 5).unwrap();
    }

    #[test]
    fn crashed_process_is_refused() {
        let mut h = History::new();
        let a = h.invoke(1, "k", put("a"), 0).unwrap();
        h.complete(a, Outcome::Info, 1).unwrap();
        let before = h.clone();
        assert_eq!(
            h.invoke(1, "k", Op::Get, 2),
            Err(HistoryError::ProcessCrashed { process: 1 })
        );
        assert_eq!(h, before);
        h.invoke(2, "k", Op::Get, 2).unwrap();
    }

    #[test]
    fn unknown_and_double_completion_are_refused() {
        let mut h = History::new();
        assert_eq!(
            h.complete(OpId(0), Outcome::Ok(None), 0),
            Err(HistoryError::UnknownOp { id: OpId(0) })
        );
        let a = h.invoke(1, "k", put("a"), 0).unwrap();
        h.complete(a, Outcome::Ok(None), 1).unwrap();
        let before = h.clone();
        assert_eq!(
            h.complete(a, Outcome::Fail, 2),
            Err(HistoryError::AlreadyCompleted { id: a })
        );
        assert_eq!(h, before);
    }

    #[test]
    fn time_going_backwards_is_refused() {
        let mut h = History::new();
        let a = h.invoke(1, "k", put("a"), 10).unwrap();
        let before = h.clone();
        assert_eq!(
            h.complete(a, Outcome::Ok(None), 9),
            Err(HistoryError::TimeWentBackwards { time: 9, last: 10 })
        );
        assert_eq!(
            h.invoke(2, "k", Op::Get, 3),
            Err(HistoryError::TimeWentBackwards { time: 3, last: 10 })
        );
        assert_eq!(h, before);
        // Equal times are fine.
        h.invoke(2, "k", Op::Get, 10).unwrap();
        h.complete(a, Outcome::Ok(None), 10).unwrap();
    }
}
