//! Helpers shared by the workspace's interop tests.

use std::path::{Path, PathBuf};

/// The Python that has the reference `avp` 0.6.2: `AVP_PYTHON`, else the
/// virtual environment `scripts/test` creates at `.venv`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("AVP_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "the Python reference is not installed: run `scripts/test` (it creates .venv with avp==0.6.2) \
         or set AVP_PYTHON to a python that has avp==0.6.2"
    );
    venv
}
