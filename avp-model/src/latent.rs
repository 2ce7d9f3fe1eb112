//! Turning a hidden state back into an input embedding, so a model can "think" in
//! its own latent space (the reference's §5.3, with its normalisation fixed).
//!
//! - Tied embeddings: the soft embedding `softmax(h·Eᵀ)·E`, the expectation of the
//!   input embedding under the model's own next-token distribution.
//! - Untied embeddings: ridge realignment `W = (E_outᵀE_out + λI)⁻¹ E_outᵀE_in`
//!   (λ = 1e-5), a least-squares map from output space to input space, computed once
//!   per model and cached on disk by model hash.
//!
//! Either way the result is rescaled to the mean L2 norm of the input embedding rows:
//! the reference's Hugging Face path skipped this for tied models although its own
//! docs, its llama.cpp and its vLLM paths all rescale.

use std::path::{Path, PathBuf};

use burn::tensor::activation::softmax;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use safetensors::{Dtype, SafeTensors};

use crate::decoder::{Decoder, to_vec};
use crate::engine::Engine;
use crate::error::{ModelError, Result};

/// The ridge λ of the realignment solve.
pub const RIDGE_LAMBDA: f64 = 1e-5;

/// How hidden states become input embeddings for one model.
#[derive(Clone)]
pub enum LatentMap<B: Backend> {
    /// Soft embedding through the (tied) vocabulary.
    Soft {
        /// Mean L2 norm of the input embedding rows.
        target_norm: f32,
    },
    /// Ridge realignment (untied embeddings).
    Realign {
        /// `[hidden, hidden]`, applied as `h·W`.
        w: Box<Tensor<B, 2>>,
        /// Mean L2 norm of the input embedding rows.
        target_norm: f32,
    },
}

impl<B: Engine> LatentMap<B> {
    /// The map for `decoder`: soft embedding when its embeddings are tied, else the
    /// realignment matrix, read from `cache` (a file path) when present and valid,
    /// else computed and written there.
    pub fn for_decoder(decoder: &Decoder<B>, cache: Option<&Path>) -> Result<LatentMap<B>> {
        let target_norm = mean_row_norm(decoder.input_embeddings())?;
        if decoder.config().tied_embeddings {
            return Ok(LatentMap::Soft { target_norm });
        }
        let d = decoder.config().hidden as usize;
        if let Some(path) = cache
            && let Some(w) = read_cached(path, d)
        {
            tracing::debug!(path = %path.display(), "realignment matrix from cache");
            return Ok(LatentMap::Realign {
                w: Box::new(decoder.matrix(w, d, d)),
                target_norm,
            });
        }
        let started = std::time::Instant::now();
        let w = realign_matrix(decoder.output_projection(), decoder.input_embeddings())?;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            "computed the realignment matrix"
        );
        if let Some(path) = cache
            && let Err(e) = write_cached(path, &w, d)
        {
            tracing::warn!(path = %path.display(), "could not cache the realignment matrix: {e}");
        }
        Ok(LatentMap::Realign {
            w: Box::new(decoder.matrix(w, d, d)),
            target_norm,
        })
    }

    /// Input embeddings `[n, hidden]` for final-normed hidden states `h` `[n, hidden]`.
    pub fn apply(&self, decoder: &Decoder<B>, h: Tensor<B, 2>) -> Tensor<B, 2> {
        let (a, target_norm) = match self {
            LatentMap::Soft { target_norm } => {
                let p = softmax(h.matmul(decoder.output_projection().clone()), 1);
                (p.matmul(decoder.input_embeddings().clone()), *target_norm)
            }
            LatentMap::Realign { w, target_norm } => (h.matmul((**w).clone()), *target_norm),
        };
        rescale(a, target_norm)
    }

    /// The target norm the outputs are scaled to.
    pub fn target_norm(&self) -> f32 {
        match self {
            LatentMap::Soft { target_norm } | LatentMap::Realign { target_norm, .. } => {
                *target_norm
            }
        }
    }
}

/// The cache file of the realignment matrix of the model with `model_hash`.
pub fn cache_path(cache_dir: &Path, model_hash: &str) -> PathBuf {
    cache_dir
        .join("realign")
        .join(format!("{model_hash}.safetensors"))
}

/// Each row of `a` scaled to L2 norm `target` (rows with norm below 1e-6 are divided
/// by 1e-6 instead).
pub fn rescale<B: Backend>(a: Tensor<B, 2>, target: f32) -> Tensor<B, 2> {
    let norm = a.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-6);
    a * (norm.recip() * target)
}

/// Mean L2 norm of the rows of `m`.
pub fn mean_row_norm<B: Backend>(m: &Tensor<B, 2>) -> Result<f32> {
    let norms = m.clone().powf_scalar(2.0).sum_dim(1).sqrt().mean();
    Ok(to_vec(norms)?[0])
}

/// `W = (E_outᵀE_out + λI)⁻¹ E_outᵀE_in` for `output` = E_outᵀ (`[hidden, vocab]`)
/// and `input` = E_in (`[vocab, hidden]`); row-major `[hidden, hidden]`.
///
/// The two Gram products run on the tensor backend in f32 (as the reference does);
/// the symmetric positive-definite solve runs in f64 (Cholesky).
pub fn realign_matrix<B: Backend>(output: &Tensor<B, 2>, input: &Tensor<B, 2>) -> Result<Vec<f32>> {
    let [d, v] = output.dims();
    if input.dims() != [v, d] {
        return Err(ModelError::Invalid(format!(
            "realignment needs input embeddings [{v}, {d}], found {:?}; resize the vocabularies to match",
            input.dims()
        )));
    }
    let gram = to_vec(output.clone().matmul(output.clone().transpose()))?;
    let rhs = to_vec(output.clone().matmul(input.clone()))?;
    let mut a = nalgebra::DMatrix::<f64>::from_row_iterator(d, d, gram.iter().map(|&x| x as f64));
    for i in 0..d {
        a[(i, i)] += RIDGE_LAMBDA;
    }
    let b = nalgebra::DMatrix::<f64>::from_row_iterator(d, d, rhs.iter().map(|&x| x as f64));
    let chol = a.cholesky().ok_or_else(|| {
        ModelError::Invalid("E_outᵀE_out + λI is not positive definite (NaN weights?)".into())
    })?;
    let w = chol.solve(&b);
    // Row-major out.
    Ok((0..d)
        .flat_map(|r| (0..d).map(move |c| (r, c)))
        .map(|(r, c)| w[(r, c)] as f32)
        .collect())
}

fn read_cached(path: &Path, d: usize) -> Option<Vec<f32>> {
    let bytes = std::fs::read(path).ok()?;
    let st = SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor("w_realign").ok()?;
    if t.dtype() != Dtype::F32 || t.shape() != [d, d] {
        tracing::warn!(path = %path.display(), "ignoring a realignment cache of the wrong shape");
        return None;
    }
    let w = crate::kv::decode_floats(t.data(), avp_wire::DType::F32).ok()?;
    w.iter().all(|x| x.is_finite()).then_some(w)
}

fn write_cached(path: &Path, w: &[f32], d: usize) -> std::result::Result<(), String> {
    let dir = path.parent().ok_or("no parent directory")?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![d, d], &bytes)
        .map_err(|e| e.to_string())?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    safetensors::serialize_to_file([("w_realign", view)], None, &tmp).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

/// A `[rows, cols]` tensor of `values` on the CPU (unit tests; callers use
/// [`Decoder::matrix`], which puts it on the model's device).
#[cfg(test)]
pub(crate) fn tensor(values: Vec<f32>, rows: usize, cols: usize) -> Tensor<crate::engine::Cpu, 2> {
    crate::decoder::matrix(values, rows, cols, &Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realignment_of_equal_embeddings_is_near_identity() {
        // E_out = E_in = a well-conditioned 6x3 matrix: W solves (EᵀE + λI)W = EᵀE.
        let e: Vec<f32> = vec![
            1.0, 0.0, 0.5, 0.0, 2.0, 0.0, 0.3, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.2, 3.0, 0.7, 0.1,
            0.0,
        ];
        let input = tensor(e.clone(), 6, 3);
        let output = input.clone().transpose();
        let w = realign_matrix(&output, &input).unwrap();
        for r in 0..3 {
            for c in 0..3 {
                let expect = if r == c { 1.0 } else { 0.0 };
                assert!((w[r * 3 + c] - expect).abs() < 1e-4, "{w:?}");
            }
        }
    }

    #[test]
    fn realignment_solves_a_hand_computed_system() {
        // E_out = [[1,0],[0,2]], E_in = [[2,1],[0,4]]: EᵀE = diag(1,4),
        // E_outᵀE_in = [[2,1],[0,8]], so W ≈ [[2,1],[0,2]].
        let output = tensor(vec![1.0, 0.0, 0.0, 2.0], 2, 2).transpose();
        let input = tensor(vec![2.0, 1.0, 0.0, 4.0], 2, 2);
        let w = realign_matrix(&output, &input).unwrap();
        for (got, want) in w.iter().zip([2.0, 1.0, 0.0, 2.0]) {
            assert!((got - want).abs() < 1e-4, "{w:?}");
        }
    }

    #[test]
    fn mismatched_vocabularies_are_refused() {
        let output = tensor(vec![0.0; 6], 2, 3);
        let input = tensor(vec![0.0; 8], 4, 2);
        assert!(matches!(
            realign_matrix(&output, &input),
            Err(ModelError::Invalid(_))
        ));
    }

    #[test]
    fn rescale_sets_row_norms_and_survives_zero_rows() {
        let a = tensor(vec![3.0, 4.0, 0.0, 0.0], 2, 2);
        let out = to_vec(rescale(a, 2.0)).unwrap();
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] - 1.6).abs() < 1e-6);
        assert_eq!(&out[2..], &[0.0, 0.0]);
    }

    #[test]
    fn mean_row_norm_averages_rows() {
        let m = tensor(vec![3.0, 4.0, 0.0, 1.0], 2, 2);
        assert!((mean_row_norm(&m).unwrap() - 3.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_is_stable_on_huge_logits() {
        let p = to_vec(softmax(tensor(vec![1e30, 1e30, -1e30], 1, 3), 1)).unwrap();
        assert!(p.iter().all(|x| x.is_finite()), "{p:?}");
        assert!((p[0] - 0.5).abs() < 1e-6 && p[2] == 0.0, "{p:?}");
    }
}
