//! Deciding how two agents talk: latent KV transfer, cross-model projection or JSON text.
//!
//! The rules are the Python reference's six, in its order (the first hit wins):
//!
//! 1. both model hashes set and equal → latent (`hash_match`);
//! 2. same structure (family, hidden size, layers, and — unlike the reference — KV
//!    heads and head size) → latent (`structural_match`);
//! 3. both tokenizer hashes set and equal → cross-model, map id `vocab:<hash[..16]>`
//!    (`shared_tokenizer`);
//! 4. a calibrated map for (local, remote) exists → cross-model, map id
//!    `<local[..16]>_<remote[..16]>` (`avp_map_file`);
//! 5. the vocabularies share at least [`MIN_VOCAB_OVERLAP`] token strings →
//!    cross-model, map id `<local[..16]>_<remote[..16]>` (the reference wrote
//!    `vocab_overlap:<count>`; we name the map both ends build, and put the count in
//!    the reason) (`vocab_overlap`);
//! 6. otherwise → JSON text (`json_fallback`).

use std::collections::HashSet;
use std::fmt;

use crate::identity::ModelIdentity;

/// Fewest shared token strings that make a vocabulary-overlap projection usable.
pub const MIN_VOCAB_OVERLAP: usize = 100;

/// How two agents exchange state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Same model: KV caches and hidden states go across as they are.
    Latent,
    /// Different models with a projection path: hidden states are projected.
    CrossModel,
    /// No latent path: text (JSON) is exchanged.
    Json,
}

impl Mode {
    /// Lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Latent => "latent",
            Mode::CrossModel => "cross_model",
            Mode::Json => "json",
        }
    }

    /// The v1 (`CommunicationMode`) value: LATENT = 0 for both latent modes, JSON = 1.
    pub const fn v1_code(self) -> i32 {
        match self {
            Mode::Latent | Mode::CrossModel => 0,
            Mode::Json => 1,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which rule decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolutionPath {
    /// Rule 1.
    HashMatch,
    /// Rule 2.
    StructuralMatch,
    /// Rule 3.
    SharedTokenizer,
    /// Rule 4.
    AvpMapFile,
    /// Rule 5.
    VocabOverlap,
    /// Rule 6.
    JsonFallback,
}

impl ResolutionPath {
    /// The reference's name for the rule.
    pub const fn as_str(self) -> &'static str {
        match self {
            ResolutionPath::HashMatch => "hash_match",
            ResolutionPath::StructuralMatch => "structural_match",
            ResolutionPath::SharedTokenizer => "shared_tokenizer",
            ResolutionPath::AvpMapFile => "avp_map_file",
            ResolutionPath::VocabOverlap => "vocab_overlap",
            ResolutionPath::JsonFallback => "json_fallback",
        }
    }
}

impl fmt::Display for ResolutionPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`Resolver::resolve`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resolution {
    /// The chosen mode.
    pub mode: Mode,
    /// Cross-model map id ("" unless the mode is cross-model).
    pub map_id: String,
    /// The rule that decided.
    pub path: ResolutionPath,
    /// One readable sentence saying why.
    pub reason: String,
}

/// Where calibrated cross-model maps are found.
pub trait MapLookup: fmt::Debug + Send + Sync {
    /// The map id of a calibrated map from `source_hash`'s model to `target_hash`'s, if one exists.
    fn find_map(&self, source_hash: &str, target_hash: &str) -> Option<String>;
}

/// The id of the projection map from `source_hash`'s model to `target_hash`'s:
/// `<source[..16]>_<target[..16]>` (the reference's file stem).
pub fn map_id(source_hash: &str, target_hash: &str) -> String {
    format!("{}_{}", prefix16(source_hash), prefix16(target_hash))
}

fn prefix16(s: &str) -> &str {
    s.get(..16).unwrap_or(s)
}

/// Applies the resolution rules.
#[derive(Default)]
pub struct Resolver<'m> {
    maps: Option<&'m dyn MapLookup>,
}

impl<'m> Resolver<'m> {
    /// A resolver without calibrated maps (rule 4 never fires).
    pub fn new() -> Self {
        Resolver { maps: None }
    }

    /// A resolver that looks for calibrated maps in `maps`.
    pub fn with_maps(maps: &'m dyn MapLookup) -> Self {
        Resolver { maps: Some(maps) }
    }

    /// Decide the mode for `local` (the source) talking to `remote`.
    ///
    /// `vocab_overlap` is the number of token strings the two vocabularies share
    /// (see [`Resolver::vocab_overlap`]), when both are known.
    pub fn resolve(
        &self,
        local: &ModelIdentity,
        remote: &ModelIdentity,
        vocab_overlap: Option<usize>,
    ) -> Resolution {
        let r = self.decide(local, remote, vocab_overlap);
        tracing::info!(
            path = r.path.as_str(),
            mode = r.mode.name(),
            local = %local.model_id,
            remote = %remote.model_id,
            "handshake resolved: {}",
            r.reason
        );
        r
    }

    /// [`Self::resolve`] without the log line (for asking "would anything but the
    /// overlap decide?").
    pub fn decide(
        &self,
        local: &ModelIdentity,
        remote: &ModelIdentity,
        overlap: Option<usize>,
    ) -> Resolution {
        let res = |mode, map_id: String, path, reason: String| Resolution {
            mode,
            map_id,
            path,
            reason,
        };
        if !local.model_hash.is_empty() && local.model_hash == remote.model_hash {
            return res(
                Mode::Latent,
                String::new(),
                ResolutionPath::HashMatch,
                format!("both models have hash {}", prefix16(&local.model_hash)),
            );
        }
        if local.same_structure(remote) {
            return res(
                Mode::Latent,
                String::new(),
                ResolutionPath::StructuralMatch,
                format!(
                    "same structure: family {}, hidden {}, {} layers, {} KV heads x {}",
                    local.model_family,
                    local.hidden_dim,
                    local.num_layers,
                    local.num_kv_heads,
                    local.head_dim
                ),
            );
        }
        if !local.tokenizer_hash.is_empty() && local.tokenizer_hash == remote.tokenizer_hash {
            return res(
                Mode::CrossModel,
                format!("vocab:{}", prefix16(&local.tokenizer_hash)),
                ResolutionPath::SharedTokenizer,
                "different models sharing one tokenizer: vocabulary-mediated projection".into(),
            );
        }
        let both_hashed = !local.model_hash.is_empty() && !remote.model_hash.is_empty();
        let map = self
            .maps
            .filter(|_| both_hashed)
            .and_then(|m| m.find_map(&local.model_hash, &remote.model_hash));
        if let Some(id) = map {
            let reason = format!("calibrated map {id} found");
            return res(Mode::CrossModel, id, ResolutionPath::AvpMapFile, reason);
        }
        if let Some(n) = overlap.filter(|&n| n >= MIN_VOCAB_OVERLAP) {
            let id = match both_hashed {
                true => map_id(&local.model_hash, &remote.model_hash),
                false => format!("vocab_overlap:{n}"),
            };
            return res(
                Mode::CrossModel,
                id,
                ResolutionPath::VocabOverlap,
                format!("vocabularies share {n} tokens (at least {MIN_VOCAB_OVERLAP} needed)"),
            );
        }
        let why = match overlap {
            Some(n) => format!(
                "no latent path: models differ and vocabularies share only {n} tokens (< {MIN_VOCAB_OVERLAP})"
            ),
            None => "no latent path: models differ, no shared tokenizer, no calibrated map".into(),
        };
        res(Mode::Json, String::new(), ResolutionPath::JsonFallback, why)
    }

    /// The number of token strings two vocabularies share.
    pub fn vocab_overlap<'a>(
        a: impl IntoIterator<Item = &'a str>,
        b: impl IntoIterator<Item = &'a str>,
    ) -> usize {
        let a: HashSet<&str> = a.into_iter().collect();
        b.into_iter()
            .collect::<HashSet<&str>>()
            .intersection(&a)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(layers: u32) -> ModelIdentity {
        ModelIdentity {
            model_family: "llama".into(),
            model_id: format!("llama-{layers}"),
            hidden_dim: 4096,
            num_layers: layers,
            num_kv_heads: 32,
            head_dim: 128,
            ..Default::default()
        }
    }

    #[derive(Debug)]
    struct Fixed;
    impl MapLookup for Fixed {
        fn find_map(&self, s: &str, t: &str) -> Option<String> {
            Some(map_id(s, t))
        }
    }

    #[test]
    fn hash_match_wins() {
        let mut a = llama(32);
        a.model_hash = "a".repeat(64);
        let mut b = llama(28);
        b.model_hash = a.model_hash.clone();
        let r = Resolver::new().resolve(&a, &b, None);
        assert_eq!(
            (r.mode, r.path, r.map_id.as_str()),
            (Mode::Latent, ResolutionPath::HashMatch, "")
        );
    }

    #[test]
    fn structural_match_and_layer_mismatch() {
        let r = Resolver::new().resolve(&llama(32), &llama(32), None);
        assert_eq!(r.path, ResolutionPath::StructuralMatch);
        let r = Resolver::new().resolve(&llama(24), &llama(28), None);
        assert_eq!(
            (r.mode, r.path, r.map_id.as_str()),
            (Mode::Json, ResolutionPath::JsonFallback, "")
        );
    }

    #[test]
    fn tokenizer_rule_needs_both_sides_and_beats_map() {
        let mut a = llama(24);
        let mut b = llama(28);
        a.tokenizer_hash = "0123456789abcdef0123".into();
        let maps = Fixed;
        a.model_hash = "1".repeat(64);
        b.model_hash = "2".repeat(64);
        let r = Resolver::with_maps(&maps).resolve(&a, &b, None);
        assert_eq!(
            r.path,
            ResolutionPath::AvpMapFile,
            "one-sided tokenizer hash skips rule 3"
        );
        assert_eq!(r.map_id, format!("{}_{}", "1".repeat(16), "2".repeat(16)));
        b.tokenizer_hash = a.tokenizer_hash.clone();
        let r = Resolver::with_maps(&maps).resolve(&a, &b, Some(1000));
        assert_eq!(
            (r.mode, r.map_id.as_str()),
            (Mode::CrossModel, "vocab:0123456789abcdef")
        );
    }

    #[test]
    fn map_beats_overlap_and_overlap_threshold() {
        let (mut a, mut b) = (llama(24), llama(28));
        a.model_hash = "1".repeat(64);
        b.model_hash = "2".repeat(64);
        let r = Resolver::with_maps(&Fixed).resolve(&a, &b, Some(150));
        assert_eq!(r.path, ResolutionPath::AvpMapFile);
        let r = Resolver::new().resolve(&a, &b, Some(150));
        assert_eq!(
            (r.path, r.map_id.as_str()),
            (
                ResolutionPath::VocabOverlap,
                "1111111111111111_2222222222222222"
            )
        );
        assert!(r.reason.contains("150"), "{}", r.reason);
        a.model_hash.clear();
        let r = Resolver::new().resolve(&a, &b, Some(150));
        assert_eq!(
            r.map_id, "vocab_overlap:150",
            "no hash, no map file to name"
        );
        let r = Resolver::new().resolve(&a, &b, Some(50));
        assert_eq!(r.mode, Mode::Json);
        assert!(r.reason.contains("50"), "{}", r.reason);
    }

    #[test]
    fn empty_identities_fall_back() {
        let r = Resolver::new().resolve(&ModelIdentity::default(), &ModelIdentity::default(), None);
        assert_eq!(r.mode, Mode::Json);
    }

    #[test]
    fn overlap_counts_shared_strings() {
        let a = ["a", "b", "c", "d"];
        let b = ["c", "d", "e"];
        assert_eq!(Resolver::vocab_overlap(a, b), 2);
    }
}
