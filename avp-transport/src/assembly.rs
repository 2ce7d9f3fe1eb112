//! A KV cache that arrives layer by layer: the sender sends each layer (or
//! group of layers) as its own message as soon as the model has produced it
//! (`KvCacheDesc::with_layers`), and the receiver starts on layer `l` as soon
//! as it has landed, while later layers are still on the way. Over `rdma://`
//! this overlaps the transfer with both ends' compute; it works the same over
//! every transport.
//!
//! ```no_run
//! use std::time::Duration;
//! use avp_transport::{Endpoint, KvAssembly, Options};
//! use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, LayerRange, MessageLayout, ModelIdentity, Payload};
//! # fn main() -> avp_transport::Result<()> {
//! let id = ModelIdentity::default();
//! let listener = Endpoint::bind("tcp://127.0.0.1:7001", &id, Options::default())?;
//! // Sender: one message per layer, each sent as soon as the layer is computed.
//! let mut tx = Endpoint::connect("tcp://127.0.0.1:7001", &id, Options::default())?;
//! let desc = KvCacheDesc::new(30, 3, 64, 512, DType::F16, KvLayout::Hnd);
//! for l in 0..desc.num_layers {
//!     let one = Payload::KvCache(desc.with_layers(LayerRange::new(l, l + 1)));
//!     let layout = MessageLayout::new(&Envelope::default(), &one).map_err(avp_transport::TransportError::from)?;
//!     let mut loan = tx.loan(&layout)?;
//!     // ... write layer l's K and V into loan.writer().sections_mut() ...
//!     loan.finish()?.send()?;
//! }
//! // Receiver: wait for each layer as the model needs it.
//! let rx = listener.accept(Duration::from_secs(5))?;
//! let mut cache = KvAssembly::new(&rx);
//! for l in 0..30 {
//!     let layer = cache.wait_layer(l, Duration::from_secs(5))?; // checksums verified
//!     let (_k, _v) = (layer.k, layer.v);
//! }
//! assert!(cache.is_complete());
//! # Ok(()) }
//! ```
//!
//! A receiver holds every part until the assembly is dropped: over shared
//! memory and RDMA each part occupies a slot, so give the listener at least
//! as many slots as a cache has parts (`ShmOptions::slots`,
//! `RdmaOptions::slots`), or group layers.

use std::time::{Duration, Instant};

use avp_wire::{KvCacheDesc, LayerRange, Payload};

use crate::error::{Result, TransportError};
use crate::receiver::{Receiver, RecvGuard};

/// One layer's K and V, as sent (their checksums verified).
#[derive(Clone, Copy, Debug)]
pub struct Layer<'a> {
    /// The layer's number.
    pub index: u32,
    /// Its keys.
    pub k: &'a [u8],
    /// Its values.
    pub v: &'a [u8],
}

/// A KV cache arriving layer by layer on one receiver (see the module docs).
pub struct KvAssembly<'r> {
    rx: &'r Receiver,
    /// The whole cache's shape (every layer), from the first part.
    shape: Option<KvCacheDesc>,
    parts: Vec<RecvGuard>,
    /// Per layer: the part holding it.
    owner: Vec<Option<usize>>,
}

impl<'r> KvAssembly<'r> {
    /// An empty assembly receiving on `rx`.
    pub fn new(rx: &'r Receiver) -> KvAssembly<'r> {
        KvAssembly {
            rx,
            shape: None,
            parts: Vec::new(),
            owner: Vec::new(),
        }
    }

    /// The whole cache's shape, once the first part has arrived.
    pub fn desc(&self) -> Option<&KvCacheDesc> {
        self.shape.as_ref()
    }

    /// Whether layer `layer` has landed.
    pub fn is_ready(&self, layer: u32) -> bool {
        self.owner.get(layer as usize).is_some_and(Option::is_some)
    }

    /// Layers landed so far.
    pub fn ready(&self) -> u32 {
        self.owner.iter().filter(|o| o.is_some()).count() as u32
    }

    /// Whether every layer has landed.
    pub fn is_complete(&self) -> bool {
        !self.owner.is_empty() && self.owner.iter().all(Option::is_some)
    }

    /// Take the parts that have arrived, without waiting; how many layers are ready.
    ///
    /// # Errors
    /// As [`wait_layer`](Self::wait_layer).
    pub fn poll(&mut self) -> Result<u32> {
        while !self.is_complete() {
            match self.rx.try_recv()? {
                Some(g) => self.add(g)?,
                None => break,
            }
        }
        Ok(self.ready())
    }

    /// Receive until layer `layer` has landed, up to `timeout`, and return it.
    ///
    /// # Errors
    /// The receiver's errors (`Timeout`, `PeerGone`, …); `Protocol` for a
    /// part that does not belong to this cache (another payload or shape, a
    /// layer twice, a layer out of range) or a layer out of range;
    /// `Wire(ChecksumMismatch)` for a layer whose bytes were damaged.
    pub fn wait_layer(&mut self, layer: u32, timeout: Duration) -> Result<Layer<'_>> {
        let deadline = crate::wait::from_now(timeout);
        while !self.is_ready(layer) {
            if let Some(s) = &self.shape
                && layer >= s.num_layers
            {
                return Err(TransportError::Protocol(format!(
                    "layer {layer} asked of a cache of {} layers",
                    s.num_layers
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let g = self.rx.recv(left)?;
            self.add(g)?;
        }
        self.layer(layer)
    }

    /// Layer `layer`, if it has landed.
    pub fn layer(&self, layer: u32) -> Result<Layer<'_>> {
        let part = self
            .owner
            .get(layer as usize)
            .copied()
            .flatten()
            .ok_or_else(|| TransportError::Protocol(format!("layer {layer} has not landed")))?;
        let kv = self.parts[part].message().kv()?;
        Ok(Layer {
            index: layer,
            k: kv.k(layer)?,
            v: kv.v(layer)?,
        })
    }

    /// The parts received, in arrival order (each a message of some layers).
    pub fn into_parts(self) -> Vec<RecvGuard> {
        self.parts
    }

    /// Check a part against the cache and take it.
    fn add(&mut self, g: RecvGuard) -> Result<()> {
        if g.on_device() {
            return Err(TransportError::Placement(
                "a layer-by-layer cache is assembled from host messages; this part is in \
                 device memory"
                    .into(),
            ));
        }
        let m = g.message();
        let desc = match m.payload() {
            Payload::KvCache(d) => d,
            other => {
                return Err(TransportError::Protocol(format!(
                    "expected a part of a KV cache, got a {} message",
                    other.kind_name()
                )));
            }
        };
        let whole = desc.with_layers(LayerRange::new(0, desc.num_layers));
        match &self.shape {
            None => {
                self.shape = Some(whole);
                self.owner = vec![None; desc.num_layers as usize];
            }
            Some(s) if *s != whole => {
                return Err(TransportError::Protocol(format!(
                    "a part of shape {whole:?} for a cache of shape {s:?}"
                )));
            }
            Some(_) => {}
        }
        let r = desc.layers;
        if r.is_empty() || r.end > desc.num_layers {
            return Err(TransportError::Protocol(format!(
                "a part with layers {}..{} of a {}-layer cache",
                r.start, r.end, desc.num_layers
            )));
        }
        if let Some(l) = (r.start..r.end).find(|&l| self.is_ready(l)) {
            return Err(TransportError::Protocol(format!("layer {l} arrived twice")));
        }
        let kv = m.kv()?;
        for l in r.start..r.end {
            kv.verify_layer(l)?;
        }
        let part = self.parts.len();
        for l in r.start..r.end {
            self.owner[l as usize] = Some(part);
        }
        self.parts.push(g);
        Ok(())
    }
}
