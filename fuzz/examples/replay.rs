//! Replays fuzz inputs through a target on the stable toolchain, without
//! libFuzzer: `cargo run --example replay -- TARGET FILE...`. Prints each
//! file's verdict, or the panic it raises; exits non-zero if any panicked.
//! Handy for reducing a crash by hand or checking a fix.

use keel_fuzz::TARGETS;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: keel_fuzz::alloc::Tracking = keel_fuzz::alloc::Tracking;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, files)) = args.split_first() else {
        eprintln!("usage: replay TARGET FILE...");
        return ExitCode::from(2);
    };
    let Some((_, target)) = TARGETS.iter().find(|(n, _)| n == name) else {
        eprintln!("no target named {name}");
        return ExitCode::from(2);
    };
    let mut failed = false;
    for file in files {
        let data = std::fs::read(file).expect("readable input");
        match catch_unwind(AssertUnwindSafe(|| target(&data))) {
            Ok(verdict) => println!("{file}: {verdict:?}"),
            Err(_) => {
                println!("{file}: PANIC");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
