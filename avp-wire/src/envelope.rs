//! Who sent a message, for whom, and from which model.

use std::collections::BTreeMap;

/// Identity and routing fields carried in every v2 header.
///
/// Empty strings mean "not given". `extra` is free-form; keys are kept sorted on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    /// Model id, e.g. a Hugging Face repo id.
    pub model_id: String,
    /// Hash of the producing model's architecture (see `ModelIdentity`).
    pub model_hash: String,
    /// Model family, e.g. "llama" or "qwen2".
    pub model_family: String,
    /// Hash of the producing model's vocabulary.
    pub tokenizer_hash: String,
    /// Session the message belongs to.
    pub session_id: String,
    /// Sending agent.
    pub source_agent_id: String,
    /// Receiving agent.
    pub target_agent_id: String,
    /// Free key/value pairs.
    pub extra: BTreeMap<String, String>,
}

/// A borrowed view of a parsed message's [`Envelope`]; every string points into the message.
#[derive(Clone, Copy)]
pub struct EnvelopeRef<'a> {
    pub(crate) raw: &'a crate::header::ArchivedRawEnvelope,
}

impl<'a> EnvelopeRef<'a> {
    /// Model id.
    pub fn model_id(&self) -> &'a str {
        self.raw.model_id.as_str()
    }
    /// Model hash.
    pub fn model_hash(&self) -> &'a str {
        self.raw.model_hash.as_str()
    }
    /// Model family.
    pub fn model_family(&self) -> &'a str {
        self.raw.model_family.as_str()
    }
    /// Tokenizer hash.
    pub fn tokenizer_hash(&self) -> &'a str {
        self.raw.tokenizer_hash.as_str()
    }
    /// Session id.
    pub fn session_id(&self) -> &'a str {
        self.raw.session_id.as_str()
    }
    /// Sending agent.
    pub fn source_agent_id(&self) -> &'a str {
        self.raw.source_agent_id.as_str()
    }
    /// Receiving agent.
    pub fn target_agent_id(&self) -> &'a str {
        self.raw.target_agent_id.as_str()
    }
    /// The extra pairs, in key order.
    pub fn extra(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.raw
            .extra
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
    }
    /// The value of one extra key.
    pub fn extra_get(&self, key: &str) -> Option<&'a str> {
        self.extra().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
    /// An owned copy.
    pub fn to_owned(&self) -> Envelope {
        Envelope {
            model_id: self.model_id().into(),
            model_hash: self.model_hash().into(),
            model_family: self.model_family().into(),
            tokenizer_hash: self.tokenizer_hash().into(),
            session_id: self.session_id().into(),
            source_agent_id: self.source_agent_id().into(),
            target_agent_id: self.target_agent_id().into(),
            extra: self
                .extra()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }
}

impl std::fmt::Debug for EnvelopeRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_owned().fmt(f)
    }
}
