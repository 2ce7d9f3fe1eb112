//! DLPack (v1 versioned and the legacy form) for CPU sections: the structs of
//! `dlpack.h` and the capsule protocol. The context a consumer holds is Rust
//! data only (what keeps the memory alive), so its deleter needs no GIL.

use std::ffi::{CStr, c_void};

use pyo3::ffi;
use pyo3::prelude::*;

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct DLDevice {
    pub(crate) device_type: i32,
    pub(crate) device_id: i32,
}

/// `kDLCPU`.
pub(crate) const CPU: i32 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct DLDataType {
    pub(crate) code: u8,
    pub(crate) bits: u8,
    pub(crate) lanes: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct DLTensor {
    pub(crate) data: *mut c_void,
    pub(crate) device: DLDevice,
    pub(crate) ndim: i32,
    pub(crate) dtype: DLDataType,
    pub(crate) shape: *mut i64,
    /// In elements, not bytes.
    pub(crate) strides: *mut i64,
    pub(crate) byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

const _: () = assert!(
    std::mem::size_of::<DLTensor>() == 48
        && std::mem::size_of::<DLManagedTensor>() == 64
        && std::mem::size_of::<DLManagedTensorVersioned>() == 80
);

/// `DLPACK_FLAG_BITMASK_READ_ONLY`.
pub(crate) const READ_ONLY: u64 = 1;
/// `DLPACK_FLAG_BITMASK_IS_COPIED`.
pub(crate) const IS_COPIED: u64 = 2;

const LEGACY: &CStr = c"dltensor";
const VERSIONED: &CStr = c"dltensor_versioned";

/// What a consumer holds until it calls the deleter: whatever keeps the data
/// alive, and the shape and strides the tensor points to.
pub(crate) struct Ctx {
    pub(crate) _keep: Box<dyn Send>,
    pub(crate) shape: Vec<i64>,
    pub(crate) strides: Vec<i64>,
}

unsafe extern "C" fn delete_legacy(m: *mut DLManagedTensor) {
    // SAFETY: `m` and its context were made by `capsule` with Box::into_raw and
    // the consumer calls the deleter once.
    unsafe {
        let m = Box::from_raw(m);
        drop(Box::from_raw(m.manager_ctx as *mut Ctx));
    }
}

unsafe extern "C" fn delete_versioned(m: *mut DLManagedTensorVersioned) {
    // SAFETY: as in `delete_legacy`.
    unsafe {
        let m = Box::from_raw(m);
        drop(Box::from_raw(m.manager_ctx as *mut Ctx));
    }
}

/// The capsule's destructor: frees the tensor unless a consumer took it (and
/// renamed the capsule `used_…`).
unsafe extern "C" fn capsule_legacy(cap: *mut ffi::PyObject) {
    // SAFETY: called by Python with the capsule; a valid (unused) name means
    // the pointer is still ours.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, LEGACY.as_ptr()) == 1 {
            let p = ffi::PyCapsule_GetPointer(cap, LEGACY.as_ptr()) as *mut DLManagedTensor;
            if let Some(d) = p.as_ref().and_then(|m| m.deleter) {
                d(p)
            }
        }
    }
}

unsafe extern "C" fn capsule_versioned(cap: *mut ffi::PyObject) {
    // SAFETY: as in `capsule_legacy`.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, VERSIONED.as_ptr()) == 1 {
            let p =
                ffi::PyCapsule_GetPointer(cap, VERSIONED.as_ptr()) as *mut DLManagedTensorVersioned;
            if let Some(d) = p.as_ref().and_then(|m| m.deleter) {
                d(p)
            }
        }
    }
}

/// A DLPack capsule over `data` (CPU memory that `ctx.keep` keeps alive),
/// versioned when the consumer asked for DLPack ≥ 1.
pub(crate) fn capsule(
    py: Python<'_>,
    data: *const u8,
    dtype: DLDataType,
    ctx: Ctx,
    versioned: bool,
    flags: u64,
) -> PyResult<Py<PyAny>> {
    let mut ctx = Box::new(ctx);
    let tensor = DLTensor {
        data: data as *mut c_void,
        device: DLDevice {
            device_type: CPU,
            device_id: 0,
        },
        ndim: ctx.shape.len() as i32,
        dtype,
        shape: ctx.shape.as_mut_ptr(),
        strides: ctx.strides.as_mut_ptr(),
        byte_offset: 0,
    };
    let ctx = Box::into_raw(ctx).cast::<c_void>();
    let (ptr, name, destructor): (*mut c_void, &CStr, ffi::PyCapsule_Destructor) = if versioned {
        let m = Box::new(DLManagedTensorVersioned {
            version: DLPackVersion { major: 1, minor: 0 },
            manager_ctx: ctx,
            deleter: Some(delete_versioned),
            flags,
            dl_tensor: tensor,
        });
        (Box::into_raw(m).cast(), VERSIONED, capsule_versioned)
    } else {
        let m = Box::new(DLManagedTensor {
            dl_tensor: tensor,
            manager_ctx: ctx,
            deleter: Some(delete_legacy),
        });
        (Box::into_raw(m).cast(), LEGACY, capsule_legacy)
    };
    // SAFETY: `ptr` is a live managed tensor; the name is static; on failure the
    // capsule does not exist, so the tensor is freed here.
    unsafe {
        let cap = ffi::PyCapsule_New(ptr, name.as_ptr(), Some(destructor));
        if cap.is_null() {
            if versioned {
                delete_versioned(ptr.cast());
            } else {
                delete_legacy(ptr.cast());
            }
        }
        Bound::from_owned_ptr_or_err(py, cap).map(Bound::unbind)
    }
}
