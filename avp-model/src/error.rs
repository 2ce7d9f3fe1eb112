//! The one error type of this crate.

/// What can go wrong while fetching or reading a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The GGUF file is malformed.
    #[error("invalid GGUF file: {0}")]
    Gguf(String),
    /// A tensor type this crate cannot dequantize.
    #[error(
        "tensor {name}: ggml type {ty} is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K)"
    )]
    Unsupported {
        /// Tensor name.
        name: String,
        /// Its ggml type id.
        ty: u32,
    },
    /// No tensor or metadata key of that name.
    #[error("{0} not found in the model file")]
    Missing(String),
    /// Fetching a model failed.
    #[error("fetching {model}: {reason}")]
    Fetch {
        /// Model name.
        model: String,
        /// What went wrong.
        reason: String,
    },
    /// A Hugging Face model directory is malformed (config.json, safetensors, tokenizer).
    #[error("invalid Hugging Face model directory: {0}")]
    HfDir(String),
    /// A call was given something the model cannot take (what was expected, what was found).
    #[error("{0}")]
    Invalid(String),
    /// A context made by another model was given to this one.
    #[error(
        "the context was made by model {context_hash}, this model is {model_hash}; a KV cache only fits the model that made it (use cross-model projection or text instead)"
    )]
    ForeignContext {
        /// The model hash the context carries.
        context_hash: String,
        /// This model's hash.
        model_hash: String,
    },
    /// A message could not be read or written.
    #[error(transparent)]
    Wire(#[from] avp_wire::WireError),
    /// A transport's copy of a message section into a model's tensors failed.
    #[error("copying a message section into the model: {0}")]
    Transfer(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The tensor backend failed.
    #[error("tensor backend: {0}")]
    Tensor(String),
    /// The requested device cannot be used (unknown name, a build without the
    /// `cuda` feature, or no CUDA driver).
    #[error("{0}")]
    Device(String),
    /// A downloaded file does not have the pinned checksum.
    #[error(
        "{path}: sha256 is {actual}, expected {expected}; the download is corrupt or not the pinned release"
    )]
    Checksum {
        /// The file.
        path: String,
        /// Pinned sha256.
        expected: String,
        /// Actual sha256.
        actual: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
