//! The C ABI from C and C++: programs under `tests/ffi/` are compiled with gcc and
//! g++ against `include/avp.h` / `include/avp.hpp` and libavp, and two processes
//! exchange a multi-layer KV cache over shared memory and TCP (every byte and the
//! zero-copy pointer ranges are checked by the programs). The C program also runs
//! its bad-argument checks, and everything once more under valgrind memcheck.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Build libavp (avp-ffi) in this test's profile and return its directory.
fn libdir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("release") => "release",
            _ => "dev",
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "avp-ffi", "--profile", profile])
            .current_dir(root())
            .status()
            .unwrap();
        assert!(st.success(), "building avp-ffi failed");
        assert!(profile_dir.join("libavp.a").exists() && profile_dir.join("libavp.so").exists());
        profile_dir
    })
}

/// Compile `src` with `compiler`; static links libavp.a, dynamic links libavp.so.
fn compile(compiler: &str, std: &str, src: &str, out: &str, dynamic: bool) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let exe = dir.path().join(out);
    let lib = libdir();
    let mut cmd = Command::new(compiler);
    cmd.args([std, "-Wall", "-Wextra", "-Werror", "-g", "-I"])
        .arg(root().join("include"))
        .arg(root().join(src))
        .arg("-o")
        .arg(&exe);
    if dynamic {
        cmd.arg(format!("-L{}", lib.display()))
            .arg("-lavp")
            .arg(format!("-Wl,-rpath,{}", lib.display()));
    } else {
        cmd.arg(lib.join("libavp.a"))
            .args(["-lpthread", "-ldl", "-lm"]);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{compiler} {src}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    exe
}

const VALGRIND: [&str; 6] = [
    "valgrind",
    "-q",
    "--error-exitcode=99",
    "--leak-check=full",
    "--errors-for-leak-kinds=definite,indirect",
    "--show-leak-kinds=definite,indirect",
];

fn command(exe: &Path, valgrind: bool) -> Command {
    if valgrind {
        let mut c = Command::new(VALGRIND[0]);
        c.args(&VALGRIND[1..]).arg(exe);
        c
    } else {
        Command::new(exe)
    }
}

/// Run a receiver and a sender; both must succeed and the receiver must print OK.
fn exchange(exe: &Path, addr: &str, tcp: bool, valgrind: bool) {
    exchange_in(exe, addr, if tcp { &["tcp"] } else { &[] }, valgrind)
}

/// [`exchange`] with the programs' mode arguments.
fn exchange_in(exe: &Path, addr: &str, mode: &[&str], valgrind: bool) {
    let mut recv: Child = command(exe, valgrind)
        .args(["recv", addr])
        .args(mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(recv.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let listen = line
        .trim()
        .strip_prefix("ADDR ")
        .unwrap_or_else(|| panic!("receiver said {line:?}"))
        .to_owned();
    let send = command(exe, valgrind)
        .args(["send", &listen])
        .args(mode)
        .output()
        .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = recv.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(recv.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        send.status.success(),
        "sender failed ({:?}): {}",
        send.status,
        String::from_utf8_lossy(&send.stderr)
    );
    assert!(
        status.success() && rest.contains("OK"),
        "receiver failed ({status:?}): {rest}\n{err}"
    );
}

fn unique(tag: &str) -> String {
    format!("shm://ffi-{tag}-{}", std::process::id())
}

#[test]
fn c_program_exchanges_kv_over_shm_and_tcp() {
    let exe = compile("gcc", "-std=c99", "tests/ffi/kv_exchange.c", "kv_c", false);
    exchange(&exe, &unique("c"), false, false);
    exchange(&exe, "tcp://127.0.0.1:0", true, false);
    // rdma:// on the software RDMA device (options.rdma_device = "emulated").
    exchange_in(&exe, "rdma://127.0.0.1:0", &["rdma"], false);
    // http://, the Python reference's binding.
    exchange_in(&exe, "http://127.0.0.1:0", &["http"], false);
}

#[test]
fn cpp_program_exchanges_kv_over_shm_and_tcp() {
    let exe = compile(
        "g++",
        "-std=c++17",
        "tests/ffi/kv_exchange.cpp",
        "kv_cpp",
        true,
    );
    exchange(&exe, &unique("cpp"), false, false);
    exchange(&exe, "tcp://127.0.0.1:0", true, false);
    let device = format!("cuda://ffi-cpp-dev-{}", std::process::id());
    exchange_in(&exe, &device, &["cuda"], false);
}

#[test]
fn c_programs_exchange_device_sections_over_cuda() {
    let exe = compile(
        "gcc",
        "-std=c99",
        "tests/ffi/device_exchange.c",
        "device_c",
        false,
    );
    let addr = format!("cuda://ffi-dev-{}", std::process::id());
    exchange(&exe, &addr, false, false);
    exchange(&exe, &addr, false, true);
}

#[test]
fn every_function_refuses_bad_arguments() {
    let exe = compile(
        "gcc",
        "-std=c99",
        "tests/ffi/kv_exchange.c",
        "kv_c_bad",
        true,
    );
    let o = Command::new(&exe).arg("badargs").output().unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn c_program_is_clean_under_valgrind() {
    let exe = compile(
        "gcc",
        "-std=c99",
        "tests/ffi/kv_exchange.c",
        "kv_c_vg",
        false,
    );
    let o = command(&exe, true)
        .arg("badargs")
        .output()
        .expect("valgrind is installed");
    assert!(
        o.status.success(),
        "valgrind badargs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    exchange(&exe, &unique("vg"), false, true);
    exchange(&exe, "tcp://127.0.0.1:0", true, true);
}

#[test]
fn examples_build_and_talk() {
    let rx = compile(
        "gcc",
        "-std=c99",
        "examples/c/receiver.c",
        "example_rx",
        false,
    );
    let tx = compile(
        "gcc",
        "-std=c99",
        "examples/c/sender.c",
        "example_tx",
        false,
    );
    let addr = unique("example");
    let mut r = Command::new(&rx)
        .arg(&addr)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(r.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("listening"), "{line}");
    let s = Command::new(&tx).arg(&addr).output().unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(r.wait().unwrap().success());
    assert!(
        rest.contains("30 layers x 3 heads x 64 dims x 128 positions"),
        "{rest}"
    );
}
