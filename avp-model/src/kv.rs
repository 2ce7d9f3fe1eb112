//! [`KvCache`]: the attention state of a sequence, per layer K and V
//! `[1, kv_heads, seq, head_dim]` (HND, as avp moves it), on the engine of the
//! model that made it; and how its bytes meet a message:
//!
//! - through host memory: [`KvCache::write_into`] a message writer, and
//!   [`crate::Context::from_message`] back;
//! - in place: [`KvCache::sections`] says where each K and V is (device
//!   memory for a GPU model), and [`crate::Model::kv_from_sections`] builds a
//!   cache whose tensors a transport fills where they live. A GPU model's KV
//!   then goes device to device and never crosses to the host.

use std::any::Any;

use avp_wire::{DType as WireDType, KvCacheDesc, KvLayout};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::config::ModelConfig;
use crate::device::Device;
#[cfg(feature = "cuda")]
use crate::engine::Gpu;
use crate::engine::{Cpu, Engine};
use crate::error::{ModelError, Result};

/// A KV cache on one engine `B`: per layer `(K, V)`, each `[1, kv_heads, seq, head_dim]`.
#[derive(Clone, Debug)]
pub struct Cache<B: Backend> {
    pub(crate) layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> Default for Cache<B> {
    fn default() -> Self {
        Cache { layers: Vec::new() }
    }
}

impl<B: Backend> Cache<B> {
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep only the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        for (k, v) in &mut self.layers {
            let [b, h, s, d] = k.dims();
            if len < s {
                *k = k.clone().slice([0..b, 0..h, 0..len, 0..d]);
                *v = v.clone().slice([0..b, 0..h, 0..len, 0..d]);
            }
        }
    }

    /// The cache's shape as avp-wire describes it: f32, HND, every layer
    /// (`None` when empty).
    pub fn desc(&self) -> Option<KvCacheDesc> {
        let (k, _) = self.layers.first()?;
        let [_, kv_heads, seq, head_dim] = k.dims();
        Some(KvCacheDesc::new(
            self.layers.len() as u32,
            kv_heads as u32,
            head_dim as u32,
            seq as u64,
            WireDType::F32,
            KvLayout::Hnd,
        ))
    }

    /// The tensors in message section order: K₀, V₀, K₁, V₁, ...
    fn tensors(&self) -> impl Iterator<Item = &Tensor<B, 4>> {
        self.layers.iter().flat_map(|(k, v)| [k, v])
    }

    /// Each K and V into its section of `writer`, one tensor read to the host
    /// at a time, in the wire dtype `writer`'s layout gives (f32 copied,
    /// f16 and bf16 converted in the same pass).
    fn write_into(&self, writer: &mut avp_wire::MessageWriter<'_>) -> Result<()> {
        let dtype = match writer.layout().payload() {
            avp_wire::Payload::KvCache(d) => d.dtype,
            other => {
                return Err(ModelError::Invalid(format!(
                    "a KV cache written into a {} message",
                    other.kind_name()
                )));
            }
        };
        for (i, t) in self.tensors().enumerate() {
            let data = t.clone().into_data();
            match dtype {
                WireDType::F32 => writer.write_section(i, data.as_bytes())?,
                _ => {
                    let src = data.as_slice::<f32>().map_err(|e| {
                        ModelError::Invalid(format!("KV tensor {i} is not f32: {e:?}"))
                    })?;
                    encode_floats(src, dtype, writer.section_mut(i)?)?;
                }
            }
        }
        Ok(())
    }

    /// This cache on `device` (a copy only where a tensor lives elsewhere:
    /// burn-flex's `to_device` copies even onto its own device).
    pub(crate) fn placed(&self, device: &B::Device) -> Cache<B> {
        let on = |t: &Tensor<B, 4>| match t.device() == *device {
            true => t.clone(),
            false => t.clone().to_device(device),
        };
        Cache {
            layers: self.layers.iter().map(|(k, v)| (on(k), on(v))).collect(),
        }
    }

    /// Per layer (K, V) as host data.
    fn host_data(&self) -> Vec<(TensorData, TensorData)> {
        self.layers
            .iter()
            .map(|(k, v)| (k.clone().into_data(), v.clone().into_data()))
            .collect()
    }

    /// A cache read from host bytes of any wire dtype and layout:
    /// `section(i)` is section `i` of a message described by `desc`.
    pub(crate) fn from_host<'s>(
        desc: &KvCacheDesc,
        config: &ModelConfig,
        device: &B::Device,
        mut section: impl FnMut(usize) -> Result<&'s [u8]>,
    ) -> Result<Cache<B>> {
        let shape = fits(desc, config)?;
        let layers = (0..desc.num_layers as usize)
            .map(|l| {
                let k = host_tensor(section(2 * l)?, desc, shape, device)?;
                let v = host_tensor(section(2 * l + 1)?, desc, shape, device)?;
                Ok((k, v))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Cache { layers })
    }
}

impl<B: Engine> Cache<B> {
    /// A cache whose sections `fill` writes: in place into the new tensors
    /// for f32 HND (what avp sends) when `to` is [`FillTo::Model`], through a
    /// host buffer otherwise (and converted).
    pub(crate) fn from_fill(
        desc: &KvCacheDesc,
        config: &ModelConfig,
        device: &B::Device,
        to: FillTo,
        fill: &mut dyn FnMut(usize, KvTarget<'_>) -> Result<()>,
    ) -> Result<Cache<B>> {
        let shape = fits(desc, config)?;
        let count = 2 * desc.num_layers as usize;
        let in_place =
            to == FillTo::Model && desc.dtype == WireDType::F32 && desc.layout == KvLayout::Hnd;
        if !in_place {
            let len = shape.iter().product::<usize>() * desc.dtype.size();
            let mut staged = Vec::with_capacity(count);
            for i in 0..count {
                let mut buf = vec![0u8; len];
                fill(i, KvTarget::Host(&mut buf))?;
                staged.push(buf);
            }
            return Self::from_host(desc, config, device, |i| Ok(&staged[i][..]));
        }
        let mut tensors = B::filled(count, shape, device, fill)?.into_iter();
        let mut layers = Vec::with_capacity(count / 2);
        while let (Some(k), Some(v)) = (tensors.next(), tensors.next()) {
            layers.push((k, v));
        }
        Ok(Cache { layers })
    }

    /// The device the tensors are on (`None` when empty).
    fn device(&self) -> Option<Device> {
        let (k, _) = self.layers.first()?;
        Some(B::device_of(&k.device()))
    }
}

/// Which targets a fill may be given ([`crate::Model::kv_from_sections`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillTo {
    /// The model's own tensors where they live: device memory for a model on a
    /// GPU, which the filling transport must be able to write.
    Model,
    /// Host memory only (the transport cannot reach the model's device): the
    /// model uploads the bytes itself.
    Host,
}

/// `[1, kv_heads, seq, head_dim]` when `desc` is a whole KV cache of a model
/// with `config`, else an error naming both shapes.
fn fits(d: &KvCacheDesc, c: &ModelConfig) -> Result<[usize; 4]> {
    if d.layers.start != 0
        || d.num_layers != c.layers
        || d.num_kv_heads != c.kv_heads
        || d.head_dim != c.head_dim
    {
        return Err(ModelError::Invalid(format!(
            "KV cache of {} layers x {} heads x {} does not fit this model ({} x {} x {})",
            d.num_layers, d.num_kv_heads, d.head_dim, c.layers, c.kv_heads, c.head_dim
        )));
    }
    Ok([
        1,
        d.num_kv_heads as usize,
        d.seq_len as usize,
        d.head_dim as usize,
    ])
}

fn host_tensor<B: Backend>(
    bytes: &[u8],
    desc: &KvCacheDesc,
    [_, h, s, hd]: [usize; 4],
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let values = decode_floats(bytes, desc.dtype)?;
    Ok(match desc.layout {
        KvLayout::Hnd => Tensor::from_data(TensorData::new(values, [1, h, s, hd]), device),
        KvLayout::Nhd => Tensor::<B, 4>::from_data(TensorData::new(values, [1, s, h, hd]), device)
            .swap_dims(1, 2),
    })
}

/// `src` as little-endian `dtype` values into `dst` (exactly its size), in one pass.
pub(crate) fn encode_floats(src: &[f32], dtype: WireDType, dst: &mut [u8]) -> Result<()> {
    if dst.len() != src.len() * dtype.size() {
        return Err(ModelError::Invalid(format!(
            "{} values as {dtype:?} need {} bytes, the section has {}",
            src.len(),
            src.len() * dtype.size(),
            dst.len()
        )));
    }
    match dtype {
        WireDType::F32 => {
            for (d, &x) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        WireDType::F16 => {
            for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::f16::from_f32(x).to_le_bytes());
            }
        }
        WireDType::Bf16 => {
            for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes());
            }
        }
        WireDType::I8 => {
            return Err(ModelError::Invalid(
                "int8 KV on the wire is not supported yet (f32, f16, bf16 are)".into(),
            ));
        }
    }
    Ok(())
}

/// Little-endian f32, f16 or bf16 values as f32.
pub(crate) fn decode_floats(bytes: &[u8], dtype: WireDType) -> Result<Vec<f32>> {
    Ok(match dtype {
        WireDType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        WireDType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        WireDType::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        WireDType::I8 => {
            return Err(ModelError::Invalid(
                "int8 tensors are not supported yet (f32, f16, bf16 are)".into(),
            ));
        }
    })
}

/// Where one section of a KV cache is, for a transport to copy from
/// ([`KvCache::sections`]).
pub struct KvSection(Place);

enum Place {
    Host(TensorData),
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device {
        addr: u64,
        len: usize,
        /// Holds the device memory until the section drops.
        _keep: Box<dyn Any + Send>,
    },
}

impl KvSection {
    pub(crate) fn in_host(data: TensorData) -> KvSection {
        KvSection(Place::Host(data))
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn in_device(addr: u64, len: usize, keep: Box<dyn Any + Send>) -> KvSection {
        KvSection(Place::Device {
            addr,
            len,
            _keep: keep,
        })
    }

    /// The bytes, when they are in host memory (a CPU model).
    pub fn host(&self) -> Option<&[u8]> {
        match &self.0 {
            Place::Host(d) => Some(d.as_bytes()),
            Place::Device { .. } => None,
        }
    }

    /// The device address and length, when the bytes are in GPU memory (a
    /// GPU model). The memory is finished being written and stays valid, and
    /// unwritten, while this section lives.
    pub fn device(&self) -> Option<(u64, usize)> {
        match &self.0 {
            Place::Device { addr, len, .. } => Some((*addr, *len)),
            Place::Host(_) => None,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match &self.0 {
            Place::Host(d) => d.as_bytes().len(),
            Place::Device { len, .. } => *len,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for KvSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Place::Host(d) => write!(f, "KvSection::Host({} bytes)", d.as_bytes().len()),
            Place::Device { addr, len, .. } => {
                write!(f, "KvSection::Device({len} bytes at {addr:#x})")
            }
        }
    }
}

/// Where a section of a KV cache being built goes, for a transport to copy
/// into ([`crate::Model::kv_from_sections`]).
#[derive(Debug)]
pub enum KvTarget<'a> {
    /// Host memory of exactly the section's length.
    Host(&'a mut [u8]),
    /// Device memory of the model's GPU, `len` bytes at `addr`, unused by
    /// anyone else until the fill returns; the copy must be finished then.
    Device {
        /// Device address.
        addr: u64,
        /// Length in bytes.
        len: usize,
    },
}

/// The attention state of a sequence, on the engine of the model that made
/// it. Cloning shares the tensors (burn tensors are reference-counted).
#[derive(Clone, Default, Debug)]
pub struct KvCache {
    kv: Kv,
}

#[derive(Clone, Default, Debug)]
enum Kv {
    #[default]
    Empty,
    Cpu(Cache<Cpu>),
    #[cfg(feature = "cuda")]
    Gpu(Cache<Gpu>),
}

/// `$body` with `$c` bound to the engine's cache, `$empty` for an empty one.
macro_rules! each {
    ($kv:expr, $c:ident => $body:expr, $empty:expr) => {
        match $kv {
            Kv::Empty => $empty,
            Kv::Cpu($c) => $body,
            #[cfg(feature = "cuda")]
            Kv::Gpu($c) => $body,
        }
    };
}

impl KvCache {
    pub(crate) fn cpu(cache: Cache<Cpu>) -> KvCache {
        KvCache { kv: Kv::Cpu(cache) }
    }

    pub(crate) fn as_cpu(&self) -> Option<&Cache<Cpu>> {
        match &self.kv {
            Kv::Cpu(c) => Some(c),
            _ => None,
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn gpu(cache: Cache<Gpu>) -> KvCache {
        KvCache { kv: Kv::Gpu(cache) }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn as_gpu(&self) -> Option<&Cache<Gpu>> {
        match &self.kv {
            Kv::Gpu(c) => Some(c),
            _ => None,
        }
    }

    /// The cache's shape as avp-wire describes it: f32, HND, every layer
    /// (`None` when empty).
    pub fn desc(&self) -> Option<KvCacheDesc> {
        each!(&self.kv, c => c.desc(), None)
    }

    /// [`Self::desc`] with the wire dtype `dtype` (f32, f16 or bf16).
    pub fn desc_as(&self, dtype: WireDType) -> Option<KvCacheDesc> {
        self.desc().map(|d| KvCacheDesc { dtype, ..d })
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        each!(&self.kv, c => c.len(), 0)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep only the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        each!(&mut self.kv, c => c.truncate(len), ())
    }

    /// The device the tensors are on (`None` when empty).
    pub fn device(&self) -> Option<Device> {
        each!(&self.kv, c => c.device(), None)
    }

    /// Whether the tensors are in GPU memory.
    pub fn on_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Kv::Gpu(_) = self.kv {
            return true;
        }
        false
    }

    /// Write every layer's K and V into the sections of a message laid out for
    /// [`Self::desc`] or [`Self::desc_as`], through host memory (copied or
    /// converted once; a GPU cache is read back from the device).
    pub fn write_into(&self, writer: &mut avp_wire::MessageWriter<'_>) -> Result<()> {
        each!(&self.kv, c => c.write_into(writer), Ok(()))
    }

    /// Where each section of [`Self::desc`]'s message is (K₀, V₀, K₁, ...), for
    /// a transport to copy from: device memory for a GPU model (copied into
    /// contiguous form on the GPU where needed, its producing work finished),
    /// host bytes for a CPU one. Keep the sections until the copies finish.
    pub fn sections(&self) -> Result<Vec<KvSection>> {
        each!(&self.kv, c => section_list(c), Ok(Vec::new()))
    }

    /// This cache on engine `B`'s `device`: shared where it is already there,
    /// else moved (through host memory between engines).
    pub(crate) fn on<B: Engine>(&self, device: &B::Device) -> Cache<B> {
        if let Some(c) = B::unwrap(self) {
            return c.placed(device);
        }
        let data = each!(&self.kv, c => c.host_data(), Vec::new());
        let t = |d: TensorData| Tensor::<B, 4>::from_data(d, device);
        Cache {
            layers: data.into_iter().map(|(k, v)| (t(k), t(v))).collect(),
        }
    }
}

fn section_list<B: Engine>(c: &Cache<B>) -> Result<Vec<KvSection>> {
    B::sections(&c.tensors().collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_round_trip_through_every_wire_dtype() {
        let src = [0.0f32, 1.5, -2.25, 65504.0, 1e-3, -0.0];
        for dtype in [WireDType::F32, WireDType::F16, WireDType::Bf16] {
            let mut bytes = vec![0u8; src.len() * dtype.size()];
            encode_floats(&src, dtype, &mut bytes).unwrap();
            let back = decode_floats(&bytes, dtype).unwrap();
            for (a, b) in src.iter().zip(&back) {
                let tol = if dtype == WireDType::F32 {
                    0.0
                } else {
                    a.abs() / 128.0
                };
                assert!((a - b).abs() <= tol, "{dtype:?}: {a} became {b}");
            }
        }
        let mut short = vec![0u8; 3];
        assert!(encode_floats(&src, WireDType::F16, &mut short).is_err());
        assert!(encode_floats(&src, WireDType::I8, &mut [0u8; 6]).is_err());
    }

    fn cache(seq: usize) -> Cache<Cpu> {
        let d = Default::default();
        let t = |x: f32| {
            Tensor::<Cpu, 4>::from_data(
                TensorData::new(
                    (0..2 * seq * 4).map(|i| x + i as f32).collect::<Vec<f32>>(),
                    [1, 2, seq, 4],
                ),
                &d,
            )
        };
        Cache {
            layers: vec![(t(0.0), t(100.0)), (t(200.0), t(300.0))],
        }
    }

    #[test]
    fn sections_are_host_bytes_in_message_order() {
        let kv = KvCache::cpu(cache(3));
        let sections = kv.sections().unwrap();
        assert_eq!(sections.len(), 4);
        for (i, s) in sections.iter().enumerate() {
            let bytes = s.host().unwrap();
            assert_eq!(bytes.len(), 2 * 3 * 4 * 4);
            assert_eq!(s.device(), None);
            let first = f32::from_le_bytes(bytes[..4].try_into().unwrap());
            assert_eq!(first, 100.0 * i as f32);
        }
        assert!(KvCache::default().sections().unwrap().is_empty());
    }

    #[test]
    fn a_cache_fills_back_from_its_sections_in_place_or_through_the_host() {
        use crate::ModelConfig;
        let kv = KvCache::cpu(cache(3));
        let desc = kv.desc().unwrap();
        let sections = kv.sections().unwrap();
        let config = ModelConfig {
            family: "llama".into(),
            vocab_size: 16,
            hidden: 8,
            intermediate: 16,
            layers: 2,
            heads: 2,
            kv_heads: 2,
            head_dim: 4,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            context_length: 64,
            tied_embeddings: true,
            qkv_bias: false,
        };
        for to in [FillTo::Model, FillTo::Host] {
            let mut fill = |i: usize, target: KvTarget<'_>| match target {
                KvTarget::Host(buf) => {
                    buf.copy_from_slice(sections[i].host().unwrap());
                    Ok(())
                }
                KvTarget::Device { .. } => panic!("a CPU cache is filled in host memory"),
            };
            let back = Cache::<Cpu>::from_fill(&desc, &config, &Default::default(), to, &mut fill)
                .unwrap();
            assert_eq!(back.host_data(), cache(3).host_data(), "{to:?}");
        }
        // A cache that does not fit the model is refused before any copy.
        let small = ModelConfig {
            layers: 1,
            ..config
        };
        let mut never = |_: usize, _: KvTarget<'_>| -> Result<()> { panic!("no copy") };
        let err = Cache::<Cpu>::from_fill(
            &desc,
            &small,
            &Default::default(),
            FillTo::Model,
            &mut never,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not fit"), "{err}");
    }

    #[test]
    fn truncate_and_len_see_through_the_engine() {
        let mut kv = KvCache::cpu(cache(5));
        assert_eq!(kv.len(), 5);
        kv.truncate(2);
        assert_eq!(kv.len(), 2);
        assert_eq!(kv.desc().unwrap().seq_len, 2);
        assert!(!kv.on_gpu());
        assert!(KvCache::default().is_empty());
    }
}
