//! Real processes: `avp recv` and `avp send` move KV messages of 1 KiB to 256 MiB
//! over shared memory and TCP; every byte is compared.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, Payload};

fn avp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_avp"))
}

/// Write a KV message of about `bytes` bytes with a size-specific byte pattern.
fn message_file(dir: &Path, bytes: usize) -> PathBuf {
    let desc = if bytes <= 4096 {
        KvCacheDesc::new(1, 1, 8, (bytes / 32) as u64, DType::F16, KvLayout::Hnd)
    } else {
        KvCacheDesc::new(
            32,
            8,
            128,
            (bytes / (128 << 10)) as u64,
            DType::F16,
            KvLayout::Nhd,
        )
    };
    let env = Envelope {
        model_id: format!("size-{bytes}"),
        ..Default::default()
    };
    let layout = MessageLayout::new(&env, &Payload::KvCache(desc)).unwrap();
    let mut buf = vec![0u8; layout.total_len()];
    let mut w = layout.writer(&mut buf).unwrap();
    for (i, s) in w.sections_mut().into_iter().enumerate() {
        for (j, b) in s.iter_mut().enumerate() {
            *b = (j as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(i as u32 * 977 + bytes as u32) as u8;
        }
    }
    w.finish().unwrap();
    let p = dir.join(format!("in-{bytes}.avp"));
    std::fs::write(&p, &buf).unwrap();
    p
}

/// Start `avp recv` and return it with the address it listens on.
fn start_recv(addr: &str, out: &Path, count: usize, extra: &[&str]) -> (Child, String) {
    let mut child = avp()
        .args([
            "recv",
            addr,
            "--out",
            out.to_str().unwrap(),
            "--count",
            &count.to_string(),
            "--timeout",
            "120",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stderr.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected: {first}"))
        .to_owned();
    (child, addr)
}

fn transfer(addr: &str, extra: &[&str], sizes: &[usize]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let files: Vec<PathBuf> = sizes.iter().map(|&s| message_file(dir.path(), s)).collect();
    let (recv, listen) = start_recv(addr, &out, files.len(), extra);
    let send = avp()
        .args(["send", &listen, "--timeout", "120"])
        .args(extra)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        send.status.success(),
        "send: {}",
        String::from_utf8_lossy(&send.stderr)
    );
    let recv = recv.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&recv.stdout);
    assert!(recv.status.success(), "recv failed: {stdout}");
    assert_eq!(
        stdout.matches("checksums ok").count(),
        files.len(),
        "{stdout}"
    );
    for (i, f) in files.iter().enumerate() {
        let got = std::fs::read(out.join(format!("msg-{:06}.avp", i + 1))).unwrap();
        let want = std::fs::read(f).unwrap();
        assert!(got == want, "{}: received bytes differ", f.display());
    }
    let explain = String::from_utf8_lossy(&send.stderr);
    let kind = if addr.starts_with("http") {
        "transport http"
    } else if addr.starts_with("shm") || !extra.contains(&"--no-shm-upgrade") {
        "transport shm"
    } else {
        "transport tcp"
    };
    assert!(explain.contains(kind), "{explain}");
}

const SIZES: [usize; 4] = [1 << 10, 1 << 20, 64 << 20, 256 << 20];

#[test]
fn kv_messages_1kib_to_256mib_over_shm() {
    let name = format!("shm://procs-{}", std::process::id());
    transfer(&name, &[], &SIZES);
}

#[test]
fn kv_messages_1kib_to_256mib_over_tcp() {
    transfer("tcp://127.0.0.1:0", &["--no-shm-upgrade"], &SIZES);
}

#[test]
fn kv_messages_1kib_to_256mib_over_http() {
    transfer("http://127.0.0.1:0", &[], &SIZES);
}

#[test]
fn tcp_between_processes_on_one_host_switches_to_shm() {
    transfer("tcp://127.0.0.1:0", &[], &[1 << 10, 1 << 20]);
}

#[test]
fn a_wrong_token_is_refused_and_the_receiver_serves_the_next_sender() {
    let dir = tempfile::tempdir().unwrap();
    let f = message_file(dir.path(), 1 << 10);
    let (recv, listen) = start_recv(
        "tcp://127.0.0.1:0",
        &dir.path().join("out"),
        1,
        &["--token", "s3cret", "--no-shm-upgrade"],
    );
    let bad = avp()
        .args(["send", &listen, "--token", "wrong", "--no-shm-upgrade"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("authentication"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // The receiver refused that peer and goes on serving: the right token gets through.
    let good = avp()
        .args(["send", &listen, "--token", "s3cret", "--no-shm-upgrade"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let out = recv.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("failed its handshake"), "{log}");
    let got = std::fs::read(dir.path().join("out/msg-000001.avp")).unwrap();
    assert!(
        got == std::fs::read(&f).unwrap(),
        "only the good peer's message"
    );
    assert!(!dir.path().join("out/msg-000002.avp").exists());
}
