//! A closed-loop load generator: `clients` concurrent clients, each sending
//! its next request as soon as the previous one is answered, for a fixed
//! time. Every answered request's latency is kept (not sampled), so the
//! percentiles are exact. It is generic over the system under test, so that
//! keel and a peer (etcd, in `bench/etcd`) are measured by the same code.

use serde::Serialize;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What one request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Write a [`VALUE_LEN`]-byte value to a key (replicated, durable).
    Write,
    /// Read a key linearizably.
    Read,
    /// Commit one metadata entry (keel: a catalog DDL entry in group 0).
    Meta,
}

/// Bytes of every value written.
pub const VALUE_LEN: usize = 128;
/// Distinct keys per client: writes spread over vShards and groups.
const KEYS_PER_CLIENT: u64 = 1_000;

/// The key client `client` uses for its `seq`th request.
pub fn key(client: usize, seq: u64) -> Vec<u8> {
    format!("bench-{client}-{}", seq % KEYS_PER_CLIENT).into_bytes()
}

/// The value every write carries.
pub fn value() -> Vec<u8> {
    vec![b'v'; VALUE_LEN]
}

/// A system under test.
pub trait Target: Send + Sync + 'static {
    /// One request: `op` by client `client`, its `seq`th. An error counts as
    /// a failed request; the client goes on.
    fn request(
        &self,
        op: Op,
        client: usize,
        seq: u64,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// The outcome of one run.
#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    pub op: Op,
    pub clients: usize,
    /// Requests answered successfully in the measured window.
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub measured_s: f64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Runs `clients` clients doing `op` for `warmup + measure`; only requests
/// that start after the warm-up count.
pub async fn run<T: Target>(
    target: Arc<T>,
    op: Op,
    clients: usize,
    warmup: Duration,
    measure: Duration,
) -> LoadResult {
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(run_until(target, op, clients, warmup, Arc::clone(&stop)));
    tokio::time::sleep(warmup + measure).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap_or_else(|e| {
        let mut tally = Tally::default();
        tally.record(Duration::ZERO, Err(format!("the load task failed: {e}")));
        tally.result(op, clients, measure)
    })
}

/// Runs every `op` at every client count in turn, each for `duration`
/// after a warm-up of a fifth of it, printing a table row as each ends;
/// `after_each` may stop the sweep (say, the system under test died).
pub async fn sweep<T: Target>(
    target: Arc<T>,
    ops: &[Op],
    clients: &[usize],
    duration: Duration,
    mut after_each: impl FnMut() -> Result<(), String>,
) -> Result<Vec<LoadResult>, String> {
    let mut results = Vec::new();
    if !ops.is_empty() && !clients.is_empty() {
        println!("\n{}", header());
    }
    for &op in ops {
        for &clients in clients {
            let result = run(Arc::clone(&target), op, clients, duration / 5, duration).await;
            println!("{}", row(&result));
            if let Some(e) = &result.first_error {
                println!("        first error: {e}");
            }
            results.push(result);
            after_each()?;
        }
    }
    Ok(results)
}

/// Runs `clients` clients doing `op` until `stop` is set; only requests
/// that start after `warmup` count, and the measured window ends at `stop`.
pub async fn run_until<T: Target>(
    target: Arc<T>,
    op: Op,
    clients: usize,
    warmup: Duration,
    stop: Arc<AtomicBool>,
) -> LoadResult {
    let from = Instant::now() + warmup;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let target = Arc::clone(&target);
        let stop = Arc::clone(&stop);
        tasks.spawn(async move {
            let mut tally = Tally::default();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let result = target.request(op, client, seq).await;
                seq += 1;
                if sent >= from {
                    tally.record(sent.elapsed(), result);
                }
            }
            tally
        });
    }
    let mut all = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(tally) => all.merge(tally),
            Err(e) => all.record(Duration::ZERO, Err(format!("a client task failed: {e}"))),
        }
    }
    // The last requests ended after `stop`; the window is what they took.
    let measured = Instant::now().saturating_duration_since(from);
    all.result(op, clients, measured)
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, latency: Duration, result: Result<(), String>) {
        match result {
            Ok(()) => self
                .latencies_us
                .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX)),
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn result(mut self, op: Op, clients: usize, measured: Duration) -> LoadResult {
        self.latencies_us.sort_unstable();
        let ms = |us: u64| us as f64 / 1_000.0;
        let ok = self.latencies_us.len() as u64;
        LoadResult {
            op,
            clients,
            ok,
            errors: self.errors,
            first_error: self.first_error,
            measured_s: measured.as_secs_f64(),
            ops_per_s: ok as f64 / measured.as_secs_f64(),
            p50_ms: ms(percentile(&self.latencies_us, 0.50)),
            p99_ms: ms(percentile(&self.latencies_us, 0.99)),
            p999_ms: ms(percentile(&self.latencies_us, 0.999)),
            max_ms: ms(self.latencies_us.last().copied().unwrap_or(0)),
        }
    }
}

/// The nearest-rank `q` quantile of `sorted` (0 when empty).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The header of [`row`]'s table.
pub fn header() -> String {
    format!(
        "{:<8}{:>8}{:>12}{:>10}{:>10}{:>10}{:>10}{:>8}",
        "op", "clients", "ops/s", "p50 ms", "p99 ms", "p999 ms", "max ms", "errors"
    )
}

/// One result as a table row.
pub fn row(r: &LoadResult) -> String {
    let op = match r.op {
        Op::Write => "write",
        Op::Read => "read",
        Op::Meta => "meta",
    };
    format!(
        "{op:<8}{:>8}{:>12.0}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>8}",
        r.clients, r.ops_per_s, r.p50_ms, r.p99_ms, r.p999_ms, r.max_ms, r.errors
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn percentiles_are_nearest_rank() {
        let sorted: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&sorted, 0.50), 500);
        assert_eq!(percentile(&sorted, 0.99), 990);
        assert_eq!(percentile(&sorted, 0.999), 999);
        assert_eq!(percentile(&sorted, 1.0), 1000);
        assert_eq!(percentile(&[7], 0.5), 7);
        assert_eq!(percentile(&[], 0.99), 0);
    }

    /// Answers after 2 ms; every fifth request of client 1 fails.
    struct Fake {
        sent: AtomicU64,
    }

    impl Target for Fake {
        async fn request(&self, _op: Op, client: usize, seq: u64) -> Result<(), String> {
            self.sent.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await;
            if client == 1 && seq % 5 == 0 {
                Err(format!("refused {seq}"))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn clients_run_closed_loops_and_count_only_the_measured_window() {
        let fake = Arc::new(Fake {
            sent: AtomicU64::new(0),
        });
        let result = run(
            Arc::clone(&fake),
            Op::Write,
            4,
            Duration::from_millis(50),
            Duration::from_millis(200),
        )
        .await;
        let sent = fake.sent.load(Ordering::Relaxed);
        assert!(result.ok > 0 && result.errors > 0, "{result:?}");
        assert!(
            result.ok + result.errors < sent,
            "the warm-up is not counted"
        );
        assert!(result
            .first_error
            .as_deref()
            .unwrap()
            .starts_with("refused"));
        assert!(result.p50_ms >= 2.0 && result.p50_ms <= result.p99_ms);
        assert!(result.p999_ms <= result.max_ms);
        // Four closed loops of ~2 ms each cannot exceed 4 / 2 ms.
        assert!(result.ops_per_s < 2_100.0, "{result:?}");
    }
}
