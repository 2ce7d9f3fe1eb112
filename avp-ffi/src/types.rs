//! Plain C structs and enums, and their conversions.

use std::ffi::{CStr, c_char};
use std::time::Duration;

use avp_transport::{Options, ShmOptions, TcpOptions};
use avp_wire::{
    DType, Envelope, HiddenStateDesc, KvCacheDesc, KvLayout, LayerRange, ModelIdentity, Payload,
    TextDesc, TextFormat,
};

use crate::status::Error;

/// Element type.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum avp_dtype {
    /// float32.
    AVP_DTYPE_F32 = 0,
    /// float16.
    AVP_DTYPE_F16 = 1,
    /// bfloat16.
    AVP_DTYPE_BF16 = 2,
    /// int8 with per-channel float32 scales.
    AVP_DTYPE_I8 = 3,
}

/// Axis order of one layer's K or V.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum avp_layout {
    /// [heads, seq, head_dim] (Hugging Face).
    AVP_LAYOUT_HND = 0,
    /// [seq, heads, head_dim] (vLLM, flash-attention).
    AVP_LAYOUT_NHD = 1,
}

/// What a message carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum avp_kind {
    /// Per-layer K and V.
    AVP_KIND_KV_CACHE = 0,
    /// Rows of hidden states.
    AVP_KIND_HIDDEN_STATE = 1,
    /// UTF-8 text (JSON fallback).
    AVP_KIND_TEXT = 2,
}

/// Which tensor of a layer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum avp_kv_part {
    /// Keys.
    AVP_KV_K = 0,
    /// Values.
    AVP_KV_V = 1,
    /// Per-channel scales of int8 keys.
    AVP_KV_K_SCALES = 2,
    /// Per-channel scales of int8 values.
    AVP_KV_V_SCALES = 3,
}

/// How a text payload is read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum avp_text_format {
    /// JSON.
    AVP_TEXT_JSON = 0,
    /// Plain UTF-8.
    AVP_TEXT_PLAIN = 1,
}

/// Negotiated exchange mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum avp_mode {
    /// Same model: KV caches as they are.
    AVP_MODE_LATENT = 0,
    /// Different models with a projection path.
    AVP_MODE_CROSS_MODEL = 1,
    /// No latent path: text.
    AVP_MODE_JSON = 2,
}

/// Transport in use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum avp_transport_kind {
    /// Shared memory.
    AVP_TRANSPORT_SHM = 0,
    /// TCP.
    AVP_TRANSPORT_TCP = 1,
    /// Shared memory with sections in device memory (`cuda://`).
    AVP_TRANSPORT_CUDA = 2,
    /// RDMA writes into the receiver's registered memory (`rdma://`).
    AVP_TRANSPORT_RDMA = 3,
    /// HTTP, the Python reference's binding (`http://`).
    AVP_TRANSPORT_HTTP = 4,
}

/// Envelope string fields of a message.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum avp_envelope_field {
    /// Model id.
    AVP_FIELD_MODEL_ID = 0,
    /// Model hash.
    AVP_FIELD_MODEL_HASH = 1,
    /// Model family.
    AVP_FIELD_MODEL_FAMILY = 2,
    /// Tokenizer hash.
    AVP_FIELD_TOKENIZER_HASH = 3,
    /// Session id.
    AVP_FIELD_SESSION_ID = 4,
    /// Sending agent.
    AVP_FIELD_SOURCE_AGENT_ID = 5,
    /// Receiving agent.
    AVP_FIELD_TARGET_AGENT_ID = 6,
    /// Cross-model map id (hidden-state messages).
    AVP_FIELD_MAP_ID = 7,
}

/// A model's identity for the handshake. NULL strings mean "unknown".
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_identity {
    /// Architecture family ("llama", "qwen2").
    pub model_family: *const c_char,
    /// Model id.
    pub model_id: *const c_char,
    /// Hex SHA-256 of the architecture config.
    pub model_hash: *const c_char,
    /// Hidden size.
    pub hidden_dim: u32,
    /// Layers.
    pub num_layers: u32,
    /// KV heads.
    pub num_kv_heads: u32,
    /// Head size.
    pub head_dim: u32,
    /// Hex SHA-256 of the vocabulary.
    pub tokenizer_hash: *const c_char,
}

/// Endpoint settings. Fill with `avp_options_default` first, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_options {
    /// This agent's id (NULL: empty).
    pub agent_id: *const c_char,
    /// Largest message sent or accepted, in bytes.
    pub max_message: u64,
    /// Pre-shared token (NULL: none).
    pub token: *const c_char,
    /// Shared-memory slots (messages in flight).
    pub slots: u32,
    /// Bytes per shared-memory slot.
    pub slot_size: u64,
    /// Connect and handshake timeout, milliseconds.
    pub connect_timeout_ms: u32,
    /// How long a loan waits for a free slot, milliseconds.
    pub loan_timeout_ms: u32,
    /// Receiver spin before sleeping, microseconds; UINT32_MAX spins until the timeout.
    pub spin_us: u32,
    /// Session time to live, seconds.
    pub session_ttl_s: u32,
    /// Non-zero: a TCP connection on one host may switch to shared memory.
    pub allow_shm_upgrade: u8,
    /// The device of `cuda://` sessions: an `avp_device_kind` value
    /// (AVP_DEVICE_NONE: none).
    pub device: u32,
    /// GPU ordinal (AVP_DEVICE_CUDA), as this process numbers GPUs.
    pub device_ordinal: u32,
    /// Bytes per device slot (rounded up to the device's granularity).
    pub device_slot_size: u64,
    /// The RDMA device of `rdma://` sessions: "emulated" (the software
    /// device, for tests), "verbs" (the first verbs device) or "verbs:NAME";
    /// NULL: the first verbs device when built with the `rdma` feature, else
    /// none (the session then runs over TCP, and says why).
    pub rdma_device: *const c_char,
    /// Queue pairs an `rdma://` message is striped over (1–16).
    pub rdma_queue_pairs: u32,
}

/// Which device `cuda://` sessions keep message sections on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum avp_device_kind {
    /// No device.
    AVP_DEVICE_NONE = 0,
    /// An NVIDIA GPU (libavp built with the `cuda` feature).
    AVP_DEVICE_CUDA = 1,
    /// Host memory standing in for a device (tests, machines without a GPU):
    /// device addresses are then host addresses.
    AVP_DEVICE_EMULATED = 2,
}

/// Identity and routing fields of a message. NULL strings mean empty.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_envelope {
    /// Model id.
    pub model_id: *const c_char,
    /// Model hash.
    pub model_hash: *const c_char,
    /// Model family.
    pub model_family: *const c_char,
    /// Tokenizer hash.
    pub tokenizer_hash: *const c_char,
    /// Session id (NULL or "" lets the receiver accept it on any session).
    pub session_id: *const c_char,
    /// Sending agent.
    pub source_agent_id: *const c_char,
    /// Receiving agent.
    pub target_agent_id: *const c_char,
}

/// Shape of a KV cache (or of a range of its layers).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct avp_kv_desc {
    /// Layers of the model.
    pub num_layers: u32,
    /// KV heads per layer.
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Cached positions.
    pub seq_len: u64,
    /// Element type: an `avp_dtype` value.
    pub dtype: u32,
    /// Axis order: an `avp_layout` value.
    pub layout: u32,
    /// First layer carried.
    pub layer_start: u32,
    /// One past the last layer carried; 0 means all layers.
    pub layer_end: u32,
}

/// Shape of a block of hidden states.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_hidden_desc {
    /// Rows (positions).
    pub rows: u64,
    /// Elements per row.
    pub dim: u64,
    /// Element type: an `avp_dtype` value.
    pub dtype: u32,
    /// Cross-model map id (NULL: same model).
    pub map_id: *const c_char,
}

/// What a message to be written carries: set `kind` and the matching member.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_payload {
    /// Which member is used: an `avp_kind` value.
    pub kind: u32,
    /// For AVP_KIND_KV_CACHE.
    pub kv: avp_kv_desc,
    /// For AVP_KIND_HIDDEN_STATE.
    pub hidden: avp_hidden_desc,
    /// For AVP_KIND_TEXT: its format, an `avp_text_format` value.
    pub text_format: u32,
    /// For AVP_KIND_TEXT: its length in bytes.
    pub text_len: u64,
}

/// A summary of a parsed or received message.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_message_info {
    /// What it carries.
    pub kind: avp_kind,
    /// Whole message length.
    pub total_len: u64,
    /// Section alignment.
    pub alignment: u32,
    /// Number of sections.
    pub section_count: usize,
    /// The KV shape (kind AVP_KIND_KV_CACHE).
    pub kv: avp_kv_desc,
    /// Hidden-state rows (kind AVP_KIND_HIDDEN_STATE).
    pub hidden_rows: u64,
    /// Hidden-state row length.
    pub hidden_dim: u64,
    /// Hidden-state element type.
    pub hidden_dtype: avp_dtype,
    /// Text format (kind AVP_KIND_TEXT).
    pub text_format: avp_text_format,
    /// Text length in bytes.
    pub text_len: u64,
    /// Non-zero when the sections are in device memory (a `cuda://` session):
    /// read them with `avp_message_device_section` or the copy functions.
    pub on_device: u8,
}

/// What a handshake negotiated. Strings are NUL-terminated and truncated to fit.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_session_info {
    /// Session id (32 hex characters).
    pub session_id: [c_char; 40],
    /// Exchange mode.
    pub mode: avp_mode,
    /// Transport in use.
    pub transport: avp_transport_kind,
    /// Largest message either side accepts.
    pub max_message: u64,
    /// Cross-model map id ("" unless cross-model).
    pub map_id: [c_char; 64],
    /// Why this mode.
    pub mode_reason: [c_char; 256],
    /// Why this transport.
    pub transport_reason: [c_char; 256],
}

/// Read an optional C string.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string.
pub(crate) unsafe fn string(p: *const c_char, what: &str) -> Result<String, Error> {
    if p.is_null() {
        return Ok(String::new());
    }
    // SAFETY: per the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(str::to_owned)
        .map_err(|_| Error::arg(format!("{what} is not valid UTF-8")))
}

/// Borrow a required struct argument.
///
/// # Safety
/// `p` is NULL or points to a live `T`.
pub(crate) unsafe fn required<'a, T>(p: *const T, what: &str) -> Result<&'a T, Error> {
    // SAFETY: per the caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| Error::null(what))
}

/// Write through a required out-pointer.
///
/// # Safety
/// `p` is NULL or valid for writes of `T`.
pub(crate) unsafe fn put<T>(p: *mut T, what: &str, value: T) -> Result<(), Error> {
    if p.is_null() {
        return Err(Error::null(what));
    }
    // SAFETY: per the caller's contract.
    unsafe { p.write(value) };
    Ok(())
}

/// # Safety
/// The struct's string pointers are NULL or NUL-terminated.
pub(crate) unsafe fn identity(id: Option<&avp_identity>) -> Result<ModelIdentity, Error> {
    let Some(id) = id else {
        return Ok(ModelIdentity::default());
    };
    // SAFETY: per the caller's contract.
    unsafe {
        Ok(ModelIdentity {
            model_family: string(id.model_family, "identity.model_family")?,
            model_id: string(id.model_id, "identity.model_id")?,
            model_hash: string(id.model_hash, "identity.model_hash")?,
            hidden_dim: id.hidden_dim,
            num_layers: id.num_layers,
            num_kv_heads: id.num_kv_heads,
            head_dim: id.head_dim,
            tokenizer_hash: string(id.tokenizer_hash, "identity.tokenizer_hash")?,
        })
    }
}

/// Default options as a C struct.
pub(crate) fn default_options() -> avp_options {
    let d = Options::default();
    avp_options {
        agent_id: std::ptr::null(),
        max_message: d.max_message,
        token: std::ptr::null(),
        slots: d.shm.slots as u32,
        slot_size: d.shm.slot_size as u64,
        connect_timeout_ms: d.connect_timeout.as_millis() as u32,
        loan_timeout_ms: d.shm.loan_timeout.as_millis() as u32,
        spin_us: d.shm.spin.as_micros() as u32,
        session_ttl_s: d.session_ttl.as_secs() as u32,
        allow_shm_upgrade: d.tcp.shm_upgrade as u8,
        device: avp_device_kind::AVP_DEVICE_NONE as u32,
        device_ordinal: 0,
        device_slot_size: avp_transport::DeviceOptions::new(avp_transport::Device::Emulated)
            .slot_size as u64,
        rdma_device: std::ptr::null(),
        rdma_queue_pairs: d.rdma.queue_pairs as u32,
    }
}

/// # Safety
/// The struct's string pointers are NULL or NUL-terminated.
pub(crate) unsafe fn options(o: Option<&avp_options>) -> Result<Options, Error> {
    let o = o.copied().unwrap_or_else(default_options);
    let o_device = match o.device {
        0 => avp_device_kind::AVP_DEVICE_NONE,
        1 => avp_device_kind::AVP_DEVICE_CUDA,
        2 => avp_device_kind::AVP_DEVICE_EMULATED,
        other => {
            return Err(Error::arg(format!(
                "options.device {other} is not an avp_device_kind"
            )));
        }
    };
    let (o_ordinal, o_slot) = (o.device_ordinal, o.device_slot_size);
    if o_device != avp_device_kind::AVP_DEVICE_NONE && o_slot == 0 {
        return Err(Error::arg(
            "options.device_slot_size must be > 0 with a device",
        ));
    }
    if o.slots == 0 || o.slot_size == 0 {
        return Err(Error::arg(
            "options.slots and options.slot_size must be > 0",
        ));
    }
    // SAFETY: per the caller's contract.
    let (agent_id, token, rdma_device) = unsafe {
        (
            string(o.agent_id, "options.agent_id")?,
            string(o.token, "options.token")?,
            string(o.rdma_device, "options.rdma_device")?,
        )
    };
    let rdma_device = match rdma_device.as_str() {
        "" => None,
        name => Some(
            name.parse::<avp_transport::RdmaDevice>()
                .map_err(|e| Error::arg(format!("options.rdma_device: {e}")))?,
        ),
    };
    let mut rdma = avp_transport::RdmaOptions::default()
        .queue_pairs(o.rdma_queue_pairs as usize)
        .loan_timeout(Duration::from_millis(o.loan_timeout_ms as u64));
    rdma.device = rdma_device;
    Ok({
        let mut o = Options::default()
            .agent_id(agent_id)
            .max_message(o.max_message)
            .connect_timeout(Duration::from_millis(o.connect_timeout_ms as u64))
            .session_ttl(Duration::from_secs(o.session_ttl_s as u64))
            .shm(
                ShmOptions::default()
                    .slots(o.slots as usize)
                    .slot_size(o.slot_size as usize)
                    .loan_timeout(Duration::from_millis(o.loan_timeout_ms as u64))
                    .spin(if o.spin_us == u32::MAX {
                        Duration::MAX
                    } else {
                        Duration::from_micros(o.spin_us as u64)
                    }),
            )
            .tcp(
                TcpOptions::default()
                    .shm_upgrade(o.allow_shm_upgrade != 0)
                    // The C struct has one timeout for connecting and stalls.
                    .stall_timeout(Duration::from_millis(o.connect_timeout_ms as u64)),
            );
        o.token = (!token.is_empty()).then_some(token);
        o.rdma = rdma;
        let device = match o_device {
            avp_device_kind::AVP_DEVICE_NONE => None,
            avp_device_kind::AVP_DEVICE_CUDA => Some(avp_transport::Device::Cuda(o_ordinal)),
            avp_device_kind::AVP_DEVICE_EMULATED => Some(avp_transport::Device::Emulated),
        };
        if let Some(d) = device {
            o = o.device(avp_transport::DeviceOptions::new(d).slot_size(o_slot as usize));
        }
        o
    })
}

/// # Safety
/// The struct's string pointers are NULL or NUL-terminated.
pub(crate) unsafe fn envelope(e: Option<&avp_envelope>) -> Result<Envelope, Error> {
    let Some(e) = e else {
        return Ok(Envelope::default());
    };
    // SAFETY: per the caller's contract.
    unsafe {
        Ok(Envelope {
            model_id: string(e.model_id, "envelope.model_id")?,
            model_hash: string(e.model_hash, "envelope.model_hash")?,
            model_family: string(e.model_family, "envelope.model_family")?,
            tokenizer_hash: string(e.tokenizer_hash, "envelope.tokenizer_hash")?,
            session_id: string(e.session_id, "envelope.session_id")?,
            source_agent_id: string(e.source_agent_id, "envelope.source_agent_id")?,
            target_agent_id: string(e.target_agent_id, "envelope.target_agent_id")?,
            extra: Default::default(),
        })
    }
}

/// Enum values arrive from C as plain integers and are checked before use.
pub(crate) fn dtype(v: u32) -> Result<DType, Error> {
    u8::try_from(v)
        .ok()
        .and_then(DType::from_code)
        .ok_or_else(|| Error::arg(format!("dtype {v} is not one of AVP_DTYPE_F32/F16/BF16/I8")))
}

fn layout(v: u32) -> Result<KvLayout, Error> {
    u8::try_from(v)
        .ok()
        .and_then(KvLayout::from_code)
        .ok_or_else(|| {
            Error::arg(format!(
                "layout {v} is not AVP_LAYOUT_HND or AVP_LAYOUT_NHD"
            ))
        })
}

pub(crate) fn kv_desc(d: &avp_kv_desc) -> Result<KvCacheDesc, Error> {
    let end = if d.layer_end == 0 {
        d.num_layers
    } else {
        d.layer_end
    };
    Ok(KvCacheDesc::new(
        d.num_layers,
        d.num_kv_heads,
        d.head_dim,
        d.seq_len,
        dtype(d.dtype)?,
        layout(d.layout)?,
    )
    .with_layers(LayerRange::new(d.layer_start, end)))
}

pub(crate) fn kv_desc_out(d: &KvCacheDesc) -> avp_kv_desc {
    avp_kv_desc {
        num_layers: d.num_layers,
        num_kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
        seq_len: d.seq_len,
        dtype: dtype_out(d.dtype) as u32,
        layout: match d.layout {
            KvLayout::Hnd => avp_layout::AVP_LAYOUT_HND,
            KvLayout::Nhd => avp_layout::AVP_LAYOUT_NHD,
        } as u32,
        layer_start: d.layers.start,
        layer_end: d.layers.end,
    }
}

pub(crate) fn dtype_out(d: DType) -> avp_dtype {
    match d {
        DType::F32 => avp_dtype::AVP_DTYPE_F32,
        DType::F16 => avp_dtype::AVP_DTYPE_F16,
        DType::Bf16 => avp_dtype::AVP_DTYPE_BF16,
        DType::I8 => avp_dtype::AVP_DTYPE_I8,
    }
}

pub(crate) fn text_format(v: u32) -> Result<TextFormat, Error> {
    u8::try_from(v)
        .ok()
        .and_then(TextFormat::from_code)
        .ok_or_else(|| {
            Error::arg(format!(
                "text format {v} is not AVP_TEXT_JSON or AVP_TEXT_PLAIN"
            ))
        })
}

/// # Safety
/// `hidden.map_id` is NULL or NUL-terminated.
pub(crate) unsafe fn payload(p: &avp_payload) -> Result<Payload, Error> {
    let payload = match p.kind {
        0 => Payload::KvCache(kv_desc(&p.kv)?),
        1 => Payload::HiddenState(HiddenStateDesc {
            rows: p.hidden.rows,
            dim: p.hidden.dim,
            dtype: dtype(p.hidden.dtype)?,
            // SAFETY: per the caller's contract.
            map_id: unsafe { string(p.hidden.map_id, "hidden.map_id")? },
        }),
        2 => Payload::Text(TextDesc {
            format: text_format(p.text_format)?,
            len: p.text_len,
        }),
        k => {
            return Err(Error::arg(format!(
                "payload kind {k} is not AVP_KIND_KV_CACHE/HIDDEN_STATE/TEXT"
            )));
        }
    };
    payload.validate()?;
    Ok(payload)
}

/// Section index of (`layer`, `part`) in a KV message.
pub(crate) fn kv_section(d: &KvCacheDesc, layer: u32, part: u32) -> Result<usize, Error> {
    if !d.layers.contains(layer) {
        return Err(Error::arg(format!(
            "layer {layer} is not carried (layers {}..{})",
            d.layers.start, d.layers.end
        )));
    }
    let base = (layer - d.layers.start) as usize * 2;
    let n = d.layers.len() as usize * 2;
    match part {
        0 => Ok(base),
        1 => Ok(base + 1),
        p @ (2 | 3) if d.dtype == DType::I8 => Ok(n + base + (p as usize - 2)),
        2 | 3 => Err(Error::arg("scales exist only for AVP_DTYPE_I8 caches")),
        p => Err(Error::arg(format!(
            "kv part {p} is not AVP_KV_K/V/K_SCALES/V_SCALES"
        ))),
    }
}

/// Address, identity and options of a bind or connect call.
///
/// # Safety
/// Pointers are NULL or valid per the header's contract.
pub(crate) unsafe fn endpoint_args(
    address: *const c_char,
    identity: *const avp_identity,
    options: *const avp_options,
) -> Result<(String, ModelIdentity, Options), Error> {
    if address.is_null() {
        return Err(Error::null("address"));
    }
    // SAFETY: per the caller's contract.
    unsafe {
        Ok((
            string(address, "address")?,
            self::identity(identity.as_ref())?,
            self::options(options.as_ref())?,
        ))
    }
}

/// Hand out a writable section through `ptr` / `len`.
///
/// # Safety
/// `ptr` and `len` are NULL or writable.
pub(crate) unsafe fn put_section(
    ptr: *mut *mut u8,
    len: *mut usize,
    s: &mut [u8],
) -> Result<(), Error> {
    if ptr.is_null() || len.is_null() {
        return Err(Error::null("ptr and len"));
    }
    // SAFETY: both checked non-NULL.
    unsafe {
        ptr.write(s.as_mut_ptr());
        len.write(s.len());
    }
    Ok(())
}

/// Copy `s` into a fixed C char array, truncating, always NUL-terminated.
pub(crate) fn fill<const N: usize>(dst: &mut [c_char; N], s: &str) {
    let n = s.len().min(N - 1);
    for (d, b) in dst.iter_mut().zip(s.as_bytes()[..n].iter()) {
        *d = *b as c_char;
    }
    dst[n] = 0;
}

/// Write a device span through the out-pointers `addr` and `len`.
///
/// # Safety
/// `addr` and `len` are NULL or writable.
pub(crate) unsafe fn put_span(
    addr: *mut u64,
    len: *mut usize,
    span: avp_transport::DeviceSpan,
) -> Result<(), Error> {
    if addr.is_null() || len.is_null() {
        return Err(Error::null("addr and len"));
    }
    // SAFETY: both checked non-NULL; the caller passes writable memory.
    unsafe {
        addr.write(span.addr);
        len.write(span.len as usize);
    }
    Ok(())
}
