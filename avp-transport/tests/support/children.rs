//! Child processes for multi-process tests: the test binary re-executed to run
//! one test, `child_role`, with `AVP_TEST_ROLE` and `AVP_TEST_ARG` naming what
//! it plays. Shared by the transport crate's tests and the workspace's.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The role and argument this process plays, if it is a child (call it from
/// the `child_role` test; in a normal run it returns `None`).
pub fn role() -> Option<(String, String)> {
    let role = std::env::var("AVP_TEST_ROLE").ok()?;
    let arg = std::env::var("AVP_TEST_ARG").unwrap_or_default();
    Some((role, arg))
}

/// Run this test binary's `child_role` test as `role` with `arg`; its stdout
/// is piped (see [`wait_for`]).
pub fn spawn_role(role: &str, arg: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_role", "--exact", "--nocapture", "--test-threads=1"])
        .env("AVP_TEST_ROLE", role)
        .env("AVP_TEST_ARG", arg)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Wait until the child prints `word` on a line of its stdout.
pub fn wait_for(child: &mut Child, word: &str) {
    read_after(child, word);
}

/// Wait until the child prints a line containing `prefix` (the test harness
/// may put its own words first); the rest of the line after it.
pub fn read_after(child: &mut Child, prefix: &str) -> String {
    let mut r = BufReader::new(child.stdout.as_mut().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "child exited before printing {prefix:?}"
        );
        if let Some((_, rest)) = line.split_once(prefix) {
            return rest.trim().to_owned();
        }
    }
}

/// Kill `child` with SIGKILL after `after`, from another thread.
pub fn kill_later(mut child: Child, after: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        child.kill().unwrap();
        child.wait().unwrap();
    })
}

/// Descriptors and avp memfd mappings this process holds now.
pub fn resources() -> (usize, usize) {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    (
        fds,
        maps.lines().filter(|l| l.contains("memfd:avp")).count(),
    )
}
