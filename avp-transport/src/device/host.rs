//! The emulated device: host memory in sealed memfds. Copies are `memcpy`,
//! synchronisation is a no-op. A memfd outlives its exporter while a peer
//! keeps it mapped, as VMM memory does, so the life-cycle tests mean the same.

use std::os::fd::OwnedFd;

use crate::error::{Result, TransportError};
use crate::handshake::boot_id;
use crate::shm::segment::{self, Mapping, page_size};

use super::{Device, DeviceInfo, DeviceMem, Dir, Region, round_up};

/// Host memory standing in for a device.
pub(crate) struct HostMem {
    host: String,
}

impl HostMem {
    pub(crate) fn new() -> HostMem {
        HostMem { host: boot_id() }
    }
}

/// An emulated allocation: a sealed memfd and its mapping.
struct HostRegion {
    fd: Option<OwnedFd>,
    map: Mapping,
    len: usize,
}

impl Region for HostRegion {
    fn addr(&self) -> u64 {
        self.map.ptr() as u64
    }

    fn len(&self) -> usize {
        self.len
    }

    fn export(&self) -> Result<OwnedFd> {
        self.fd
            .as_ref()
            .ok_or_else(|| TransportError::device("export", "an imported region is not exported"))?
            .try_clone()
            .map_err(TransportError::io("dup pool descriptor"))
    }
}

impl DeviceMem for HostMem {
    fn device(&self) -> Device {
        Device::Emulated
    }

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: "emulated".into(),
            uuid: format!("host-{}", self.host),
            name: "host memory (emulated device)".into(),
        }
    }

    fn reach(&self, peer: &DeviceInfo) -> std::result::Result<String, String> {
        let ours = self.info();
        if peer.backend != ours.backend {
            return Err(format!(
                "this end emulates a device in host memory, the peer uses {} ({})",
                peer.backend, peer.name
            ));
        }
        if peer.uuid != ours.uuid || self.host.is_empty() {
            return Err("the peer's emulated device is on another host".into());
        }
        Ok("both ends emulate a device in host memory (Device::Emulated; no GPU involved)".into())
    }

    fn granularity(&self) -> usize {
        page_size()
    }

    fn alloc(&self, len: usize) -> Result<Box<dyn Region>> {
        let len = round_up(len, page_size())
            .ok_or_else(|| TransportError::device("alloc", format!("{len} bytes overflow")))?;
        let fd = segment::create_memfd("avp-device", len)?;
        let map = Mapping::map(&fd, 0, len, true)?;
        Ok(Box::new(HostRegion {
            fd: Some(fd),
            map,
            len,
        }))
    }

    fn import(&self, fd: OwnedFd, len: usize) -> Result<Box<dyn Region>> {
        if len == 0 || !len.is_multiple_of(page_size()) {
            return Err(TransportError::Segment(format!(
                "a device region of {len} bytes is not a whole number of pages"
            )));
        }
        segment::check_memfd(&fd, len)?;
        let map = Mapping::map(&fd, 0, len, false)?;
        Ok(Box::new(HostRegion { fd: None, map, len }))
    }

    unsafe fn copy(&self, dst: u64, src: u64, len: usize, _dir: Dir) -> Result<()> {
        // SAFETY: the caller guarantees both ranges (host addresses here, in
        // every direction) and that nothing else uses them during the copy.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exported_region_imports_read_only_with_the_same_bytes() {
        let dev = HostMem::new();
        let r = dev.alloc(10).unwrap();
        assert_eq!(r.len(), page_size());
        let data = [7u8; 10];
        // SAFETY: r is at least 10 writable bytes; data is 10 readable ones.
        unsafe { dev.copy(r.addr(), data.as_ptr() as u64, 10, Dir::HostToDevice) }.unwrap();
        let imported = dev.import(r.export().unwrap(), r.len()).unwrap();
        drop(r); // the exporter goes; the import keeps the memory
        let mut back = [0u8; 10];
        // SAFETY: the import is at least 10 readable bytes; back is 10 writable.
        unsafe {
            dev.copy(
                back.as_mut_ptr() as u64,
                imported.addr(),
                10,
                Dir::DeviceToHost,
            )
        }
        .unwrap();
        assert_eq!(back, data);
        assert!(imported.export().is_err(), "imports are not re-exported");
        let fd = segment::create_memfd("t", page_size()).unwrap();
        assert!(dev.import(fd, 2 * page_size()).is_err(), "size must match");
        assert!(dev.reach(&dev.info()).is_ok());
        let gpu = DeviceInfo {
            backend: "cuda".into(),
            uuid: "GPU-1".into(),
            name: "H200".into(),
        };
        assert!(dev.reach(&gpu).unwrap_err().contains("cuda"));
    }
}
