//! What a message carries: a KV cache, hidden states or text, and the sections each implies.

use crate::dtype::{DType, KvLayout};
use crate::error::{Result, WireError};

/// A half-open range of model layers `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LayerRange {
    /// First layer carried.
    pub start: u32,
    /// One past the last layer carried.
    pub end: u32,
}

impl LayerRange {
    /// Layers `start..end`.
    pub const fn new(start: u32, end: u32) -> Self {
        LayerRange { start, end }
    }

    /// Number of layers in the range.
    pub const fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no layer.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `layer` lies in the range.
    pub const fn contains(&self, layer: u32) -> bool {
        layer >= self.start && layer < self.end
    }
}

/// Shape of a KV cache (all of it or a range of its layers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct KvCacheDesc {
    /// Layers of the model that produced the cache.
    pub num_layers: u32,
    /// Key/value heads per layer.
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Cached positions.
    pub seq_len: u64,
    /// Element type of K and V.
    pub dtype: DType,
    /// Axis order of each layer's K and V.
    pub layout: KvLayout,
    /// The layers this message carries.
    pub layers: LayerRange,
}

impl KvCacheDesc {
    /// A cache of every layer of a model.
    pub const fn new(
        num_layers: u32,
        num_kv_heads: u32,
        head_dim: u32,
        seq_len: u64,
        dtype: DType,
        layout: KvLayout,
    ) -> Self {
        KvCacheDesc {
            num_layers,
            num_kv_heads,
            head_dim,
            seq_len,
            dtype,
            layout,
            layers: LayerRange::new(0, num_layers),
        }
    }

    /// The same cache restricted to `layers`.
    pub const fn with_layers(mut self, layers: LayerRange) -> Self {
        self.layers = layers;
        self
    }

    /// Elements in one layer's K (or V).
    pub fn elements_per_tensor(&self) -> Result<u64> {
        (self.num_kv_heads as u64)
            .checked_mul(self.seq_len)
            .and_then(|n| n.checked_mul(self.head_dim as u64))
            .ok_or(WireError::SizeOverflow("KV elements per layer"))
    }

    /// Bytes in one layer's K (or V).
    pub fn tensor_bytes(&self) -> Result<u64> {
        self.elements_per_tensor()?
            .checked_mul(self.dtype.size() as u64)
            .ok_or(WireError::SizeOverflow("KV bytes per layer"))
    }

    /// Bytes of one per-channel scale section (i8 only): one f32 per (head, channel).
    pub fn scale_bytes(&self) -> u64 {
        self.num_kv_heads as u64 * self.head_dim as u64 * 4
    }

    /// Check the description is self-consistent.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(WireError::InvalidField { field, reason });
        if self.num_layers == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return bad(
                "kv shape",
                format!(
                    "num_layers, num_kv_heads and head_dim must be > 0, found {}, {}, {}",
                    self.num_layers, self.num_kv_heads, self.head_dim
                ),
            );
        }
        if self.layers.start >= self.layers.end || self.layers.end > self.num_layers {
            return bad(
                "layer_range",
                format!(
                    "expected a non-empty range within 0..{}, found {}..{}",
                    self.num_layers, self.layers.start, self.layers.end
                ),
            );
        }
        self.tensor_bytes().map(|_| ())
    }
}

/// Shape of a block of hidden states (one row per position).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct HiddenStateDesc {
    /// Rows (positions).
    pub rows: u64,
    /// Elements per row (the model's hidden size).
    pub dim: u64,
    /// Element type.
    pub dtype: DType,
    /// Cross-model projection map id; empty for same-model transfers.
    pub map_id: String,
}

impl HiddenStateDesc {
    /// Bytes of the data section.
    pub fn data_bytes(&self) -> Result<u64> {
        self.rows
            .checked_mul(self.dim)
            .and_then(|n| n.checked_mul(self.dtype.size() as u64))
            .ok_or(WireError::SizeOverflow("hidden-state bytes"))
    }

    /// Check the description is self-consistent.
    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 {
            return Err(WireError::InvalidField {
                field: "hidden dim",
                reason: "must be > 0, found 0".into(),
            });
        }
        self.data_bytes()?;
        self.dim
            .checked_mul(4)
            .ok_or(WireError::SizeOverflow("hidden-state scales"))?;
        Ok(())
    }
}

/// How a text payload is to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum TextFormat {
    /// A JSON document (the JSON fallback mode).
    Json = 0,
    /// Plain UTF-8 text.
    Plain = 1,
}

impl TextFormat {
    /// The format of a wire code, if it is one.
    pub const fn from_code(code: u8) -> Option<TextFormat> {
        match code {
            0 => Some(TextFormat::Json),
            1 => Some(TextFormat::Plain),
            _ => None,
        }
    }

    /// Lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            TextFormat::Json => "json",
            TextFormat::Plain => "plain",
        }
    }
}

/// A text payload (the JSON fallback when no latent path exists).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TextDesc {
    /// How to read the bytes.
    pub format: TextFormat,
    /// Length of the UTF-8 text in bytes.
    pub len: u64,
}

/// What a message carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Payload {
    /// Per-layer K and V tensors.
    KvCache(KvCacheDesc),
    /// Rows of hidden states (same-model or projected cross-model).
    HiddenState(HiddenStateDesc),
    /// UTF-8 text.
    Text(TextDesc),
}

impl Payload {
    /// Name of the payload kind ("kv_cache", "hidden_state", "text").
    pub fn kind_name(&self) -> &'static str {
        match self {
            Payload::KvCache(_) => "kv_cache",
            Payload::HiddenState(_) => "hidden_state",
            Payload::Text(_) => "text",
        }
    }

    /// Check the description is self-consistent.
    pub fn validate(&self) -> Result<()> {
        match self {
            Payload::KvCache(kv) => kv.validate(),
            Payload::HiddenState(h) => h.validate(),
            Payload::Text(_) => Ok(()),
        }
    }

    /// Number of sections this payload implies.
    pub fn section_count(&self) -> usize {
        match self {
            Payload::KvCache(kv) => {
                let per_layer = if kv.dtype == DType::I8 { 4 } else { 2 };
                kv.layers.len() as usize * per_layer
            }
            Payload::HiddenState(h) => {
                if h.dtype == DType::I8 {
                    2
                } else {
                    1
                }
            }
            Payload::Text(_) => 1,
        }
    }

    /// Role, layer and length of section `index` (which must be `< section_count()`).
    ///
    /// KV caches list `K(l), V(l)` for every carried layer in order, then for i8
    /// `Kscale(l), Vscale(l)` for every layer. Hidden states have one data section,
    /// then an i8 scale section. Text has one section.
    pub fn section_spec(&self, index: usize) -> Result<(SectionRole, u32, u64)> {
        Ok(self.plan()?.at(index))
    }

    /// The section plan: everything needed to list sections without re-checking sizes.
    pub(crate) fn plan(&self) -> Result<SectionPlan> {
        Ok(match self {
            Payload::KvCache(kv) => SectionPlan {
                kind: PlanKind::Kv,
                data_len: kv.tensor_bytes()?,
                scale_len: kv.scale_bytes(),
                first_layer: kv.layers.start,
                data_count: kv.layers.len() as usize * 2,
            },
            Payload::HiddenState(h) => SectionPlan {
                kind: PlanKind::Hidden,
                data_len: h.data_bytes()?,
                scale_len: h
                    .dim
                    .checked_mul(4)
                    .ok_or(WireError::SizeOverflow("hidden-state scales"))?,
                first_layer: 0,
                data_count: 1,
            },
            Payload::Text(t) => SectionPlan {
                kind: PlanKind::Text,
                data_len: t.len,
                scale_len: 0,
                first_layer: 0,
                data_count: 1,
            },
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PlanKind {
    Kv,
    Hidden,
    Text,
}

/// Sizes of a payload's sections, computed (and overflow-checked) once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SectionPlan {
    kind: PlanKind,
    data_len: u64,
    scale_len: u64,
    first_layer: u32,
    data_count: usize,
}

impl SectionPlan {
    /// Role, layer and length of section `index`.
    #[inline]
    pub(crate) fn at(&self, index: usize) -> (SectionRole, u32, u64) {
        let scale = index >= self.data_count;
        match self.kind {
            PlanKind::Kv => {
                let i = if scale {
                    index - self.data_count
                } else {
                    index
                };
                let layer = self.first_layer + (i / 2) as u32;
                let (role, len) = match (scale, i % 2) {
                    (false, 0) => (SectionRole::Key, self.data_len),
                    (false, _) => (SectionRole::Value, self.data_len),
                    (true, 0) => (SectionRole::KeyScale, self.scale_len),
                    (true, _) => (SectionRole::ValueScale, self.scale_len),
                };
                (role, layer, len)
            }
            PlanKind::Hidden if scale => (SectionRole::HiddenScale, 0, self.scale_len),
            PlanKind::Hidden => (SectionRole::Hidden, 0, self.data_len),
            PlanKind::Text => (SectionRole::Text, 0, self.data_len),
        }
    }

    /// The longest section's length.
    pub(crate) fn longest(&self) -> u64 {
        self.data_len.max(self.scale_len)
    }

    /// Call `f(index, role, layer, len)` for sections `0..count` in order: what
    /// [`at`](Self::at) gives for each, in one pass with no per-section dispatch
    /// (a KV cache is walked a layer, that is a `K`/`V` pair, at a time).
    #[inline(always)]
    pub(crate) fn each(&self, count: usize, mut f: impl FnMut(usize, SectionRole, u32, u64)) {
        if self.kind != PlanKind::Kv {
            for index in 0..count {
                let (role, layer, len) = self.at(index);
                f(index, role, layer, len);
            }
            return;
        }
        let data = self.data_count.min(count);
        let runs = [
            (0, data, SectionRole::Key, SectionRole::Value, self.data_len),
            (
                data,
                count,
                SectionRole::KeyScale,
                SectionRole::ValueScale,
                self.scale_len,
            ),
        ];
        for (start, end, first, second, len) in runs {
            let (mut index, mut layer) = (start, self.first_layer);
            while index + 1 < end {
                f(index, first, layer, len);
                f(index + 1, second, layer, len);
                index += 2;
                layer = layer.wrapping_add(1);
            }
            if index < end {
                f(index, first, layer, len);
            }
        }
    }
}

/// What a section holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum SectionRole {
    /// One layer's K tensor.
    Key = 0,
    /// One layer's V tensor.
    Value = 1,
    /// Per-channel f32 scales of an i8 K tensor.
    KeyScale = 2,
    /// Per-channel f32 scales of an i8 V tensor.
    ValueScale = 3,
    /// Hidden-state rows.
    Hidden = 4,
    /// Per-column f32 scales of i8 hidden states.
    HiddenScale = 5,
    /// UTF-8 text.
    Text = 6,
}

impl SectionRole {
    /// The role of a wire code, if it is one.
    pub const fn from_code(code: u8) -> Option<SectionRole> {
        Some(match code {
            0 => SectionRole::Key,
            1 => SectionRole::Value,
            2 => SectionRole::KeyScale,
            3 => SectionRole::ValueScale,
            4 => SectionRole::Hidden,
            5 => SectionRole::HiddenScale,
            6 => SectionRole::Text,
            _ => return None,
        })
    }

    /// Short readable name, with the layer for per-layer roles ("K layer 3").
    pub fn describe(self, layer: u32) -> String {
        match self {
            SectionRole::Key => format!("K layer {layer}"),
            SectionRole::Value => format!("V layer {layer}"),
            SectionRole::KeyScale => format!("K scales layer {layer}"),
            SectionRole::ValueScale => format!("V scales layer {layer}"),
            SectionRole::Hidden => "hidden states".into(),
            SectionRole::HiddenScale => "hidden-state scales".into(),
            SectionRole::Text => "text".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_lists_what_at_gives_for_every_section() {
        let hidden = |dtype| HiddenStateDesc {
            rows: 3,
            dim: 5,
            dtype,
            map_id: String::new(),
        };
        let payloads = [
            Payload::KvCache(KvCacheDesc::new(4, 2, 8, 3, DType::F16, KvLayout::Hnd)),
            Payload::KvCache(
                KvCacheDesc::new(6, 2, 8, 3, DType::I8, KvLayout::Nhd)
                    .with_layers(LayerRange::new(2, 5)),
            ),
            Payload::HiddenState(hidden(DType::F32)),
            Payload::HiddenState(hidden(DType::I8)),
            Payload::Text(TextDesc {
                format: TextFormat::Json,
                len: 7,
            }),
        ];
        for payload in payloads {
            let plan = payload.plan().unwrap();
            let count = payload.section_count();
            // Also a count cut short, as a header with too few sections has.
            for n in [count, count.saturating_sub(1)] {
                let mut listed = Vec::new();
                plan.each(n, |i, role, layer, len| listed.push((i, role, layer, len)));
                let expected: Vec<_> = (0..n)
                    .map(|i| {
                        let (role, layer, len) = plan.at(i);
                        (i, role, layer, len)
                    })
                    .collect();
                assert_eq!(listed, expected, "{payload:?}, {n} sections");
            }
        }
    }
}
