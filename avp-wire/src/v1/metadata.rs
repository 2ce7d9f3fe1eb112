//! The v1 protobuf `avp.Metadata` message, annotated by hand (no protoc at build time).

use std::collections::BTreeMap;

/// What the tensor bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PayloadType {
    /// Raw little-endian hidden-state (or embedding) tensor.
    HiddenState = 0,
    /// A KV cache: 17-byte KV header then `[K_l0][V_l0][K_l1]...`.
    KvCache = 1,
}

/// Element type of the tensor bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DataType {
    /// f32.
    Float32 = 0,
    /// f16.
    Float16 = 1,
    /// bf16.
    Bfloat16 = 2,
    /// i8.
    Int8 = 3,
}

/// How the agents communicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CommunicationMode {
    /// Latent (hidden states or KV caches).
    Latent = 0,
    /// JSON text.
    JsonMode = 1,
}

/// `avp.Metadata` (proto3), field numbers as in the reference's `avp.proto`.
///
/// Enum fields hold raw `i32`s so unknown values survive decoding and can be
/// reported; [`super::decode`] refuses them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    /// Session id.
    #[prost(string, tag = "1")]
    pub session_id: String,
    /// Sending agent.
    #[prost(string, tag = "2")]
    pub source_agent_id: String,
    /// Receiving agent.
    #[prost(string, tag = "3")]
    pub target_agent_id: String,
    /// Model id.
    #[prost(string, tag = "4")]
    pub model_id: String,
    /// Hidden size.
    #[prost(uint32, tag = "5")]
    pub hidden_dim: u32,
    /// Layers.
    #[prost(uint32, tag = "6")]
    pub num_layers: u32,
    /// [`PayloadType`] value.
    #[prost(enumeration = "PayloadType", tag = "7")]
    pub payload_type: i32,
    /// [`DataType`] value.
    #[prost(enumeration = "DataType", tag = "8")]
    pub dtype: i32,
    /// Tensor shape (packed on encode; packed or not on decode).
    #[prost(uint32, repeated, tag = "9")]
    pub tensor_shape: Vec<u32>,
    /// [`CommunicationMode`] value.
    #[prost(enumeration = "CommunicationMode", tag = "10")]
    pub mode: i32,
    /// `"zstd"` when compressed (informational: the header flag decides).
    #[prost(string, optional, tag = "11")]
    pub compression: Option<String>,
    /// Cross-model map id; empty for same-model.
    #[prost(string, tag = "13")]
    pub avp_map_id: String,
    /// Free key/value pairs.
    #[prost(btree_map = "string, string", tag = "14")]
    pub extra: BTreeMap<String, String>,
    /// CRC32 of the uncompressed tensor bytes.
    #[prost(uint32, optional, tag = "15")]
    pub payload_checksum: Option<u32>,
}
