//! The committed `include/avp.h` is what cbindgen generates from this crate now.
//! Regenerate with `AVP_BLESS=1 cargo test -p avp-ffi --test header`.

use std::path::PathBuf;

#[test]
fn committed_header_is_fresh() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = crate_dir.join("../include/avp.h");
    if std::env::var_os("AVP_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/avp.h is stale: regenerate it with `AVP_BLESS=1 cargo test -p avp-ffi --test header`"
    );
}
