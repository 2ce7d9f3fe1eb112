//! Helpers shared by the command-line tests.

use serde_json::Value;

/// Run `avp ARGS…`, require success (showing its stderr otherwise) and parse each
/// line of its standard output as JSON.
pub fn avp_json<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vec<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_avp"))
        .args(args)
        .output()
        .expect("run avp");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
