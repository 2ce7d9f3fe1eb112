//! Cross-model projection (the reference's "Rosetta" §6, with cheap maps): a source
//! model's hidden state becomes an input embedding of a different target model,
//! through the vocabulary both understand. No training.
//!
//! - [`Method::VocabMediated`] (same tokenizer): `p = softmax(h·W_srcᵀ / T)` over the
//!   vocabulary (both truncated to the smaller row count), `e = p·E_tgt`.
//! - [`Method::VocabOverlap`] (different tokenizers): the tokens whose strings both
//!   vocabularies hold, sorted by string; logits over those source rows only, softmax
//!   renormalised over them, `e = p·E_tgt[shared]`.
//!
//! Either way `e` is rescaled to the target's mean input-embedding norm. A
//! [`ProjectionMap`] stores only the two hashes and the shared index pairs (the
//! reference pickled the whole target embedding matrix, ~2 GB for a 7B target).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::activation::softmax;
use burn::tensor::{Int, TensorData};

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};
use crate::latent::rescale;

/// Fewest shared tokens for a projection path (the reference's threshold).
pub const MIN_SHARED_TOKENS: usize = 100;

/// How hidden states cross between the two vocabularies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Same tokenizer: the whole vocabulary.
    VocabMediated,
    /// Different tokenizers: the tokens both hold.
    VocabOverlap,
}

/// What a projection from one model to another needs besides the two models.
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectionMap {
    /// Source model hash.
    pub source_hash: String,
    /// Target model hash.
    pub target_hash: String,
    /// The method.
    pub method: Method,
    /// Source ids of the shared tokens (sorted by token string); empty for
    /// [`Method::VocabMediated`].
    pub source_ids: Vec<u32>,
    /// Target ids of the same tokens, in the same order.
    pub target_ids: Vec<u32>,
}

impl ProjectionMap {
    /// The map id as the wire and the handshake name it: `<src16>_<dst16>`.
    pub fn id(&self) -> String {
        map_id(&self.source_hash, &self.target_hash)
    }

    /// Build the map between two vocabularies (`token string → id`). Equal
    /// vocabularies give [`Method::VocabMediated`]; otherwise the shared tokens, and
    /// fewer than [`MIN_SHARED_TOKENS`] is an error (no projection path: fall back
    /// to text).
    pub fn build(
        source_hash: &str,
        source_vocab: &HashMap<String, u32>,
        target_hash: &str,
        target_vocab: &HashMap<String, u32>,
    ) -> Result<ProjectionMap> {
        let mut map = ProjectionMap {
            source_hash: source_hash.into(),
            target_hash: target_hash.into(),
            method: Method::VocabMediated,
            source_ids: Vec::new(),
            target_ids: Vec::new(),
        };
        if source_vocab == target_vocab {
            return Ok(map);
        }
        let mut shared: Vec<(&String, u32, u32)> = source_vocab
            .iter()
            .filter_map(|(t, &s)| target_vocab.get(t).map(|&d| (t, s, d)))
            .collect();
        if shared.len() < MIN_SHARED_TOKENS {
            return Err(ModelError::Invalid(format!(
                "no projection path: the vocabularies share {} tokens, at least {MIN_SHARED_TOKENS} are needed",
                shared.len()
            )));
        }
        shared.sort();
        map.method = Method::VocabOverlap;
        map.source_ids = shared.iter().map(|x| x.1).collect();
        map.target_ids = shared.iter().map(|x| x.2).collect();
        Ok(map)
    }

    /// Shared tokens (0 for the mediated method, which uses the whole vocabulary).
    pub fn overlap_count(&self) -> usize {
        self.source_ids.len()
    }

    /// Where this map is cached under `cache_dir`.
    pub fn path(cache_dir: &Path, source_hash: &str, target_hash: &str) -> PathBuf {
        cache_dir
            .join("maps")
            .join(format!("{}.safetensors", map_id(source_hash, target_hash)))
    }

    /// Write the map (hashes and method as metadata, index pairs as u32 tensors).
    pub fn save(&self, cache_dir: &Path) -> Result<PathBuf> {
        let path = Self::path(cache_dir, &self.source_hash, &self.target_hash);
        let io = |source| ModelError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(io)?;
        let bytes = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let (s, t) = (bytes(&self.source_ids), bytes(&self.target_ids));
        let n = self.source_ids.len();
        let view = |b| {
            safetensors::tensor::TensorView::new(Dtype::U32, vec![n], b)
                .map_err(|e| ModelError::Invalid(format!("map tensor: {e}")))
        };
        let meta = HashMap::from([
            ("source_hash".to_owned(), self.source_hash.clone()),
            ("target_hash".to_owned(), self.target_hash.clone()),
            ("method".to_owned(), format!("{:?}", self.method)),
        ]);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        safetensors::serialize_to_file(
            [("source_ids", view(&s)?), ("target_ids", view(&t)?)],
            Some(meta),
            &tmp,
        )
        .map_err(|e| ModelError::Invalid(format!("writing the map: {e}")))?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(path)
    }

    /// Read the map between two models from `cache_dir`, if one is there and valid.
    pub fn load(cache_dir: &Path, source_hash: &str, target_hash: &str) -> Option<ProjectionMap> {
        let bytes = std::fs::read(Self::path(cache_dir, source_hash, target_hash)).ok()?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).ok()?;
        let meta = meta.metadata().as_ref()?;
        if meta.get("source_hash")? != source_hash || meta.get("target_hash")? != target_hash {
            return None;
        }
        let method = match meta.get("method")?.as_str() {
            "VocabMediated" => Method::VocabMediated,
            "VocabOverlap" => Method::VocabOverlap,
            _ => return None,
        };
        let st = SafeTensors::deserialize(&bytes).ok()?;
        let ids = |name: &str| -> Option<Vec<u32>> {
            let t = st.tensor(name).ok()?;
            (t.dtype() == Dtype::U32).then(|| {
                t.data()
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            })
        };
        let (source_ids, target_ids) = (ids("source_ids")?, ids("target_ids")?);
        (source_ids.len() == target_ids.len()).then(|| ProjectionMap {
            source_hash: source_hash.into(),
            target_hash: target_hash.into(),
            method,
            source_ids,
            target_ids,
        })
    }

    /// Project source hidden states `h` (`[n, D_src]`, final-normed) into target
    /// input embeddings (`[n, D_tgt]`), one per row. `source_output` is the source's
    /// output projection (`[D_src, V_src]`), `target_embed` the target's input
    /// embeddings (`[V_tgt, D_tgt]`), `target_norm` their mean row norm.
    pub fn project<B: Backend>(
        &self,
        h: Tensor<B, 2>,
        source_output: &Tensor<B, 2>,
        target_embed: &Tensor<B, 2>,
        temperature: f32,
        target_norm: f32,
    ) -> Result<Tensor<B, 2>> {
        let [d_src, _] = source_output.dims();
        if h.dims()[1] != d_src {
            return Err(ModelError::Invalid(format!(
                "hidden states have {} values per row, the source model {d_src}",
                h.dims()[1]
            )));
        }
        let logits = h.matmul(source_output.clone());
        self.project_logits(logits, target_embed, temperature, target_norm)
    }

    /// The receiving half of [`Self::project`]: source next-token logits
    /// (`[n, V_src]`, i.e. `h·W_src`) to target input embeddings (`[n, D_tgt]`).
    /// This is what runs on the target's side of a cross-model handoff: the sender
    /// computes its logits with its own weights, the receiver needs only its own.
    pub fn project_logits<B: Backend>(
        &self,
        logits: Tensor<B, 2>,
        target_embed: &Tensor<B, 2>,
        temperature: f32,
        target_norm: f32,
    ) -> Result<Tensor<B, 2>> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(ModelError::Invalid(format!(
                "projection temperature must be > 0, found {temperature}"
            )));
        }
        let (z, e) = self.restrict(logits, target_embed)?;
        let p = softmax(z / temperature as f64, 1);
        Ok(rescale(p.matmul(e), target_norm))
    }

    /// The source logits over the shared tokens and the target embedding rows of
    /// the same tokens, in the same order.
    fn restrict<B: Backend>(
        &self,
        logits: Tensor<B, 2>,
        target_embed: &Tensor<B, 2>,
    ) -> Result<(Tensor<B, 2>, Tensor<B, 2>)> {
        let [n, v_src] = logits.dims();
        let [v_tgt, d_tgt] = target_embed.dims();
        Ok(match self.method {
            Method::VocabMediated => {
                let v = v_src.min(v_tgt);
                (
                    logits.slice([0..n, 0..v]),
                    target_embed.clone().slice([0..v, 0..d_tgt]),
                )
            }
            Method::VocabOverlap => (
                logits.select(1, self.index(&self.source_ids, v_src, target_embed)?),
                target_embed
                    .clone()
                    .select(0, self.index(&self.target_ids, v_tgt, target_embed)?),
            ),
        })
    }

    /// The shared ids as an index tensor, each checked against `bound`.
    fn index<B: Backend>(
        &self,
        ids: &[u32],
        bound: usize,
        like: &Tensor<B, 2>,
    ) -> Result<Tensor<B, 1, Int>> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= bound) {
            return Err(ModelError::Invalid(format!(
                "map {} index {bad} is outside a vocabulary of {bound}",
                self.id()
            )));
        }
        Ok(Tensor::from_data(
            TensorData::new(
                ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [ids.len()],
            ),
            &like.device(),
        ))
    }

    /// For one row of source logits: which shared token it ranks first (its target
    /// id), that token's probability and the distribution's entropy (nats), after
    /// the same restriction and temperature as the projection.
    pub fn top_token(&self, logits: &[f32], target_vocab: usize, temperature: f32) -> TopToken {
        let pairs: Box<dyn Iterator<Item = (f32, u32)>> = match self.method {
            Method::VocabMediated => {
                let v = logits.len().min(target_vocab);
                Box::new(logits[..v].iter().copied().zip(0u32..))
            }
            Method::VocabOverlap => Box::new(
                self.source_ids
                    .iter()
                    .zip(&self.target_ids)
                    .filter_map(|(&s, &t)| logits.get(s as usize).map(|&z| (z, t))),
            ),
        };
        let z: Vec<(f64, u32)> = pairs
            .map(|(z, t)| (z as f64 / temperature as f64, t))
            .collect();
        let max = z.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|x| (x.0 - max).exp()).sum();
        let mut best = (f64::NEG_INFINITY, 0u32);
        let mut entropy = 0.0;
        for &(zi, t) in &z {
            let p = (zi - max).exp() / sum;
            if p > 0.0 {
                entropy -= p * p.ln();
            }
            if zi > best.0 {
                best = (zi, t);
            }
        }
        TopToken {
            target_id: best.1,
            prob: ((best.0 - max).exp() / sum) as f32,
            entropy: entropy as f32,
        }
    }

    /// The map between two models: read from `cache_dir`, else built from the two
    /// vocabularies and written there. `source_vocab` may be `None` when the map is
    /// known to be cached (or the two models share one tokenizer: pass the target's).
    pub fn obtain(
        cache_dir: &Path,
        source_hash: &str,
        source_vocab: Option<&HashMap<String, u32>>,
        target_hash: &str,
        target_vocab: &HashMap<String, u32>,
    ) -> Result<ProjectionMap> {
        if let Some(m) = Self::load(cache_dir, source_hash, target_hash) {
            return Ok(m);
        }
        let source_vocab = source_vocab.ok_or_else(|| {
            ModelError::Invalid(format!(
                "no map {} under {} and the source's vocabulary is not known",
                map_id(source_hash, target_hash),
                cache_dir.display()
            ))
        })?;
        let map = Self::build(source_hash, source_vocab, target_hash, target_vocab)?;
        if let Err(e) = map.save(cache_dir) {
            tracing::warn!("could not cache projection map {}: {e}", map.id());
        }
        Ok(map)
    }
}

/// A source distribution's first choice, seen from the target (see
/// [`ProjectionMap::top_token`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopToken {
    /// The target id of the most likely shared token.
    pub target_id: u32,
    /// Its probability.
    pub prob: f32,
    /// Entropy of the distribution over the shared tokens, in nats.
    pub entropy: f32,
}

/// Projection maps cached under a directory, as the handshake's rule 4 looks them
/// up: a map counts only when it reads back valid.
#[derive(Clone, Debug)]
pub struct MapCache(pub PathBuf);

impl avp_wire::MapLookup for MapCache {
    fn find_map(&self, source_hash: &str, target_hash: &str) -> Option<String> {
        ProjectionMap::load(&self.0, source_hash, target_hash).map(|m| m.id())
    }
}

pub use avp_wire::map_id;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::to_vec;
    use crate::latent::tensor;

    fn vocab(tokens: &[&str]) -> HashMap<String, u32> {
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect()
    }

    fn words(n: usize, prefix: &str) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    #[test]
    fn equal_vocabularies_are_mediated_and_matching_weights_give_the_soft_embedding() {
        let w: Vec<String> = words(120, "t");
        let v = vocab(&w.iter().map(String::as_str).collect::<Vec<_>>());
        let map = ProjectionMap::build("a", &v, "b", &v).unwrap();
        assert_eq!(map.method, Method::VocabMediated);
        // E (120 x 4), tied: W_src = Eᵀ. Projecting into the same E is the soft embedding.
        let e: Vec<f32> = (0..480)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let embed = tensor(e, 120, 4);
        let h = tensor(vec![0.3, -0.2, 0.9, 0.1], 1, 4);
        let got = to_vec(
            map.project(h.clone(), &embed.clone().transpose(), &embed, 1.0, 2.0)
                .unwrap(),
        )
        .unwrap();
        let p = softmax(h.matmul(embed.clone().transpose()), 1);
        let want = to_vec(rescale(p.matmul(embed), 2.0)).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn a_hand_computed_case_and_identity_at_low_temperature() {
        // E = [[1,0],[0,1],[1,1]], tied (W_src = Eᵀ), h = [ln 2, 0]:
        // logits = [ln 2, 0, ln 2], p = [2/5, 1/5, 2/5], p·E = [0.8, 0.6] (norm 1),
        // rescaled to the mean row norm (2 + √2) / 3.
        let v = vocab(&["a", "b", "c"]);
        let map = ProjectionMap::build("s", &v, "t", &v).unwrap();
        let e = tensor(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 3, 2);
        let norm = (2.0 + 2f32.sqrt()) / 3.0;
        let h = tensor(vec![2f32.ln(), 0.0], 1, 2);
        let got = to_vec(
            map.project(h, &e.clone().transpose(), &e, 1.0, norm)
                .unwrap(),
        )
        .unwrap();
        assert!(
            (got[0] - 0.8 * norm).abs() < 1e-6 && (got[1] - 0.6 * norm).abs() < 1e-6,
            "{got:?}"
        );
        // Same vocabulary and weights, a near-zero temperature: the projection of a
        // token's own embedding is that embedding (rescaled to its own norm here).
        // Each row's dot with itself is the largest: [1,0], [0,1], [0.6,0.6].
        let e = tensor(vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.6], 3, 2);
        for row in 0..3 {
            let r = to_vec(e.clone().slice([row..row + 1, 0..2])).unwrap();
            let n = (r[0] * r[0] + r[1] * r[1]).sqrt();
            let out = to_vec(
                map.project(tensor(r.clone(), 1, 2), &e.clone().transpose(), &e, 1e-3, n)
                    .unwrap(),
            )
            .unwrap();
            assert!(
                (out[0] - r[0]).abs() < 1e-4 && (out[1] - r[1]).abs() < 1e-4,
                "row {row}: {out:?} vs {r:?}"
            );
        }
    }

    #[test]
    fn overlap_equals_mediated_at_full_overlap() {
        let w = words(150, "w");
        let tokens: Vec<&str> = w.iter().map(String::as_str).collect();
        let v = vocab(&tokens);
        let mediated = ProjectionMap::build("a", &v, "b", &v).unwrap();
        // The same tokens under other ids: a full overlap, not an equal vocabulary.
        let shuffled: HashMap<String, u32> = v.iter().map(|(t, &i)| (t.clone(), 149 - i)).collect();
        let overlap = ProjectionMap::build("a", &v, "b", &shuffled).unwrap();
        assert_eq!(overlap.method, Method::VocabOverlap);
        assert_eq!(overlap.overlap_count(), 150);
        let src: Vec<f32> = (0..600)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let w_src = tensor(src, 4, 150);
        let tgt: Vec<f32> = (0..150 * 3)
            .map(|i| ((i * 7 % 19) as f32 - 9.0) / 5.0)
            .collect();
        // The target's rows in shuffled order hold the same vectors.
        let mut tgt_shuffled = vec![0f32; tgt.len()];
        for r in 0..150 {
            tgt_shuffled[(149 - r) * 3..(150 - r) * 3].copy_from_slice(&tgt[r * 3..r * 3 + 3]);
        }
        let h = tensor(vec![0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.3], 2, 4);
        let a = to_vec(
            mediated
                .project(h.clone(), &w_src, &tensor(tgt, 150, 3), 0.7, 1.5)
                .unwrap(),
        )
        .unwrap();
        let b = to_vec(
            overlap
                .project(h, &w_src, &tensor(tgt_shuffled, 150, 3), 0.7, 1.5)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(a.len(), 6, "one projected row per source row");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn projecting_logits_equals_projecting_hidden_states_and_top_token_is_the_argmax() {
        let w = words(120, "q");
        let v = vocab(&w.iter().map(String::as_str).collect::<Vec<_>>());
        // Target ids reversed: a full overlap under other ids.
        let rev: HashMap<String, u32> = v.iter().map(|(t, &i)| (t.clone(), 119 - i)).collect();
        let map = ProjectionMap::build("a", &v, "b", &rev).unwrap();
        let w_src = tensor(
            (0..480)
                .map(|i| ((i * 29 % 23) as f32 - 11.0) / 6.0)
                .collect(),
            4,
            120,
        );
        let e_tgt = tensor(
            (0..240)
                .map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0)
                .collect(),
            120,
            2,
        );
        let h = tensor(vec![0.2, 1.0, -0.7, 0.4], 1, 4);
        let logits = h.clone().matmul(w_src.clone());
        let a = to_vec(map.project(h, &w_src, &e_tgt, 0.8, 3.0).unwrap()).unwrap();
        let z = to_vec(logits.clone()).unwrap();
        let b = to_vec(map.project_logits(logits, &e_tgt, 0.8, 3.0).unwrap()).unwrap();
        assert_eq!(a, b);
        let best = z
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        let top = map.top_token(&z, 120, 0.8);
        assert_eq!(
            top.target_id,
            119 - best,
            "the argmax, named by its target id"
        );
        assert!(top.prob > 0.0 && top.prob <= 1.0);
        assert!(top.entropy >= 0.0 && top.entropy <= (120f32).ln() + 1e-4);
        // Huge logits: still a distribution.
        let mut huge = vec![-1e30f32; 120];
        huge[7] = 1e30;
        let top = map.top_token(&huge, 120, 1.0);
        assert_eq!((top.target_id, top.prob), (112, 1.0));
    }

    #[test]
    fn obtain_builds_once_then_reads_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let w = words(200, "o");
        let v = vocab(&w.iter().map(String::as_str).collect::<Vec<_>>());
        let other: HashMap<String, u32> = v.iter().map(|(t, &i)| (t.clone(), i + 1)).collect();
        let (s, t) = ("5".repeat(64), "6".repeat(64));
        assert!(ProjectionMap::obtain(dir.path(), &s, None, &t, &other).is_err());
        let built = ProjectionMap::obtain(dir.path(), &s, Some(&v), &t, &other).unwrap();
        let cached = ProjectionMap::obtain(dir.path(), &s, None, &t, &other).unwrap();
        assert_eq!(built, cached);
        use avp_wire::MapLookup;
        let lookup = MapCache(dir.path().to_path_buf());
        assert_eq!(lookup.find_map(&s, &t), Some(built.id()));
        assert_eq!(lookup.find_map(&t, &s), None);
        // A corrupt file is not a map.
        std::fs::write(ProjectionMap::path(dir.path(), &s, &t), b"junk").unwrap();
        assert_eq!(lookup.find_map(&s, &t), None);
    }

    #[test]
    fn huge_logits_stay_finite_and_bad_inputs_are_refused() {
        let w = words(100, "x");
        let v = vocab(&w.iter().map(String::as_str).collect::<Vec<_>>());
        let map = ProjectionMap::build("a", &v, "b", &v).unwrap();
        let embed = tensor((0..200).map(|i| i as f32 / 100.0).collect(), 100, 2);
        let h = tensor(vec![1e30, -1e30], 1, 2);
        let out = to_vec(
            map.project(h.clone(), &embed.clone().transpose(), &embed, 1.0, 1.0)
                .unwrap(),
        )
        .unwrap();
        assert!(out.iter().all(|x| x.is_finite()), "{out:?}");
        assert!(
            map.project(h.clone(), &embed.clone().transpose(), &embed, 0.0, 1.0)
                .is_err()
        );
        assert!(
            map.project(
                tensor(vec![1.0; 3], 1, 3),
                &embed.clone().transpose(),
                &embed,
                1.0,
                1.0
            )
            .is_err()
        );
    }

    #[test]
    fn fewer_than_100_shared_tokens_is_no_path() {
        let a = words(150, "a");
        let mut b = words(150, "b");
        b.truncate(60);
        b.extend(a.iter().take(99).cloned());
        let va = vocab(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let vb = vocab(&b.iter().map(String::as_str).collect::<Vec<_>>());
        let err = ProjectionMap::build("a", &va, "b", &vb)
            .unwrap_err()
            .to_string();
        assert!(err.contains("share 99 tokens"), "{err}");
    }

    #[test]
    fn maps_are_cached_small_and_keyed_by_both_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let w = words(300, "z");
        let v = vocab(&w.iter().map(String::as_str).collect::<Vec<_>>());
        let other: HashMap<String, u32> = v.iter().map(|(t, &i)| (t.clone(), i + 5)).collect();
        let (h1, h2) = ("1".repeat(64), "2".repeat(64));
        let map = ProjectionMap::build(&h1, &v, &h2, &other).unwrap();
        let path = map.save(dir.path()).unwrap();
        assert!(path.ends_with(format!("{}_{}.safetensors", "1".repeat(16), "2".repeat(16))));
        assert!(std::fs::metadata(&path).unwrap().len() < 4096);
        assert_eq!(ProjectionMap::load(dir.path(), &h1, &h2), Some(map));
        assert_eq!(ProjectionMap::load(dir.path(), &h2, &h1), None);
    }
}
