//! Where the decoder runs: the CPU (burn's pure-Rust `flex` backend, always built)
//! or an NVIDIA GPU (burn-cuda, with the `cuda` feature). The [`Device`] chosen
//! when a model loads picks its [engine](crate::engine) and so where every
//! tensor of that model lives.
//!
//! ```
//! use avp_model::Device;
//!
//! let cpu: Device = "cpu".parse()?;
//! assert_eq!(cpu, Device::Cpu);
//! assert_eq!("cuda:1".parse::<Device>()?, Device::Cuda(1));
//! assert!("tpu".parse::<Device>().is_err());
//! # Ok::<(), avp_model::ModelError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use crate::error::{ModelError, Result};

/// The hardware a model runs on. Parses from `cpu`, `cuda` (GPU 0) and `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU (burn `flex`: SIMD kernels and gemm, all cores).
    #[default]
    Cpu,
    /// The NVIDIA GPU with this ordinal (needs the `cuda` feature and libcuda).
    Cuda(usize),
}

impl Device {
    /// Whether a model can be loaded onto this device here: the feature is built
    /// in and, for CUDA, the driver and NVRTC libraries load, the driver starts and
    /// the ordinal exists. The error says which of these is missing.
    pub fn check(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(index) => cuda_usable(index),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_usable(index: usize) -> Result<()> {
    let unusable = |why: String| ModelError::Device(format!("cuda:{index} cannot be used: {why}"));
    // burn-cuda panics on each of these at first use; ask first. SAFETY: the two
    // checks only try to dlopen the libraries (cudarc's `fallback-dynamic-loading`).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unusable(
            "the CUDA driver library (libcuda.so) is not installed here".into(),
        ));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unusable(
            "the CUDA runtime compiler (libnvrtc.so, which burn-cuda builds its kernels \
             with) is not installed here"
                .into(),
        ));
    }
    cudarc::driver::result::init()
        .map_err(|e| unusable(format!("the CUDA driver did not start: {e:?}")))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| unusable(format!("counting CUDA devices failed: {e:?}")))?;
    if index >= count.max(0) as usize {
        return Err(unusable(format!(
            "this machine has {count} CUDA device(s) (check CUDA_VISIBLE_DEVICES)"
        )));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_usable(index: usize) -> Result<()> {
    Err(ModelError::Device(format!(
        "cuda:{index} needs avp built with the `cuda` feature (cargo build --features cuda)"
    )))
}

impl FromStr for Device {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Device> {
        let bad = || {
            ModelError::Device(format!(
                "unknown device {s:?}: expected cpu, cuda or cuda:N"
            ))
        };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                // Plain decimal only, so that parsing and printing round-trip.
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                let canonical = !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_digit())
                    && (n == "0" || !n.starts_with('0'));
                match canonical {
                    true => n.parse().map(Device::Cuda).map_err(|_| bad()),
                    false => Err(bad()),
                }
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (text, device) in [
            ("cpu", Device::Cpu),
            ("cuda:0", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
        ] {
            assert_eq!(text.parse::<Device>().unwrap(), device);
            assert_eq!(device.to_string(), text);
        }
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        for bad in [
            "", "gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "cuda:01", " cuda", "CPU",
        ] {
            let err = bad.parse::<Device>().unwrap_err().to_string();
            assert!(
                err.contains("expected cpu, cuda or cuda:N"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn cpu_is_always_there() {
        Device::Cpu.check().unwrap();
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = Device::Cuda(0).check().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_without_a_driver_is_an_error_not_a_panic() {
        // SAFETY: as in `cuda_device`: only a dlopen attempt.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("skipped: libcuda is present (the GPU tests cover this machine)");
            return;
        }
        let err = Device::Cuda(0).check().unwrap_err().to_string();
        assert!(err.contains("libcuda"), "{err}");
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn an_ordinal_that_does_not_exist_is_an_error() {
        let err = Device::Cuda(1000).check().unwrap_err().to_string();
        assert!(err.starts_with("cuda:1000 cannot be used"), "{err}");
    }
}
