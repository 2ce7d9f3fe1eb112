//! The tensor backend a model runs on, an [`Engine`]: burn's pure-Rust CPU
//! backend ([`Cpu`], always built) or burn-cuda (`Gpu`, feature `cuda`).
//!
//! The decoder is plain model code generic over its engine; [`crate::Model`]
//! picks one when it loads, from its [`Device`]. Beyond burn's tensor API, an
//! engine does one thing: it reaches a KV tensor's bytes where they live
//! ([`Engine::sections`], [`Engine::filled`]), so that a transport copies a GPU
//! model's KV cache device to device instead of through host memory.
//!
//! ```
//! use avp_model::engine::{Cpu, Engine};
//! use avp_model::{Device, KvTarget};
//! use burn::tensor::Tensor;
//!
//! let device = Cpu::burn_device(Device::Cpu)?;
//! // A CPU engine hands out host bytes...
//! let t = Tensor::<Cpu, 4>::ones([1, 1, 2, 2], &device);
//! let sections = Cpu::sections(&[&t])?;
//! assert_eq!(sections[0].host().map(<[u8]>::len), Some(16));
//! // ...and takes them in the same way.
//! let back = Cpu::filled(1, [1, 1, 2, 2], &device, &mut |_, target| match target {
//!     KvTarget::Host(bytes) => Ok(bytes.copy_from_slice(&1f32.to_le_bytes().repeat(4))),
//!     KvTarget::Device { .. } => unreachable!("a CPU engine fills host memory"),
//! })?;
//! assert_eq!(back[0].clone().into_data(), t.into_data());
//! assert_eq!(Cpu::device_of(&device), Device::Cpu);
//! # Ok::<(), avp_model::ModelError>(())
//! ```

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::device::Device;
use crate::error::{ModelError, Result};
use crate::kv::{Cache, KvCache, KvSection, KvTarget};

/// burn's pure-Rust CPU backend (SIMD kernels and gemm, all cores).
pub type Cpu = burn::backend::Flex;

/// burn-cuda (cubecl's CUDA runtime, kernels compiled at run time by NVRTC).
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Cpu {}
    #[cfg(feature = "cuda")]
    impl Sealed for super::Gpu {}
}

/// Fills tensor `i`'s bytes: host bytes for a CPU engine, device memory for a
/// GPU one.
pub type Fill<'a> = dyn FnMut(usize, KvTarget<'_>) -> Result<()> + 'a;

/// A tensor backend a model can run on. Sealed: [`Cpu`] and, with the `cuda`
/// feature, `Gpu`.
pub trait Engine: Backend + sealed::Sealed {
    /// burn's handle for `device`, checked: an error when `device` belongs to
    /// another engine or cannot be used here.
    fn burn_device(device: Device) -> Result<Self::Device>;

    /// The [`Device`] a burn device of this engine is.
    fn device_of(device: &Self::Device) -> Device;

    /// The bytes of each of `tensors` (f32, row-major) where they live, for a
    /// transport to copy: host bytes on the CPU; on a GPU, device memory that
    /// the work producing it has finished writing (one wait for all), held
    /// until the section drops.
    fn sections(tensors: &[&Tensor<Self, 4>]) -> Result<Vec<KvSection>>;

    /// `count` new f32 tensors of `shape` on `device`, tensor `i`'s bytes
    /// written in place by `fill(i, ..)`: device memory on a GPU (each copy
    /// finished when `fill` returns), host bytes on the CPU.
    fn filled(
        count: usize,
        shape: [usize; 4],
        device: &Self::Device,
        fill: &mut Fill<'_>,
    ) -> Result<Vec<Tensor<Self, 4>>>;

    /// `cache` as the engine-agnostic [`KvCache`].
    fn wrap(cache: Cache<Self>) -> KvCache;

    /// `kv`'s tensors if they are this engine's.
    fn unwrap(kv: &KvCache) -> Option<&Cache<Self>>;
}

fn f32_bytes(shape: [usize; 4]) -> usize {
    shape.iter().product::<usize>() * 4
}

impl Engine for Cpu {
    fn burn_device(device: Device) -> Result<Self::Device> {
        match device {
            Device::Cpu => Ok(burn::backend::flex::FlexDevice),
            other => Err(ModelError::Device(format!(
                "{other} is not the CPU engine's device"
            ))),
        }
    }

    fn device_of(_: &Self::Device) -> Device {
        Device::Cpu
    }

    fn sections(tensors: &[&Tensor<Self, 4>]) -> Result<Vec<KvSection>> {
        Ok(tensors
            .iter()
            .map(|t| KvSection::in_host((*t).clone().into_data()))
            .collect())
    }

    fn filled(
        count: usize,
        shape: [usize; 4],
        device: &Self::Device,
        fill: &mut Fill<'_>,
    ) -> Result<Vec<Tensor<Self, 4>>> {
        (0..count)
            .map(|i| {
                let mut bytes = vec![0u8; f32_bytes(shape)];
                fill(i, KvTarget::Host(&mut bytes))?;
                Ok(Tensor::from_data(
                    TensorData::from_bytes_vec(bytes, shape, DType::F32),
                    device,
                ))
            })
            .collect()
    }

    fn wrap(cache: Cache<Self>) -> KvCache {
        KvCache::cpu(cache)
    }

    fn unwrap(kv: &KvCache) -> Option<&Cache<Self>> {
        kv.as_cpu()
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use burn::tensor::TensorPrimitive;
    use burn_cubecl::cubecl::Runtime;
    use burn_cubecl::cubecl::cuda::CudaRuntime;
    use burn_cubecl::tensor::CubeTensor;

    use super::*;

    /// The device address of `t`'s first byte; `t` must be contiguous.
    fn address(t: &CubeTensor<CudaRuntime>) -> Result<u64> {
        let resource = t
            .client
            .get_resource(t.handle.clone())
            .map_err(|e| ModelError::Tensor(format!("locating a CUDA tensor: {e:?}")))?;
        Ok(resource.resource().ptr)
    }

    fn sync(device: &burn::backend::cuda::CudaDevice) -> Result<()> {
        Gpu::sync(device).map_err(|e| ModelError::Tensor(format!("CUDA sync: {e:?}")))
    }

    impl Engine for Gpu {
        fn burn_device(device: Device) -> Result<Self::Device> {
            match device {
                Device::Cuda(index) => {
                    device.check()?;
                    Ok(burn::backend::cuda::CudaDevice { index })
                }
                other => Err(ModelError::Device(format!(
                    "{other} is not the CUDA engine's device"
                ))),
            }
        }

        fn device_of(device: &Self::Device) -> Device {
            Device::Cuda(device.index)
        }

        fn sections(tensors: &[&Tensor<Self, 4>]) -> Result<Vec<KvSection>> {
            let Some(first) = tensors.first() else {
                return Ok(Vec::new());
            };
            let mut out = Vec::with_capacity(tensors.len());
            for t in tensors {
                let prim = (*t).clone().into_primitive().tensor();
                // A cached K or V may be a strided view (heads swapped to the
                // front); one copy on the GPU makes it the contiguous bytes of
                // the wire's HND layout.
                let prim = burn_cubecl::kernel::into_contiguous(prim);
                let len = f32_bytes(t.dims());
                if !prim.is_contiguous() || prim.dtype.size() != 4 {
                    return Err(ModelError::Tensor(format!(
                        "a KV tensor of {:?} ({:?}) is not {len} contiguous f32 bytes",
                        t.dims(),
                        prim.dtype
                    )));
                }
                let addr = address(&prim)?;
                out.push(KvSection::in_device(addr, len, Box::new(prim)));
            }
            // The kernels that wrote them ran on burn's stream; the transport
            // copies on its own: wait for them once.
            sync(&first.device())?;
            Ok(out)
        }

        fn filled(
            count: usize,
            shape: [usize; 4],
            device: &Self::Device,
            fill: &mut Fill<'_>,
        ) -> Result<Vec<Tensor<Self, 4>>> {
            let len = f32_bytes(shape);
            if len == 0 {
                return Ok((0..count).map(|_| Tensor::empty(shape, device)).collect());
            }
            let client = CudaRuntime::client(device);
            let mut tensors = Vec::with_capacity(count);
            for _ in 0..count {
                let t = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
                    client.clone(),
                    device.clone(),
                    shape.into(),
                    DType::F32,
                );
                // The handle's buffer is rounded up to the allocator's
                // alignment; the tensor's part is what is in use.
                if !t.is_contiguous() || t.handle.size_in_used() != len as u64 {
                    return Err(ModelError::Tensor(format!(
                        "burn-cuda allocated {shape:?} as {} bytes with strides {:?}; expected {len} contiguous bytes",
                        t.handle.size_in_used(),
                        t.meta.strides()
                    )));
                }
                let addr = address(&t)?;
                tensors.push((t, addr));
            }
            // The allocations (and any kernel still reading memory they reuse)
            // are ordered on burn's stream; the fills copy on another.
            sync(device)?;
            tensors
                .into_iter()
                .enumerate()
                .map(|(i, (t, addr))| {
                    fill(i, KvTarget::Device { addr, len })?;
                    Ok(Tensor::from_primitive(TensorPrimitive::Float(t)))
                })
                .collect()
        }

        fn wrap(cache: Cache<Self>) -> KvCache {
            KvCache::gpu(cache)
        }

        fn unwrap(kv: &KvCache) -> Option<&Cache<Self>> {
            kv.as_gpu()
        }
    }
}
