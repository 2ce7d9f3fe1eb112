//! The per-transfer quality gate of a cross-model handoff (the reference's
//! `assess_transfer`, plus a check it lacked): advisory by default, enforced when
//! the caller says so.
//!
//! - Prompt length: one projected vector cannot carry a long prompt; above
//!   [`QualityGate::max_prompt_tokens`] (300, the reference's threshold) latent is
//!   not recommended.
//! - Effective rank (optional): the entropy of the normalised singular values of the
//!   projected rows over `ln(min(rows, dim))`; a ratio above the threshold means the
//!   rows spread over many directions (0 for a single row).
//! - Next-token cosine: each projected row against the target's input embedding of
//!   the token the source ranks first. A low value means the projection is a blur
//!   of many tokens rather than a point the target knows.
//!
//! ```
//! use avp_model::quality::QualityGate;
//!
//! let gate = QualityGate::default();
//! let q = gate.assess(420, None, &[0.9]);
//! assert!(!q.recommend_latent);
//! assert!(q.reason.contains("420"));
//! ```

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

/// Thresholds of the gate, and whether a failing transfer is dropped.
#[derive(Clone, Debug, PartialEq)]
pub struct QualityGate {
    /// Most source prompt tokens a projected context is trusted to carry.
    pub max_prompt_tokens: u32,
    /// Whether to compute the effective-rank ratio (needs two rows or more).
    pub check_effective_rank: bool,
    /// Largest effective-rank ratio that passes.
    pub max_effective_rank_ratio: f64,
    /// Smallest mean next-token cosine that passes.
    pub min_next_token_cosine: f32,
    /// Whether a transfer that fails the gate is dropped (the receiver answers
    /// without it) rather than used with a warning.
    pub enforce: bool,
}

impl Default for QualityGate {
    fn default() -> Self {
        QualityGate {
            max_prompt_tokens: 300,
            check_effective_rank: false,
            max_effective_rank_ratio: 0.8,
            min_next_token_cosine: 0.5,
            enforce: false,
        }
    }
}

/// The gate's verdict on one transfer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Whether every check passed.
    pub recommend_latent: bool,
    /// Tokens the source read.
    pub prompt_tokens: u32,
    /// The effective-rank ratio, when checked.
    pub effective_rank_ratio: Option<f64>,
    /// Mean cosine of the projected rows with their next-token target embeddings.
    pub next_token_cosine: f32,
    /// What failed, or "transfer within quality thresholds".
    pub reason: String,
}

impl QualityGate {
    /// Judge a transfer: the source's prompt length, the projected rows
    /// (`rows × dim`, row-major; only used for the rank check) and each row's
    /// next-token cosine.
    pub fn assess(
        &self,
        prompt_tokens: u32,
        projected: Option<(&[f32], usize, usize)>,
        cosines: &[f32],
    ) -> Quality {
        let mut failed = Vec::new();
        if prompt_tokens > self.max_prompt_tokens {
            failed.push(format!(
                "prompt_tokens={prompt_tokens} exceeds max_prompt_tokens={}; one projected vector is unlikely to carry it",
                self.max_prompt_tokens
            ));
        }
        let effective_rank_ratio = match (self.check_effective_rank, projected) {
            (true, Some((v, rows, dim))) => Some(effective_rank_ratio(v, rows, dim)),
            _ => None,
        };
        if let Some(r) = effective_rank_ratio.filter(|&r| r > self.max_effective_rank_ratio) {
            failed.push(format!(
                "effective rank ratio {r:.3} exceeds {}",
                self.max_effective_rank_ratio
            ));
        }
        let next_token_cosine = match cosines.len() {
            0 => 0.0,
            n => cosines.iter().sum::<f32>() / n as f32,
        };
        if next_token_cosine < self.min_next_token_cosine {
            failed.push(format!(
                "next-token cosine {next_token_cosine:.3} is below {}",
                self.min_next_token_cosine
            ));
        }
        Quality {
            recommend_latent: failed.is_empty(),
            prompt_tokens,
            effective_rank_ratio,
            next_token_cosine,
            reason: match failed.is_empty() {
                true => "transfer within quality thresholds".into(),
                false => failed.join("; "),
            },
        }
    }
}

/// `H(σ/Σσ) / ln(min(rows, dim))` of a `rows × dim` row-major matrix; 0 when there
/// are fewer than two rows, the singular values sum to 0 or anything is not finite.
pub fn effective_rank_ratio(values: &[f32], rows: usize, dim: usize) -> f64 {
    let k = rows.min(dim);
    if k < 2 || values.len() != rows * dim || values.iter().any(|x| !x.is_finite()) {
        return 0.0;
    }
    let m = DMatrix::from_row_iterator(rows, dim, values.iter().map(|&x| x as f64));
    let sigma = m.singular_values();
    let total: f64 = sigma.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = sigma
        .iter()
        .map(|s| s / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    h / (k as f64).ln()
}

/// Cosine of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| *x as f64 * *x as f64).sum::<f64>().sqrt();
    let d = n(a) * n(b);
    if d == 0.0 { 0.0 } else { (dot / d) as f32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_length_boundary_is_300() {
        let g = QualityGate::default();
        assert!(g.assess(300, None, &[0.9]).recommend_latent);
        assert!(g.assess(0, None, &[0.9]).recommend_latent);
        let q = g.assess(301, None, &[0.9]);
        assert!(!q.recommend_latent);
        assert!(q.reason.contains("301"), "{}", q.reason);
    }

    #[test]
    fn effective_rank_of_identity_is_one_and_of_rank_one_is_zero() {
        let eye: Vec<f32> = (0..16)
            .map(|i| if i % 5 == 0 { 1.0 } else { 0.0 })
            .collect();
        assert!((effective_rank_ratio(&eye, 4, 4) - 1.0).abs() < 1e-9);
        let rank1: Vec<f32> = (0..12).map(|i| (i % 3 + 1) as f32).collect();
        assert!(effective_rank_ratio(&rank1, 4, 3).abs() < 1e-6);
        assert_eq!(effective_rank_ratio(&[1.0, 2.0], 1, 2), 0.0);
        let g = QualityGate {
            check_effective_rank: true,
            max_effective_rank_ratio: 0.5,
            ..QualityGate::default()
        };
        let q = g.assess(10, Some((&eye, 4, 4)), &[0.9; 4]);
        assert!(!q.recommend_latent, "an identity trips a 0.5 threshold");
        assert_eq!(q.effective_rank_ratio, Some(1.0));
    }

    #[test]
    fn low_cosine_fails_and_cosine_is_safe_on_zero() {
        let q = QualityGate::default().assess(10, None, &[0.2, 0.4]);
        assert!(!q.recommend_latent);
        assert!((q.next_token_cosine - 0.3).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-6);
    }
}
