//! The NVIDIA backend (feature `cuda`): the CUDA virtual-memory API through
//! cudarc's driver bindings, loaded at run time.
//!
//! A pool is one `cuMemCreate` allocation requested with POSIX file-descriptor
//! handles, reserved and mapped read-write on the exporter. The importer maps
//! it once (`cuMemImportFromShareableHandle`, `cuMemAddressReserve`,
//! `cuMemMap`, `cuMemSetAccess`, read-only where the driver allows) and
//! releases its handle at once: the mapping keeps the memory, which therefore
//! outlives an exporter that dies. Copies run on one stream of this end's
//! primary context and are waited for with `cuStreamSynchronize` (ordering is
//! CPU-side, per message). The legacy `cuIpcGetMemHandle` path is not used: it
//! fails on stream-ordered pool memory, which is what cudarc and cubecl allocate.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use cudarc::driver::sys::{
    self, CUdevice_attribute, CUmemAccess_flags, CUmemAllocationGranularity_flags,
    CUmemAllocationHandleType, CUmemAllocationType, CUmemLocationType,
};
use cudarc::driver::{CudaContext, CudaStream, DriverError};

use crate::error::{Result, TransportError};

use super::{Device, DeviceInfo, DeviceMem, Dir, Region, round_up};

const POSIX_FD: CUmemAllocationHandleType =
    CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;

/// `Err(Device)` naming `op` unless the driver call succeeded.
fn check(r: sys::CUresult, op: &'static str) -> Result<()> {
    r.result().map_err(|e| driver(op, e))
}

fn driver(op: &'static str, e: DriverError) -> TransportError {
    TransportError::device(op, format!("{e:?}"))
}

/// The context of one operation made current on this thread, and the
/// caller's restored when dropped: avp's calls leave the caller's current
/// context as they found it. (cudarc makes the primary context current when
/// a device is opened and when it is dropped; `CudaVmm::open` restores the
/// caller's, and closing a session may leave the primary context current.)
struct Current;

impl Current {
    fn push(ctx: &CudaContext) -> Result<Current> {
        check(
            // SAFETY: `ctx` is a live (retained) primary context.
            unsafe { sys::cuCtxPushCurrent_v2(ctx.cu_ctx()) },
            "cuCtxPushCurrent",
        )?;
        Ok(Current)
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context `push` put on this thread's stack.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    }
}

/// The calling thread's current context, put back when dropped.
struct Saved(sys::CUcontext);

impl Saved {
    fn now() -> Result<Saved> {
        let mut c: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the driver is loaded (checked by `open`).
        check(unsafe { sys::cuCtxGetCurrent(&mut c) }, "cuCtxGetCurrent")?;
        Ok(Saved(c))
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        // SAFETY: `self.0` was current on this thread (or null, which unbinds).
        let _ = unsafe { sys::cuCtxSetCurrent(self.0) };
    }
}

/// One GPU of this process: its primary context, a stream for our copies.
pub(crate) struct CudaVmm {
    ordinal: u32,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    dev: sys::CUdevice,
    uuid: String,
    name: String,
    granularity: usize,
    /// Whether allocations can be registered with an RDMA NIC (GPUDirect
    /// RDMA on VMM memory); they are then made with that flag.
    rdma_capable: bool,
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as `nvidia-smi -L` prints it.
fn uuid_string(u: &sys::CUuuid) -> String {
    let b: Vec<u8> = u.bytes.iter().map(|&c| c as u8).collect();
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

fn attribute(dev: sys::CUdevice, a: CUdevice_attribute) -> Result<i32> {
    let mut v = 0;
    check(
        // SAFETY: `v` is a valid out-pointer; `dev` is a device handle from the driver.
        unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) },
        "cuDeviceGetAttribute",
    )?;
    Ok(v)
}

/// Allocation properties of exportable device memory on `dev`.
fn properties(dev: sys::CUdevice, rdma_capable: bool) -> sys::CUmemAllocationProp {
    // SAFETY: the property struct is plain C data for which all-zero bytes
    // are a valid value (no flags, null pointers).
    let mut p: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    p.type_ = CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    p.requestedHandleTypes = POSIX_FD;
    p.location.type_ = CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = dev;
    p.allocFlags.gpuDirectRDMACapable = u8::from(rdma_capable);
    p
}

fn access(dev: sys::CUdevice, flags: CUmemAccess_flags) -> sys::CUmemAccessDesc {
    // SAFETY: as for `properties`: plain C data, zero is valid.
    let mut d: sys::CUmemAccessDesc = unsafe { std::mem::zeroed() };
    d.location.type_ = CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    d.location.id = dev;
    d.flags = flags;
    d
}

impl CudaVmm {
    /// Open GPU `ordinal`: it must support virtual-memory management with
    /// POSIX file-descriptor handles.
    pub(crate) fn open(ordinal: u32) -> Result<CudaVmm> {
        // cudarc panics at its first call when the driver library is absent:
        // ask first, and say so as an error.
        // SAFETY: only tries to load the driver library (and unloads it).
        if !unsafe { sys::is_culib_present() } {
            return Err(TransportError::device(
                "open",
                format!(
                    "cuda:{ordinal}: the NVIDIA driver library (libcuda.so) is not installed \
                     or not on the loader path"
                ),
            ));
        }
        // cudarc binds the primary context to this thread (here and in
        // `new_stream`): put the caller's back when done.
        cudarc::driver::result::init().map_err(|e| driver("start the driver", e))?;
        let _saved = Saved::now()?;
        let ctx = CudaContext::new(ordinal as usize).map_err(|e| driver("open the GPU", e))?;
        let _current = Current::push(&ctx)?;
        let dev = ctx.cu_device();
        let vmm = attribute(
            dev,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED,
        )?;
        let fds = attribute(
            dev,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
        )?;
        if vmm == 0 || fds == 0 {
            return Err(TransportError::device(
                "open",
                format!(
                    "cuda:{ordinal} lacks virtual-memory management ({vmm}) or POSIX \
                     file-descriptor handles ({fds}); the cuda transport needs both"
                ),
            ));
        }
        // GPUDirect RDMA on VMM memory: allocations an RDMA NIC can register.
        let rdma_capable = attribute(
            dev,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED,
        )
        .is_ok_and(|v| v != 0);
        let prop = properties(dev, rdma_capable);
        let mut g = 0usize;
        check(
            // SAFETY: valid out-pointer and property struct.
            unsafe {
                sys::cuMemGetAllocationGranularity(
                    &mut g,
                    &prop,
                    CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
                )
            },
            "cuMemGetAllocationGranularity",
        )?;
        let uuid = ctx.uuid().map_err(|e| driver("device uuid", e))?;
        let name = ctx.name().map_err(|e| driver("device name", e))?;
        let stream = ctx.new_stream().map_err(|e| driver("create stream", e))?;
        Ok(CudaVmm {
            ordinal,
            uuid: uuid_string(&uuid),
            name: format!("{name} (cuda:{ordinal})"),
            granularity: g.max(1),
            rdma_capable,
            ctx,
            stream,
            dev,
        })
    }

    fn current(&self) -> Result<Current> {
        Current::push(&self.ctx)
    }

    /// Reserve and map `len` bytes of `handle`, accessible to this device
    /// with `flags` (read-only falls back to read-write where the driver
    /// refuses it).
    fn map(
        &self,
        handle: sys::CUmemGenericAllocationHandle,
        len: usize,
        read_only: bool,
    ) -> Result<u64> {
        let mut va: sys::CUdeviceptr = 0;
        check(
            // SAFETY: valid out-pointer; size is a multiple of the granularity.
            unsafe { sys::cuMemAddressReserve(&mut va, len, self.granularity, 0, 0) },
            "cuMemAddressReserve",
        )?;
        // SAFETY: `va` is a fresh reservation of `len` bytes; `handle` a live allocation.
        if let Err(e) = check(unsafe { sys::cuMemMap(va, len, 0, handle, 0) }, "cuMemMap") {
            // SAFETY: the reservation made above, unused.
            unsafe { sys::cuMemAddressFree(va, len) };
            return Err(e);
        }
        let rw = access(
            self.dev,
            CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        );
        let ro = access(self.dev, CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READ);
        // SAFETY: `va..va+len` is mapped above; the descriptors are valid.
        let set = unsafe {
            if read_only && sys::cuMemSetAccess(va, len, &ro, 1).result().is_ok() {
                sys::CUresult::CUDA_SUCCESS
            } else {
                sys::cuMemSetAccess(va, len, &rw, 1)
            }
        };
        if let Err(e) = check(set, "cuMemSetAccess") {
            // SAFETY: undo the mapping and reservation made above.
            unsafe {
                sys::cuMemUnmap(va, len);
                sys::cuMemAddressFree(va, len);
            }
            return Err(e);
        }
        Ok(va)
    }
}

/// A mapped VMM allocation; unmapped (and released, if ours) on drop.
struct VmmRegion {
    ctx: Arc<CudaContext>,
    va: sys::CUdeviceptr,
    len: usize,
    /// The allocation handle, kept by the exporter only.
    handle: Option<sys::CUmemGenericAllocationHandle>,
}

impl Region for VmmRegion {
    fn addr(&self) -> u64 {
        self.va
    }

    fn len(&self) -> usize {
        self.len
    }

    fn export(&self) -> Result<OwnedFd> {
        let h = self.handle.ok_or_else(|| {
            TransportError::device("export", "an imported region is not exported")
        })?;
        let _current = Current::push(&self.ctx)?;
        let mut fd: i32 = -1;
        check(
            // SAFETY: for POSIX fd handles the out-parameter is an int.
            unsafe {
                sys::cuMemExportToShareableHandle(
                    (&mut fd as *mut i32).cast::<c_void>(),
                    h,
                    POSIX_FD,
                    0,
                )
            },
            "cuMemExportToShareableHandle",
        )?;
        // SAFETY: the driver just created this descriptor for us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn dmabuf(&self) -> Result<OwnedFd> {
        let _current = Current::push(&self.ctx)?;
        let mut fd: i32 = -1;
        check(
            // SAFETY: for dma-buf handles the out-parameter is an int; the
            // range is this region's mapping.
            unsafe {
                sys::cuMemGetHandleForAddressRange(
                    (&mut fd as *mut i32).cast::<c_void>(),
                    self.va,
                    self.len,
                    sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                    0,
                )
            },
            "cuMemGetHandleForAddressRange (dma-buf; needs GPUDirect RDMA support)",
        )?;
        // SAFETY: the driver just created this descriptor for us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

impl Drop for VmmRegion {
    fn drop(&mut self) {
        let _current = Current::push(&self.ctx);
        // SAFETY: `va..va+len` was reserved and mapped by this region and no
        // loan or guard uses it any more (they hold the region).
        unsafe {
            sys::cuMemUnmap(self.va, self.len);
            sys::cuMemAddressFree(self.va, self.len);
            if let Some(h) = self.handle {
                sys::cuMemRelease(h);
            }
        }
    }
}

impl DeviceMem for CudaVmm {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: "cuda".into(),
            uuid: self.uuid.clone(),
            name: self.name.clone(),
        }
    }

    fn reach(&self, peer: &DeviceInfo) -> std::result::Result<String, String> {
        if peer.backend != "cuda" {
            return Err(format!(
                "this end's device is {}, the peer's is {} ({})",
                self.name, peer.name, peer.backend
            ));
        }
        if peer.uuid == self.uuid {
            return Ok(format!(
                "same GPU on both ends: {} ({})",
                self.name, self.uuid
            ));
        }
        // Another GPU of this host: it must be able to read ours.
        let mut count = 0;
        // SAFETY: valid out-pointer.
        if unsafe { sys::cuDeviceGetCount(&mut count) }
            .result()
            .is_err()
        {
            return Err("cannot enumerate GPUs to find the peer's".into());
        }
        for ordinal in 0..count {
            let mut d: sys::CUdevice = 0;
            // SAFETY: valid out-pointer; ordinal < count.
            if unsafe { sys::cuDeviceGet(&mut d, ordinal) }
                .result()
                .is_err()
            {
                continue;
            }
            // SAFETY: zeroed plain C data as an out-parameter.
            let mut u: sys::CUuuid = unsafe { std::mem::zeroed() };
            // SAFETY: valid out-pointer and device.
            if unsafe { sys::cuDeviceGetUuid(&mut u, d) }.result().is_err()
                || uuid_string(&u) != peer.uuid
            {
                continue;
            }
            let mut ok = 0;
            // SAFETY: valid out-pointer and devices.
            let r = unsafe { sys::cuDeviceCanAccessPeer(&mut ok, d, self.dev) };
            return if r.result().is_ok() && ok == 1 {
                Ok(format!(
                    "the peer's GPU {} has peer access to this end's {}",
                    peer.name, self.name
                ))
            } else {
                Err(format!(
                    "the peer's GPU {} cannot access this end's {} (no peer access)",
                    peer.name, self.name
                ))
            };
        }
        Err(format!(
            "the peer's GPU {} ({}) is not visible to this process",
            peer.name, peer.uuid
        ))
    }

    fn granularity(&self) -> usize {
        self.granularity
    }

    fn alloc(&self, len: usize) -> Result<Box<dyn Region>> {
        let _current = self.current()?;
        let len = round_up(len, self.granularity)
            .ok_or_else(|| TransportError::device("alloc", format!("{len} bytes overflow")))?;
        let prop = properties(self.dev, self.rdma_capable);
        let mut h: sys::CUmemGenericAllocationHandle = 0;
        check(
            // SAFETY: valid out-pointer and properties; len is granularity-aligned.
            unsafe { sys::cuMemCreate(&mut h, len, &prop, 0) },
            "cuMemCreate",
        )?;
        match self.map(h, len, false) {
            Ok(va) => Ok(Box::new(VmmRegion {
                ctx: Arc::clone(&self.ctx),
                va,
                len,
                handle: Some(h),
            })),
            Err(e) => {
                // SAFETY: the handle created above, never mapped.
                unsafe { sys::cuMemRelease(h) };
                Err(e)
            }
        }
    }

    fn import(&self, fd: OwnedFd, len: usize) -> Result<Box<dyn Region>> {
        if len == 0 || !len.is_multiple_of(self.granularity) {
            return Err(TransportError::Segment(format!(
                "a device region of {len} bytes is not a multiple of the granularity {}",
                self.granularity
            )));
        }
        let _current = self.current()?;
        let mut h: sys::CUmemGenericAllocationHandle = 0;
        check(
            // SAFETY: for POSIX fd handles the driver takes the descriptor's value
            // cast to a pointer; it dups what it needs, and we close ours after.
            unsafe {
                sys::cuMemImportFromShareableHandle(
                    &mut h,
                    fd.as_raw_fd() as usize as *mut c_void,
                    POSIX_FD,
                )
            },
            "cuMemImportFromShareableHandle",
        )?;
        drop(fd);
        let mapped = self.map(h, len, true);
        // The mapping keeps the memory; our handle is not needed after it.
        // SAFETY: the handle imported above.
        unsafe { sys::cuMemRelease(h) };
        Ok(Box::new(VmmRegion {
            ctx: Arc::clone(&self.ctx),
            va: mapped?,
            len,
            handle: None,
        }))
    }

    unsafe fn copy(&self, dst: u64, src: u64, len: usize, dir: Dir) -> Result<()> {
        let _current = self.current()?;
        let s = self.stream.cu_stream();
        // SAFETY: the caller guarantees the ranges for `dir` and that they
        // stay valid until `sync`.
        let r = unsafe {
            match dir {
                Dir::HostToDevice => sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, len, s),
                Dir::DeviceToHost => sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src, len, s),
                Dir::DeviceToDevice => sys::cuMemcpyDtoDAsync_v2(dst, src, len, s),
            }
        };
        check(r, "cuMemcpyAsync")
    }

    fn sync(&self) -> Result<()> {
        let _current = self.current()?;
        check(
            // SAFETY: the stream is ours and alive.
            unsafe { sys::cuStreamSynchronize(self.stream.cu_stream()) },
            "cuStreamSynchronize",
        )
    }
}
