#![cfg(not(madsim))]
//! Real-process integration tests: the `keel` binary as an operator runs it.
//! `keel up` starts real node processes (QUIC + mutual TLS, redb) on
//! 127.0.0.1; the tests drive them with the CLI and kill nodes with
//! SIGKILL. Each test has its own temporary cluster directory and its own
//! UDP ports, and kills every process it started when it ends, panicking
//! or not (see [`Harness`]).
//!
//! These are test-only drivers of real processes, so they poll with
//! `std::thread::sleep` rather than run on the engine's runtime.

use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// How long one CLI command may run before the test gives up on it.
const CLI_DEADLINE: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------
// Running the CLI
// ---------------------------------------------------------------------------

/// One finished (or abandoned) `keel` command.
struct Run {
    args: Vec<String>,
    /// The exit code; `None` if killed by a signal or by the deadline.
    code: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Everything about the run, for failure messages.
    fn describe(&self) -> String {
        format!(
            "`keel {}` -> {} after {:.2?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.args.join(" "),
            if self.timed_out {
                "KILLED AT THE TEST'S DEADLINE".to_owned()
            } else {
                format!("exit code {:?}", self.code)
            },
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `keel ARGS` to completion (at most [`CLI_DEADLINE`]).
fn keel(args: &[&str]) -> Run {
    keel_within(args, CLI_DEADLINE)
}

/// Runs `keel ARGS`, killing it after `deadline`.
fn keel_within(args: &[&str], deadline: Duration) -> Run {
    let start = Instant::now();
    let mut child = Command::new(KEEL)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {KEEL}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for keel failed: {e}"),
        }
    };
    Run {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: status.and_then(|s| s.code()),
        timed_out,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Runs `keel ARGS`, which must succeed; returns its stdout.
fn must(args: &[&str]) -> String {
    let run = keel(args);
    assert!(run.ok(), "this command must succeed:\n{}", run.describe());
    run.stdout
}

/// Runs `keel ARGS`, which must fail with a message containing `phrase` on
/// stderr; returns the run.
fn must_fail(args: &[&str], phrase: &str) -> Run {
    let run = keel(args);
    assert!(
        !run.ok() && !run.timed_out,
        "this command must exit non-zero (and promptly):\n{}",
        run.describe()
    );
    assert!(
        run.stderr.contains(phrase),
        "the error should mention {phrase:?}:\n{}",
        run.describe()
    );
    eprintln!(
        "  refused as expected: {}",
        run.stderr.lines().last().unwrap_or("").trim()
    );
    run
}

/// Polls `check` every 100 ms until it succeeds; panics after `timeout`
/// with `what` and the last reason it gave. Returns the time it took.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) -> Duration {
    let start = Instant::now();
    loop {
        let result = check();
        match result {
            Ok(()) => return start.elapsed(),
            Err(last) if start.elapsed() >= timeout => {
                panic!("timed out after {timeout:?} waiting until {what}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// Port ranges handed out by this test process, so parallel tests never
/// share one.
static RESERVED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
static PICKS: AtomicU64 = AtomicU64::new(0);

/// The first of `n` consecutive UDP ports that are free on 127.0.0.1.
/// They are taken below the kernel's ephemeral range (32768..) so that the
/// CLI's own client sockets can never land on a node's port while the node
/// is down.
fn free_ports(n: u16) -> u16 {
    const LOW: u64 = 20_000;
    const SLOTS: u64 = 1_200; // ranges of 10: 20000..32000
    assert!(n <= 10);
    let seed = u64::from(std::process::id()) * 7_919
        + SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0)
        + PICKS.fetch_add(1, Ordering::Relaxed) * 337;
    let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 0..SLOTS {
        let base = (LOW + ((seed + attempt) % SLOTS) * 10) as u16;
        let ports = base..base + n;
        if ports.clone().any(|p| reserved.contains(&p)) {
            continue;
        }
        if ports
            .clone()
            .all(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok())
        {
            reserved.extend(ports);
            return base;
        }
    }
    panic!("no {n} consecutive free UDP ports in 20000..32000");
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

// ---------------------------------------------------------------------------
// Processes: the guard
// ---------------------------------------------------------------------------

/// Owns a test's temporary directory and every process started in it.
/// Dropping it (also when the test panics) kills them all: its own
/// children, every process whose command line names the directory (the
/// node processes `keel up` started), and the pids in `node-*/pid` files.
/// When the test panicked it first prints the tail of every log.
struct Harness {
    name: &'static str,
    tmp: tempfile::TempDir,
    children: Vec<Child>,
}

impl Harness {
    fn new(name: &'static str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("keel-{name}-"))
            .tempdir()
            .expect("cannot create a temporary directory");
        eprintln!("[{name}] working in {}", tmp.path().display());
        Harness {
            name,
            tmp,
            children: Vec::new(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Starts `keel up --dir <tmp>/SUB --nodes NODES --base-port BASE` in
    /// the background and waits (up to 90 s) until it prints `keel is up:`.
    fn up(&mut self, sub: &str, nodes: u16, base: u16) -> Cluster {
        let dir = self.path(sub);
        fs::create_dir_all(&dir).expect("cannot create the cluster directory");
        let out_path = self.path(&format!("{sub}-up.out"));
        let err_path = self.path(&format!("{sub}-up.err"));
        let child = Command::new(KEEL)
            .arg("up")
            .arg("--dir")
            .arg(&dir)
            .args([
                "--nodes",
                &nodes.to_string(),
                "--base-port",
                &base.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).expect("cannot create keel up's stdout file"))
            .stderr(fs::File::create(&err_path).expect("cannot create keel up's stderr file"))
            .spawn()
            .expect("cannot start keel up");
        self.children.push(child);
        let index = self.children.len() - 1;
        let start = Instant::now();
        loop {
            let out = fs::read_to_string(&out_path).unwrap_or_default();
            if out.lines().any(|l| l.starts_with("keel is up:")) {
                break;
            }
            if let Ok(Some(status)) = self.children[index].try_wait() {
                panic!(
                    "keel up exited ({status}) before the cluster was up\n--- stdout ---\n{out}--- stderr ---\n{}",
                    fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "keel up did not print `keel is up:` within 90 s\n--- stdout ---\n{out}--- stderr ---\n{}",
                fs::read_to_string(&err_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "[{}] {nodes}-node cluster {sub} up on ports {base}.. in {:.1?}",
            self.name,
            start.elapsed()
        );
        Cluster {
            dir: dir.to_str().expect("temporary paths are UTF-8").to_owned(),
            base,
        }
    }

    /// Starts `keel node start --config CONFIG [--token TOKEN]` as a child;
    /// its stdout and stderr go to `LOG.out` and `LOG.err` beside CONFIG.
    fn start_node(&mut self, config: &Path, token: Option<&str>, log: &str) -> NodeProcess {
        let parent = config.parent().expect("a config file has a directory");
        let out = parent.join(format!("{log}.out"));
        let err = parent.join(format!("{log}.err"));
        let mut command = Command::new(KEEL);
        command
            .args(["node", "start", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).expect("cannot create the node's stdout file"))
            .stderr(fs::File::create(&err).expect("cannot create the node's stderr file"));
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        self.children
            .push(command.spawn().expect("cannot start keel node start"));
        NodeProcess {
            index: self.children.len() - 1,
            out,
            err,
        }
    }

    /// Waits until the node process prints `serving on`; panics if it exits.
    fn wait_serving(&mut self, node: &NodeProcess, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let out = fs::read_to_string(&node.out).unwrap_or_default();
            if out.contains("serving on") {
                return start.elapsed();
            }
            if let Ok(Some(status)) = self.children[node.index].try_wait() {
                panic!(
                    "the node exited ({status}) instead of serving\n--- stdout ---\n{out}--- stderr ---\n{}",
                    fs::read_to_string(&node.err).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "the node did not print `serving on` within {timeout:?}\n--- stdout ---\n{out}--- stderr ---\n{}",
                fs::read_to_string(&node.err).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tail of every log and output file in the directory.
    fn dump_logs(&self) {
        let mut files = Vec::new();
        collect_files(self.tmp.path(), 0, &mut files);
        files.sort();
        for file in files {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !(name.ends_with(".log") || name.ends_with(".out") || name.ends_with(".err")) {
                continue;
            }
            let text = fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "----- [{}] {} (last {} of {} lines) -----\n{}",
                self.name,
                file.display(),
                tail.len(),
                lines.len(),
                tail.join("\n")
            );
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Node processes `keel up` started name the directory in their
        // command line (`--config <dir>/node-N/node.toml`).
        let needle = self.tmp.path().to_string_lossy().into_owned();
        if let Ok(entries) = fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&needle) {
                    kill_9(pid);
                }
            }
        }
        // And, should /proc not tell, the pid files.
        let mut files = Vec::new();
        collect_files(self.tmp.path(), 0, &mut files);
        for file in files {
            if file.file_name().and_then(|n| n.to_str()) != Some("pid") {
                continue;
            }
            if let Some(pid) = fs::read_to_string(&file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                if is_keel(pid) {
                    kill_9(pid);
                }
            }
        }
    }
}

fn collect_files(dir: &Path, depth: usize, into: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if depth < 3 {
                collect_files(&path, depth + 1, into);
            }
        } else {
            into.push(path);
        }
    }
}

/// Whether `pid` runs the keel binary.
fn is_keel(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("keel"))
        .unwrap_or(false)
}

fn kill_9(pid: u32) {
    let _ = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A `keel node start` child of the harness.
struct NodeProcess {
    index: usize,
    out: PathBuf,
    err: PathBuf,
}

// ---------------------------------------------------------------------------
// A cluster `keel up` started
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct Cluster {
    dir: String,
    base: u16,
}

impl Cluster {
    /// Node `id`'s address (`keel up` puts node N on BASE + N - 1).
    fn addr(&self, id: u64) -> String {
        addr(self.base + id as u16 - 1)
    }

    fn node_dir(&self, id: u64) -> PathBuf {
        Path::new(&self.dir).join(format!("node-{id}"))
    }

    fn pid(&self, id: u64) -> u32 {
        let path = self.node_dir(id).join("pid");
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{} holds {text:?}: {e}", path.display()))
    }

    /// SIGKILLs node `id` and waits until its port is free again.
    fn kill_node(&self, id: u64) {
        let pid = self.pid(id);
        assert!(
            is_keel(pid),
            "pid {pid} of node {id} is not a running keel process"
        );
        kill_9(pid);
        let port: SocketAddr = self.addr(id).parse().expect("addresses parse");
        wait_until(
            &format!("node {id}'s port is released after kill -9"),
            Duration::from_secs(10),
            || UdpSocket::bind(port).map(drop).map_err(|e| e.to_string()),
        );
    }

    /// `keel status --json --dir D EXTRA...`, parsed.
    fn status(&self, extra: &[&str]) -> Result<Value, String> {
        let mut args = vec!["status", "--json", "--dir", &self.dir];
        args.extend_from_slice(extra);
        let run = keel(&args);
        if !run.ok() {
            return Err(run.describe());
        }
        serde_json::from_str(&run.stdout)
            .map_err(|e| format!("status --json printed invalid JSON ({e}):\n{}", run.stdout))
    }

    /// `keel kv put --dir D EXTRA... KEY VALUE`; Ok if it printed OK.
    fn put(&self, extra: &[&str], key: &str, value: &str) -> Result<(), String> {
        let mut args = vec!["kv", "put", "--dir", &self.dir];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[key, value]);
        let run = keel(&args);
        if run.ok() && run.stdout.trim() == "OK" {
            Ok(())
        } else {
            Err(run.describe())
        }
    }

    /// `keel kv get --dir D EXTRA... KEY`: the value, or the run on failure.
    fn get(&self, extra: &[&str], key: &str) -> Result<String, String> {
        let mut args = vec!["kv", "get", "--dir", &self.dir];
        args.extend_from_slice(extra);
        args.push(key);
        let run = keel(&args);
        if run.ok() {
            Ok(run.stdout.trim_end_matches('\n').to_owned())
        } else {
            Err(run.describe())
        }
    }

    fn must_put(&self, extra: &[&str], key: &str, value: &str) {
        if let Err(e) = self.put(extra, key, value) {
            panic!("writing {key} = {value} failed:\n{e}");
        }
    }

    fn must_get(&self, extra: &[&str], key: &str, value: &str) {
        match self.get(extra, key) {
            Ok(found) => assert_eq!(found, value, "key {key} reads back wrong"),
            Err(e) => panic!("reading {key} failed (expected {value:?}):\n{e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Reading status reports
// ---------------------------------------------------------------------------

fn group(report: &Value, id: u64) -> Option<&Value> {
    report["groups"]
        .as_array()?
        .iter()
        .find(|g| g["group"].as_u64() == Some(id))
}

/// Group 0's leader in a status report.
fn metadata_leader(report: &Value) -> Option<u64> {
    group(report, 0)?["leader"].as_u64()
}

fn node(report: &Value, id: u64) -> Option<&Value> {
    report["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"].as_u64() == Some(id))
}

fn node_ids(report: &Value) -> Vec<u64> {
    report["nodes"]
        .as_array()
        .map(|nodes| nodes.iter().filter_map(|n| n["id"].as_u64()).collect())
        .unwrap_or_default()
}

fn trusted_cas(report: &Value) -> Vec<String> {
    report["trusted_cas"]
        .as_array()
        .map(|cas| {
            cas.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn is_healthy(report: &Value) -> Result<(), String> {
    if report["healthy"].as_bool() == Some(true) {
        Ok(())
    } else {
        Err(format!("not healthy: {}", report["problems"]))
    }
}

/// A node configuration for a node that joins through `join`.
fn joiner_config(dir: &Path, listen: u16, join: &str) -> PathBuf {
    fs::create_dir_all(dir).expect("cannot create the joiner's directory");
    let path = dir.join("node.toml");
    fs::write(
        &path,
        format!("data_dir = \"data\"\nlisten = \"127.0.0.1:{listen}\"\njoin = [\"{join}\"]\ntick_ms = 100\n"),
    )
    .expect("cannot write the joiner's node.toml");
    path
}

/// A small deterministic generator for garbage bytes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Retries `attempt(n)` on its own thread (every 100 ms after a failure)
/// until it succeeds or `bound` has passed since `since`; the result and
/// when it came (measured from `since`), or the last failure.
fn probe<T: Send + 'static>(
    since: Instant,
    bound: Duration,
    mut attempt: impl FnMut(u32) -> Result<T, String> + Send + 'static,
) -> std::thread::JoinHandle<Result<(T, Duration), String>> {
    std::thread::spawn(move || {
        let mut last = String::from("no attempt was made");
        let mut n = 0;
        while since.elapsed() < bound {
            n += 1;
            match attempt(n) {
                Ok(value) => return Ok((value, since.elapsed())),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last)
    })
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn borrowed(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[test]
fn up_forms_a_cluster_that_survives_the_leader_being_killed() {
    let started = Instant::now();
    let mut h = Harness::new("failover");
    let base = free_ports(3);
    let c = h.up("cluster", 3, base);

    // Acknowledged writes, through the cluster directory.
    for i in 0..20 {
        c.must_put(&[], &format!("key-{i}"), &format!("value-{i}"));
    }

    let report = c
        .status(&[])
        .unwrap_or_else(|e| panic!("status failed:\n{e}"));
    is_healthy(&report).unwrap_or_else(|e| panic!("{e}\n{report:#}"));
    let leader = metadata_leader(&report)
        .unwrap_or_else(|| panic!("group 0 has no leader in the status report:\n{report:#}"));
    assert_eq!(node_ids(&report), vec![1, 2, 3], "{report:#}");
    eprintln!("[failover] group 0 leader is node {leader}; killing it with SIGKILL");

    let survivors: Vec<String> = (1..=3)
        .filter(|&n| n != leader)
        .map(|n| c.addr(n))
        .collect();
    let mut via_survivors: Vec<&str> = Vec::new();
    for s in &survivors {
        via_survivors.extend_from_slice(&["--addr", s]);
    }
    let mut probe_args = via_survivors.clone();
    probe_args.extend_from_slice(&["--timeout", "2s"]);

    // A routing client sends group-0 requests to its leader...
    let rt = runtime();
    let router = rt
        .block_on(keel::cli::routes::Router::new(admin_client(
            &rt,
            &c,
            Duration::from_secs(1),
        )))
        .unwrap_or_else(|e| panic!("cannot fetch routes: {e}"));
    let routed_leader = |router: &std::sync::Arc<keel::cli::routes::Router>| {
        let _inside = rt.enter();
        router
            .routes()
            .leader_of(keel::core::ids::GroupId::METADATA)
            .map(|a| a.to_string())
    };
    assert_eq!(routed_leader(&router), Some(c.addr(leader)));

    c.kill_node(leader);
    let killed_at = Instant::now();
    let bound = Duration::from_secs(15);

    // The operator's view: `keel kv put --dir D --timeout 2s`, nothing else,
    // retried. Runs on its own thread so that it does not slow the
    // measurements below; it must be done before the killed node restarts.
    let dir_probe = {
        let c = c.clone();
        probe(killed_at, bound, move |attempt| {
            c.put(&["--timeout", "2s"], &format!("dir-probe-{attempt}"), "x")
        })
    };
    // The cluster's failover: a write through the surviving nodes, and a new
    // group-0 leader in their status, each probed on its own thread.
    let write_probe = {
        let (c, args) = (c.clone(), owned(&probe_args));
        probe(killed_at, bound, move |attempt| {
            c.put(&borrowed(&args), &format!("probe-{attempt}"), "x")
        })
    };
    let leader_probe = {
        // Status also asks the dead node, so a shorter timeout keeps the
        // measurement fine-grained.
        let mut args = owned(&via_survivors);
        args.extend(owned(&["--timeout", "1s"]));
        let c = c.clone();
        probe(killed_at, bound, move |_| {
            let report = c.status(&borrowed(&args))?;
            match metadata_leader(&report) {
                Some(l) if l != leader => Ok(l),
                other => Err(format!("group 0 leader {other:?}")),
            }
        })
    };
    let ((), write_back) = write_probe
        .join()
        .expect("the write probe panicked")
        .unwrap_or_else(|last| {
            panic!(
                "no write through the surviving nodes succeeded within {bound:?} of killing node {leader}; last attempt:\n{last}"
            )
        });
    let (new_leader, elected) = leader_probe
        .join()
        .expect("the status probe panicked")
        .unwrap_or_else(|last| {
            panic!(
                "status showed no new group-0 leader within {bound:?} of killing node {leader}; last: {last}"
            )
        });
    eprintln!(
        "[failover] FAILOVER TIME: writes accepted again {write_back:.2?} after the kill; node {new_leader} leads group 0 after {elected:.2?}"
    );

    // ...and, refreshing in the background, to the new one.
    wait_until(
        "the router sends group 0's requests to its new leader",
        Duration::from_secs(15),
        || match routed_leader(&router) {
            Some(a) if a == c.addr(new_leader) => Ok(()),
            other => Err(format!("routed to {other:?}")),
        },
    );

    // No acknowledged write was lost (linearizable reads).
    for i in 0..20 {
        c.must_get(&via_survivors, &format!("key-{i}"), &format!("value-{i}"));
    }
    for i in 20..30 {
        c.must_put(&via_survivors, &format!("key-{i}"), &format!("value-{i}"));
    }

    // Joined before the restart, which would let it through.
    let dir_probe = dir_probe.join().expect("the probe thread panicked");

    // The killed node restarts from its data and catches up.
    let config = c.node_dir(leader).join("node.toml");
    let restarted = h.start_node(&config, None, "restart");
    let restart_at = Instant::now();
    h.wait_serving(&restarted, Duration::from_secs(30));
    let own = c.addr(leader);
    let stale_on_it = ["--stale", "--addr", own.as_str(), "--timeout", "2s"];
    let caught_up = wait_until(
        &format!("the restarted node {leader} serves key-29 from its own replica"),
        Duration::from_secs(30),
        || match c.get(&stale_on_it, "key-29") {
            Ok(v) if v == "value-29" => Ok(()),
            Ok(v) => Err(format!("read {v:?}")),
            Err(e) => Err(e),
        },
    );
    eprintln!("[failover] the restarted node caught up in {caught_up:.2?}");
    c.must_get(&stale_on_it, "key-0", "value-0");
    wait_until(
        "the cluster is healthy again with the restarted node",
        Duration::from_secs(30),
        || {
            let report = c.status(&[])?;
            is_healthy(&report)?;
            match node(&report, leader) {
                Some(n) if n["reachable"].as_bool() == Some(true) => Ok(()),
                _ => Err(format!("node {leader} not reachable: {report}")),
            }
        },
    );
    eprintln!(
        "[failover] restart to healthy: {:.2?}",
        restart_at.elapsed()
    );

    match dir_probe {
        Ok(((), t)) => eprintln!("[failover] `keel kv put --dir D --timeout 2s` worked again after {t:.2?}"),
        Err(last) => panic!(
            "with node {leader} (group-0 leader) killed, `keel kv put --dir D --timeout 2s` never succeeded within {bound:?}, \
             although the surviving nodes accepted writes after {write_back:.2?}: the CLI does not move on from a dead \
             node in nodes.json. Last attempt:\n{last}"
        ),
    }
    eprintln!("[failover] total {:.1?}", started.elapsed());
}

#[test]
fn tokens_are_single_use_and_refusals_are_clear() {
    let started = Instant::now();
    let mut h = Harness::new("tokens");
    let base = free_ports(8);
    let c = h.up("cluster", 1, base);
    let n1 = c.addr(1);

    // (a) A token admits one node, once.
    let token = must(&["token", "issue", "--dir", &c.dir]).trim().to_owned();
    let config_a = joiner_config(&h.path("joiner-a"), base + 1, &n1);
    let node_a = h.start_node(&config_a, Some(&token), "node");
    let joined = h.wait_serving(&node_a, Duration::from_secs(40));
    eprintln!("[tokens] node A joined in {joined:.2?}");
    let config_b = joiner_config(&h.path("joiner-b"), base + 2, &n1);
    let config_b = config_b.to_str().expect("temporary paths are UTF-8");
    must_fail(
        &["node", "start", "--config", config_b, "--token", &token],
        "already used",
    );

    // (b) An expired token.
    let short = must(&["token", "issue", "--dir", &c.dir, "--ttl", "1s"])
        .trim()
        .to_owned();
    std::thread::sleep(Duration::from_secs(3));
    let config_c = joiner_config(&h.path("joiner-c"), base + 3, &n1);
    let config_c = config_c.to_str().expect("temporary paths are UTF-8");
    must_fail(
        &["node", "start", "--config", config_c, "--token", &short],
        "expired",
    );

    // (c) A revoked token.
    let revoked = must(&["token", "issue", "--dir", &c.dir]).trim().to_owned();
    let said = must(&["token", "revoke", "--dir", &c.dir, &revoked]);
    assert_eq!(said.trim(), "revoked");
    let config_d = joiner_config(&h.path("joiner-d"), base + 4, &n1);
    let config_d = config_d.to_str().expect("temporary paths are UTF-8");
    must_fail(
        &["node", "start", "--config", config_d, "--token", &revoked],
        "revoked",
    );

    // (d) Garbage instead of a token.
    must_fail(
        &[
            "node",
            "start",
            "--config",
            config_d,
            "--token",
            "not-a-token-at-all",
        ],
        "join token is unusable",
    );

    // (e) Another cluster's admin credential is refused, and so is another
    // cluster's join token.
    let other = h.up("other", 1, base + 6);
    let run = must_fail(&["status", "--dir", &other.dir, "--addr", &n1], "");
    let lower = run.stderr.to_lowercase();
    assert!(
        lower.contains("certificate") || lower.contains("handshake") || lower.contains("ca "),
        "a foreign credential should be refused at the TLS handshake, saying so:\n{}",
        run.describe()
    );
    let foreign = must(&["token", "issue", "--dir", &other.dir])
        .trim()
        .to_owned();
    let config_e = joiner_config(&h.path("joiner-e"), base + 5, &n1);
    let config_e = config_e.to_str().expect("temporary paths are UTF-8");
    let run = must_fail(
        &["node", "start", "--config", config_e, "--token", &foreign],
        "",
    );
    assert!(
        run.stderr.contains("CA"),
        "joining with another cluster's token should fail naming the CA:\n{}",
        run.describe()
    );
    c.must_put(&[], "still", "working");
    c.must_get(&[], "still", "working");

    // (f) Garbage datagrams at node 1's port.
    let socket = UdpSocket::bind("127.0.0.1:0").expect("cannot bind a UDP socket");
    let target: SocketAddr = n1.parse().expect("addresses parse");
    let mut rng = XorShift(
        0x9E37_79B9_7F4A_7C15
            ^ SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
    );
    let mut sent = 0;
    for _ in 0..5_000 {
        let len = 1 + (rng.next() % 1_400) as usize;
        let mut datagram = vec![0u8; len];
        rng.fill(&mut datagram);
        if socket.send_to(&datagram, target).is_ok() {
            sent += 1;
        }
    }
    // QUIC-Initial-sized datagrams that look like long-header packets of
    // QUIC v1 with random connection ids and random "encrypted" payload.
    for _ in 0..20 {
        let mut datagram = vec![0u8; 1_200];
        rng.fill(&mut datagram);
        datagram[0] = 0xC0 | (datagram[0] & 0x0F);
        datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
        datagram[5] = 8;
        datagram[14] = 8;
        if socket.send_to(&datagram, target).is_ok() {
            sent += 1;
        }
    }
    eprintln!("[tokens] sent {sent} garbage datagrams to node 1");
    assert!(sent > 4_000, "only {sent} garbage datagrams could be sent");
    let report = c
        .status(&[])
        .unwrap_or_else(|e| panic!("status after garbage failed:\n{e}"));
    is_healthy(&report).unwrap_or_else(|e| panic!("after garbage: {e}\n{report:#}"));
    assert_eq!(
        node_ids(&report),
        vec![1, 2],
        "node A should be a member:\n{report:#}"
    );
    c.must_put(&[], "after-garbage", "fine");
    c.must_get(&[], "after-garbage", "fine");
    // The other cluster is untouched by all this.
    other.must_put(&[], "other", "fine");
    eprintln!("[tokens] total {:.1?}", started.elapsed());
}

#[test]
fn ca_rotation_on_a_running_cluster() {
    let started = Instant::now();
    let mut h = Harness::new("ca");
    let base = free_ports(4);
    let c = h.up("cluster", 3, base);
    c.must_put(&[], "before", "rotation");
    let report = c
        .status(&[])
        .unwrap_or_else(|e| panic!("status failed:\n{e}"));
    let old_cas = trusted_cas(&report);
    assert_eq!(old_cas.len(), 1, "a new cluster trusts one CA:\n{report:#}");
    let old = old_cas[0].clone();

    // Stage: every node adopts the new CA.
    let out = must(&["ca", "rotate", "--stage", "--dir", &c.dir]);
    let adopted: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split("adopted CA ").nth(1))
        .map(str::trim)
        .collect();
    assert_eq!(adopted.len(), 3, "every node should adopt the CA:\n{out}");
    let new = adopted[0].to_owned();
    assert!(
        adopted.iter().all(|fp| *fp == new) && new.len() == 64 && new != old,
        "all nodes adopt the same new CA:\n{out}"
    );
    let staged = wait_until(
        "status shows both CAs trusted and every node on the new one",
        Duration::from_secs(20),
        || {
            let report = c.status(&[])?;
            let cas = trusted_cas(&report);
            if cas.len() != 2 || !cas.contains(&new) || !cas.contains(&old) {
                return Err(format!("trusted CAs {cas:?}"));
            }
            for id in 1..=3 {
                let cert_ca = node(&report, id).and_then(|n| n["cert_ca"].as_str());
                if cert_ca != Some(new.as_str()) {
                    return Err(format!("node {id} presents a certificate from {cert_ca:?}"));
                }
            }
            is_healthy(&report)
        },
    );
    eprintln!("[ca] staged; status agreed after {staged:.2?}");
    c.must_put(&[], "during", "rotation");
    c.must_get(&[], "during", "rotation");
    c.must_get(&[], "before", "rotation");

    // Finalize: only the new CA is trusted.
    let out = must(&["ca", "rotate", "--finalize", "--dir", &c.dir]);
    assert!(
        out.contains(&new),
        "finalize should name the kept CA {new}:\n{out}"
    );
    let finalized = wait_until(
        "status shows only the new CA trusted",
        Duration::from_secs(20),
        || {
            let report = c.status(&[])?;
            let cas = trusted_cas(&report);
            if cas != [new.clone()] {
                return Err(format!("trusted CAs {cas:?}"));
            }
            is_healthy(&report)
        },
    );
    eprintln!("[ca] finalized; status agreed after {finalized:.2?}");
    c.must_get(&[], "before", "rotation");
    c.must_get(&[], "during", "rotation");
    c.must_put(&[], "after", "rotation");
    c.must_get(&[], "after", "rotation");

    // A node restarted after a crash comes back with its rotated identity.
    let report = c
        .status(&[])
        .unwrap_or_else(|e| panic!("status failed:\n{e}"));
    let leader =
        metadata_leader(&report).unwrap_or_else(|| panic!("group 0 has no leader:\n{report:#}"));
    let victim = (1..=3).rev().find(|&n| n != leader).expect("three nodes");
    eprintln!("[ca] killing node {victim} (group 0 leader is {leader}) with SIGKILL");
    c.kill_node(victim);
    c.must_put(&[], "while-down", "yes");
    let config = c.node_dir(victim).join("node.toml");
    let restarted = h.start_node(&config, None, "restart");
    h.wait_serving(&restarted, Duration::from_secs(30));
    let back = wait_until(
        &format!("the restarted node {victim} is reachable on the new CA and the cluster healthy"),
        Duration::from_secs(30),
        || {
            let report = c.status(&[])?;
            let n = node(&report, victim).ok_or("the node is missing")?;
            if n["reachable"].as_bool() != Some(true) {
                return Err(format!("node {victim} is not reachable: {report}"));
            }
            if n["cert_ca"].as_str() != Some(new.as_str()) {
                return Err(format!("node {victim} presents {}", n["cert_ca"]));
            }
            if trusted_cas(&report) != [new.clone()] {
                return Err(format!("trusted CAs {:?}", trusted_cas(&report)));
            }
            is_healthy(&report)
        },
    );
    eprintln!("[ca] the restarted node was back in {back:.2?}");
    let own = c.addr(victim);
    let stale_on_it = ["--stale", "--addr", own.as_str()];
    wait_until(
        "the restarted node has the write made while it was down",
        Duration::from_secs(20),
        || match c.get(&stale_on_it, "while-down") {
            Ok(v) if v == "yes" => Ok(()),
            Ok(v) => Err(format!("read {v:?}")),
            Err(e) => Err(e),
        },
    );
    c.must_get(&[], "before", "rotation");

    // A node joins, under the new CA, while the bootstrap node is down.
    if victim != 1 {
        c.kill_node(1);
    }
    let token = must(&["token", "issue", "--dir", &c.dir]).trim().to_owned();
    let config = joiner_config(&h.path("joiner-4"), base + 3, &c.addr(2));
    let joiner = h.start_node(&config, Some(&token), "node4");
    let joined = h.wait_serving(&joiner, Duration::from_secs(40));
    wait_until(
        "node 4 is an active member, reachable on the new CA",
        Duration::from_secs(30),
        || {
            let report = c.status(&[])?;
            let n = node(&report, 4).ok_or("node 4 is missing")?;
            let active = n["state"].as_str().is_some_and(|s| s.contains("active"));
            if !active || n["reachable"].as_bool() != Some(true) {
                return Err(format!("node 4: {n}"));
            }
            if n["cert_ca"].as_str() != Some(new.as_str()) {
                return Err(format!("node 4 presents {}", n["cert_ca"]));
            }
            Ok(())
        },
    );
    eprintln!("[ca] node 4 joined with node 1 down in {joined:.2?}");
    c.must_put(&[], "with-node-4", "yes");
    eprintln!("[ca] total {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// Migrations on a running cluster
// ---------------------------------------------------------------------------

/// The admin client the CLI uses, driven from the test's own runtime so
/// that a writer can keep thousands of writes going without spawning
/// `keel` for each.
fn admin_client(
    rt: &tokio::runtime::Runtime,
    c: &Cluster,
    timeout: Duration,
) -> keel::cli::client::AdminClient {
    // Its QUIC endpoint belongs to the runtime it is opened in.
    let _inside = rt.enter();
    keel::cli::client::AdminClient::open(&keel::cli::client::ClientArgs {
        dir: PathBuf::from(&c.dir),
        addr: Vec::new(),
        timeout,
    })
    .unwrap_or_else(|e| panic!("cannot open an admin client on {}: {e}", c.dir))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot start a tokio runtime")
}

/// One write through the admin client; Ok once the cluster acknowledged it.
async fn put_via(
    client: &keel::cli::client::AdminClient,
    key: &str,
    value: &str,
) -> Result<(), String> {
    use keel::core::kv::{KvCommand, KvResponse};
    use keel::node::service::{ClientRequest, ClientResponse};
    let request = ClientRequest::Kv(KvCommand::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    });
    match client.call(&request).await? {
        ClientResponse::Kv(KvResponse::Ok | KvResponse::Value(_)) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

/// A linearizable read through the admin client.
async fn get_via(
    client: &keel::cli::client::AdminClient,
    key: &str,
) -> Result<Option<String>, String> {
    use keel::core::kv::KvResponse;
    use keel::node::service::{ClientRequest, ClientResponse};
    let request = ClientRequest::Get {
        key: key.as_bytes().to_vec(),
        linearizable: true,
    };
    match client.call(&request).await? {
        ClientResponse::Kv(KvResponse::Value(v)) => {
            Ok(v.map(|v| String::from_utf8_lossy(&v).into_owned()))
        }
        other => Err(format!("{other:?}")),
    }
}

/// Reads every `(key, value)` back (linearizably, `parallel` at a time);
/// the keys that are missing or wrong, with what was read.
fn read_back(c: &Cluster, pairs: &[(String, String)], parallel: usize) -> Vec<String> {
    let rt = runtime();
    let client = std::sync::Arc::new(admin_client(&rt, c, Duration::from_secs(10)));
    let chunk = pairs.len().div_ceil(parallel).max(1);
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for part in pairs.chunks(chunk) {
            let (client, part) = (client.clone(), part.to_vec());
            tasks.spawn(async move {
                let mut wrong = Vec::new();
                for (key, value) in part {
                    let mut result = get_via(&client, &key).await;
                    // A read racing a leadership change may be refused;
                    // only a wrong or missing value is a lost write.
                    for _ in 0..20 {
                        if result.is_ok() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        result = get_via(&client, &key).await;
                    }
                    match result {
                        Ok(Some(found)) if found == value => {}
                        other => wrong.push(format!("{key}: expected {value:?}, read {other:?}")),
                    }
                }
                wrong
            });
        }
        let mut wrong = Vec::new();
        while let Some(part) = tasks.join_next().await {
            wrong.extend(part.expect("a reader task panicked"));
        }
        wrong
    })
}

/// Writes every `(key, value)` (`parallel` at a time); panics on a failure.
fn write_all(c: &Cluster, pairs: &[(String, String)], parallel: usize) {
    let rt = runtime();
    let client = std::sync::Arc::new(admin_client(&rt, c, Duration::from_secs(10)));
    let chunk = pairs.len().div_ceil(parallel).max(1);
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for part in pairs.chunks(chunk) {
            let (client, part) = (client.clone(), part.to_vec());
            tasks.spawn(async move {
                for (key, value) in part {
                    put_via(&client, &key, &value)
                        .await
                        .unwrap_or_else(|e| panic!("writing {key} failed: {e}"));
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a writer task panicked");
        }
    });
}

/// The first key `{prefix}-{n}` (n counting from `*next`) that `wanted`
/// accepts; `*next` moves past it.
fn key_where(
    prefix: &str,
    next: &mut u64,
    wanted: impl Fn(keel::core::ids::VShardId) -> bool,
) -> String {
    loop {
        let key = format!("{prefix}-{}", *next);
        *next += 1;
        if wanted(keel::core::ids::VShardId::for_key(key.as_bytes())) {
            return key;
        }
    }
}

/// What the background writer saw.
#[derive(Default)]
struct WriteLog {
    acked: Vec<(String, String)>,
    failed: u64,
    first_errors: Vec<String>,
    /// The longest an acknowledged write to the moving vShard took.
    slowest_moving: Duration,
    /// The longest an acknowledged write to the moving group took.
    slowest_group: Duration,
}

/// A migration row of a `keel status --json` report.
fn migration_row<'a>(report: &'a Value, id: &str) -> Option<&'a Value> {
    report["migrations"]
        .as_array()?
        .iter()
        .find(|m| m["id"].as_str() == Some(id))
}

/// Runs `keel migrate ... --json`, which must finish the move; its row.
fn migrate_json(args: &[&str]) -> (Value, Duration) {
    let run = keel(args);
    assert!(run.ok(), "this move must complete:\n{}", run.describe());
    let row: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("--json printed invalid JSON ({e}):\n{}", run.describe()));
    assert_eq!(row["complete"].as_bool(), Some(true), "{row:#}");
    assert_eq!(row["phase"].as_str(), Some("Complete"), "{row:#}");
    (row, run.elapsed)
}

/// The write pause a status report shows for migration `id`, in ms.
fn pause_in_status(c: &Cluster, id: &str) -> f64 {
    let report = c
        .status(&[])
        .unwrap_or_else(|e| panic!("status failed:\n{e}"));
    let row = migration_row(&report, id)
        .unwrap_or_else(|| panic!("status does not list migration {id}:\n{report:#}"));
    assert_eq!(row["complete"].as_bool(), Some(true), "{row:#}");
    let us = row["write_pause_us"]
        .as_u64()
        .unwrap_or_else(|| panic!("migration {id} has no measured write pause:\n{row:#}"));
    us as f64 / 1000.0
}

#[test]
fn migrations_move_a_vshard_and_a_replica_while_a_client_writes() {
    use keel::core::ids::{GroupId, NodeId, VShardId};
    use keel::core::routing::RoutingTable;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    let started = Instant::now();
    let mut h = Harness::new("migrate");
    let base = free_ports(4);
    let c = h.up("cluster", 3, base);
    let report = c
        .status(&[])
        .unwrap_or_else(|e| panic!("status failed:\n{e}"));
    let data_groups = report["groups"]
        .as_array()
        .map(|g| g.iter().filter(|g| g["group"].as_u64() != Some(0)).count() as u64)
        .unwrap_or(0);
    assert!(
        data_groups >= 4,
        "keel up should create data groups:\n{report:#}"
    );
    // No move has happened yet: routing is the bootstrap table.
    let routing = Arc::new(
        RoutingTable::bootstrap(data_groups, &[NodeId::new(1).unwrap()], 3)
            .expect("the bootstrap table"),
    );
    let group_of = |v: VShardId| routing.lookup(v).group;

    // The moves: vShard 5 to the next group; group 3's replica on node 1
    // (which leads every group after `keel up`) to node 4.
    let moving = VShardId::new(5).unwrap();
    let (va_from, va_to) = (
        group_of(moving),
        GroupId(group_of(moving).0 % data_groups + 1),
    );
    let replica_group = (1..=data_groups)
        .map(GroupId)
        .find(|g| *g != va_from && *g != va_to)
        .expect("a third group");
    eprintln!(
        "[migrate] {data_groups} data groups; moving vShard {} from group {} to {}, and group {}'s replica from node 1 to node 4",
        moving.get(),
        va_from.0,
        va_to.0,
        replica_group.0
    );

    // The writer: one key per write, a third of them in the moving
    // vShard, a third in the group whose replica moves, a third anywhere.
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let writer = {
        let (c, stop, routing, acks) = (c.clone(), stop.clone(), routing.clone(), acks.clone());
        std::thread::spawn(move || {
            let group_of = |v: VShardId| routing.lookup(v).group;
            let rt = runtime();
            let client = admin_client(&rt, &c, Duration::from_secs(5));
            let mut log = WriteLog::default();
            let mut next = 0;
            rt.block_on(async {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = match i % 3 {
                        0 => key_where("vs", &mut next, |v| v == moving),
                        1 => key_where("rg", &mut next, |v| group_of(v) == replica_group),
                        _ => key_where("any", &mut next, |_| true),
                    };
                    let value = format!("value-{i}");
                    let t = Instant::now();
                    match put_via(&client, &key, &value).await {
                        Ok(()) => {
                            let took = t.elapsed();
                            match i % 3 {
                                0 => log.slowest_moving = log.slowest_moving.max(took),
                                1 => log.slowest_group = log.slowest_group.max(took),
                                _ => {}
                            }
                            log.acked.push((key, value));
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            log.failed += 1;
                            if log.first_errors.len() < 5 {
                                log.first_errors.push(format!("{key}: {e}"));
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
            });
            log
        })
    };
    let warmup = wait_until(
        "the writer has 50 writes acknowledged",
        Duration::from_secs(20),
        || match acks.load(Ordering::Relaxed) {
            n if n >= 50 => Ok(()),
            n if writer.is_finished() => Err(format!("the writer stopped after {n} writes")),
            n => Err(format!("{n} acknowledged")),
        },
    );
    eprintln!("[migrate] the writer is running (50 writes in {warmup:.2?})");

    // (a) The vShard moves while it is being written.
    let vshard_arg = moving.get().to_string();
    let to_arg = va_to.0.to_string();
    let (va_row, va_took) = migrate_json(&[
        "migrate",
        "vshard",
        "--dir",
        &c.dir,
        &vshard_arg,
        "--to",
        &to_arg,
        "--json",
    ]);
    let va_id = va_row["id"].as_str().expect("the row has an id").to_owned();
    assert_eq!(
        va_row["what"].as_str(),
        Some(
            format!(
                "move vShard {} from group {} to group {}",
                moving.get(),
                va_from.0,
                va_to.0
            )
            .as_str()
        ),
        "{va_row:#}"
    );
    // A second move to the same group is refused, naming it.
    must_fail(
        &[
            "migrate",
            "vshard",
            "--dir",
            &c.dir,
            &vshard_arg,
            "--to",
            &to_arg,
        ],
        &format!("already in group {}", va_to.0),
    );

    // (b) A 4th node joins, and group `replica_group`'s replica moves from
    // node 1 to it.
    let token = must(&["token", "issue", "--dir", &c.dir]).trim().to_owned();
    let config = joiner_config(&h.path("joiner-4"), base + 3, &c.addr(1));
    let joiner = h.start_node(&config, Some(&token), "node4");
    h.wait_serving(&joiner, Duration::from_secs(40));
    wait_until(
        "node 4 is an active member",
        Duration::from_secs(30),
        || {
            let report = c.status(&[])?;
            let n = node(&report, 4).ok_or("node 4 is missing")?;
            let active = n["state"].as_str().is_some_and(|s| s.contains("active"));
            if active && n["reachable"].as_bool() == Some(true) {
                Ok(())
            } else {
                Err(format!("node 4: {n}"))
            }
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let group_arg = replica_group.0.to_string();
    let (rg_row, rg_took) = migrate_json(&[
        "migrate", "replica", "--dir", &c.dir, "--group", &group_arg, "--from", "1", "--to", "4",
        "--json",
    ]);
    let rg_id = rg_row["id"].as_str().expect("the row has an id").to_owned();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let log = writer.join().expect("the writer panicked");

    let report = c
        .status(&[])
        .unwrap_or_else(|e| panic!("status failed:\n{e}"));
    let members = group(&report, replica_group.0).cloned().unwrap_or_default();
    let voters: Vec<u64> = members["voters"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    assert!(
        voters.contains(&4) && !voters.contains(&1),
        "group {} should have node 4 and not node 1 as voters:\n{members:#}",
        replica_group.0
    );

    // (c) Every acknowledged write reads back with its value.
    assert!(
        log.acked.len() >= 100,
        "the writer got only {} writes acknowledged ({} failed: {:?})",
        log.acked.len(),
        log.failed,
        log.first_errors
    );
    let t = Instant::now();
    let wrong = read_back(&c, &log.acked, 16);
    assert!(
        wrong.is_empty(),
        "{} of {} acknowledged writes are lost or wrong, e.g.:\n{}",
        wrong.len(),
        log.acked.len(),
        wrong
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let va_pause = pause_in_status(&c, &va_id);
    let rg_pause = pause_in_status(&c, &rg_id);
    println!(
        "[migrate] {} writes acknowledged during the moves ({} refused or unknown{}), all {} read back in {:.2?}",
        log.acked.len(),
        log.failed,
        log.first_errors.first().map_or(String::new(), |e| format!(", e.g. {e}")),
        log.acked.len(),
        t.elapsed()
    );
    println!(
        "[migrate] WRITE PAUSE vShard move ({}): {va_pause:.1} ms measured, `keel migrate` took {va_took:.2?}; slowest acknowledged write to it {:.1?}",
        va_row["what"].as_str().unwrap_or(""),
        log.slowest_moving
    );
    println!(
        "[migrate] WRITE PAUSE replica move ({}): {rg_pause:.1} ms measured, `keel migrate` took {rg_took:.2?}; slowest acknowledged write to the group {:.1?}",
        rg_row["what"].as_str().unwrap_or(""),
        log.slowest_group
    );

    // A group holding 10,000 keys: 1,000 in one of its vShards, 9,000 over
    // the others. Group `big`'s replica moves from node 1 to node 4, then the
    // 1,000-key vShard moves to another group.
    let big = (1..=data_groups)
        .map(GroupId)
        .find(|g| ![va_from, va_to, replica_group].contains(g))
        .expect("a fourth group");
    let big_vshard = routing
        .vshards_of(big)
        .next()
        .expect("the group has vShards");
    let mut next = 0;
    let mut pairs: Vec<(String, String)> = (0..1_000)
        .map(|i| {
            (
                key_where("big", &mut next, |v| v == big_vshard),
                format!("b-{i}"),
            )
        })
        .collect();
    let mut next = 0;
    pairs.extend((1_000..10_000).map(|i| {
        let key = key_where("bulk", &mut next, |v| v != big_vshard && group_of(v) == big);
        (key, format!("b-{i}"))
    }));
    let t = Instant::now();
    write_all(&c, &pairs, 64);
    let load = t.elapsed();
    println!(
        "[migrate] wrote 10,000 keys into group {} ({:.0} writes/s, 64 at a time)",
        big.0,
        10_000.0 / load.as_secs_f64()
    );
    let big_arg = big.0.to_string();
    let run = keel(&[
        "migrate", "replica", "--dir", &c.dir, "--group", &big_arg, "--from", "1", "--to", "4",
    ]);
    assert!(
        run.ok(),
        "moving the big group's replica must complete:\n{}",
        run.describe()
    );
    let said = run.stdout.trim().to_owned();
    let expected = format!(
        "done: move group {}'s replica from node 1 to node 4 in ",
        big.0
    );
    assert!(
        said.starts_with(&expected) && said.contains(" s, write pause ") && said.ends_with(" ms"),
        "`keel migrate` should say `{expected}<secs> s, write pause <ms> ms`:\n{}",
        run.describe()
    );
    println!(
        "[migrate] GROUP OF 10,000 KEYS: replica moved in {:.2?} (`keel` said: {said})",
        run.elapsed
    );
    let dest = (1..=data_groups)
        .map(GroupId)
        .find(|g| *g != big)
        .expect("another group");
    let (bv_row, bv_took) = migrate_json(&[
        "migrate",
        "vshard",
        "--dir",
        &c.dir,
        &big_vshard.get().to_string(),
        "--to",
        &dest.0.to_string(),
        "--json",
    ]);
    let bv_pause = bv_row["write_pause_us"].as_u64().expect("a measured pause") as f64 / 1000.0;
    println!(
        "[migrate] VSHARD OF 1,000 KEYS: {} in {bv_took:.2?}, write pause {bv_pause:.1} ms",
        bv_row["what"].as_str().unwrap_or("")
    );
    let t = Instant::now();
    let wrong = read_back(&c, &pairs, 32);
    assert!(
        wrong.is_empty(),
        "{} of the 10,000 keys are lost or wrong after the moves, e.g.:\n{}",
        wrong.len(),
        wrong
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("[migrate] the 10,000 keys read back in {:.2?}", t.elapsed());
    let report = c
        .status(&[])
        .unwrap_or_else(|e| panic!("status failed:\n{e}"));
    is_healthy(&report).unwrap_or_else(|e| panic!("after the moves: {e}\n{report:#}"));
    let open: Vec<&Value> = report["migrations"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| m["complete"].as_bool() != Some(true))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        open.is_empty(),
        "no migration should be left unfinished: {open:#?}"
    );
    let text = must(&["status", "--dir", &c.dir]);
    assert!(
        text.contains("COMPLETED") && text.contains(bv_row["what"].as_str().unwrap_or("?")),
        "`keel status` should list the completed moves with their pause:\n{text}"
    );

    // A data group created for the 1,000-key vShard, then dropped once it
    // moved on again.
    let created: Value =
        serde_json::from_str(&must(&["group", "create", "--dir", &c.dir, "--json"]))
            .expect("`keel group create --json` prints JSON");
    let new_group = created["group"].as_u64().expect("the new group's id");
    assert!(
        new_group > data_groups,
        "a new group takes a new id: {created}"
    );
    let new_arg = new_group.to_string();
    let vshard_arg = big_vshard.get().to_string();
    let (row, took) = migrate_json(&[
        "migrate",
        "vshard",
        "--dir",
        &c.dir,
        &vshard_arg,
        "--to",
        &new_arg,
        "--json",
    ]);
    println!(
        "[migrate] NEW GROUP {new_group} on nodes {}: {} in {took:.2?}",
        created["voters"],
        row["what"].as_str().unwrap_or("")
    );
    let wrong = read_back(&c, &pairs[..1_000], 32);
    assert!(wrong.is_empty(), "keys lost in the new group: {wrong:?}");
    must_fail(
        &["group", "drop", "--dir", &c.dir, &new_arg],
        "still serves 1 vShard;",
    );
    migrate_json(&[
        "migrate",
        "vshard",
        "--dir",
        &c.dir,
        &vshard_arg,
        "--to",
        &dest.0.to_string(),
        "--json",
    ]);
    must(&["group", "drop", "--dir", &c.dir, &new_arg]);
    wait_until(
        "no node hosts the dropped group",
        Duration::from_secs(10),
        || {
            let report = c.status(&[])?;
            match group(&report, new_group) {
                Some(g) => Err(format!("still listed: {g}")),
                None => Ok(()),
            }
        },
    );

    // Node 4 leaves again: its replicas move off, then it is removed.
    let plan = must(&["decommission", "--dir", &c.dir, "4", "--dry-run"]);
    assert!(
        plan.lines().count() >= 2 && plan.lines().all(|l| l.contains("from node 4 to node")),
        "the dry run should list node 4's replica moves:\n{plan}"
    );
    let run = keel(&["decommission", "--dir", &c.dir, "4"]);
    assert!(
        run.ok(),
        "decommissioning node 4 must finish:\n{}",
        run.describe()
    );
    assert!(
        run.stdout.contains("node 4 decommissioned and removed"),
        "{}",
        run.describe()
    );
    let moved = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("done: "))
        .count();
    println!(
        "[migrate] DECOMMISSION of node 4: {moved} replica moves in {:.2?}",
        run.elapsed
    );
    let report = c
        .status(&[])
        .unwrap_or_else(|e| panic!("status failed:\n{e}"));
    assert!(
        !node_ids(&report).contains(&4),
        "node 4 should be gone from the topology:\n{report:#}"
    );
    let wrong = read_back(&c, &pairs[..1_000], 32);
    assert!(
        wrong.is_empty(),
        "{} of the moved vShard's keys are lost or wrong after the decommission, e.g.:\n{}",
        wrong.len(),
        wrong
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!("[migrate] total {:.1?}", started.elapsed());
}
