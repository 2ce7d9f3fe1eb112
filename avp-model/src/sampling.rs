//! Choosing the next token: greedy, or sampled with temperature and top-p from a
//! seeded generator (the same seed gives the same text).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How to pick tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingOptions {
    /// 0 picks the most likely token (greedy); higher values flatten the distribution.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probabilities sum to at least this (1 keeps all).
    pub top_p: f32,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks tokens from logits.
pub struct Sampler {
    opts: SamplingOptions,
    rng: StdRng,
}

impl Sampler {
    /// A sampler with these options.
    pub fn new(opts: SamplingOptions) -> Sampler {
        Sampler {
            rng: StdRng::seed_from_u64(opts.seed),
            opts,
        }
    }

    /// The next token.
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i as u32)
        };
        if self.opts.temperature <= 0.0 || !self.opts.temperature.is_finite() {
            return argmax();
        }
        // Softmax with the temperature, numerically stable.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / self.opts.temperature).exp()))
            .filter(|(_, p)| *p > 0.0)
            .collect();
        let total: f32 = probs.iter().map(|(_, p)| p).sum();
        if !(total > 0.0 && total.is_finite()) {
            return argmax();
        }
        probs.iter_mut().for_each(|(_, p)| *p /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept = 0.0;
        let mut n = 0;
        for (_, p) in &probs {
            kept += p;
            n += 1;
            if kept >= self.opts.top_p {
                break;
            }
        }
        probs.truncate(n.max(1));
        let mass: f32 = probs.iter().map(|(_, p)| p).sum();
        let mut r = self.rng.random::<f32>() * mass;
        for (id, p) in &probs {
            if r < *p {
                return *id;
            }
            r -= p;
        }
        probs.last().map_or_else(argmax, |(id, _)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_degenerate_cases_take_the_maximum() {
        let logits = [0.1, 3.0, -1.0, 2.9];
        assert_eq!(Sampler::new(SamplingOptions::default()).pick(&logits), 1);
        let tiny_p = SamplingOptions {
            temperature: 1.0,
            top_p: 0.0,
            seed: 9,
        };
        for _ in 0..20 {
            assert_eq!(
                Sampler::new(tiny_p).pick(&logits),
                1,
                "top_p 0 keeps only the best"
            );
        }
        let huge = [f32::MAX, 0.0, f32::MIN];
        let hot = SamplingOptions {
            temperature: 1e-30,
            top_p: 1.0,
            seed: 1,
        };
        assert_eq!(Sampler::new(hot).pick(&huge), 0);
    }

    #[test]
    fn sampling_is_reproducible_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let opts = SamplingOptions {
            temperature: 1.0,
            top_p: 1.0,
            seed: 42,
        };
        let draw = |seed| {
            let mut s = Sampler::new(SamplingOptions { seed, ..opts });
            (0..4000).map(|_| s.pick(&logits)).collect::<Vec<_>>()
        };
        let a = draw(42);
        assert_eq!(a, draw(42), "same seed, same tokens");
        assert_ne!(a, draw(43));
        assert!(!a.contains(&2), "zero probability is never drawn");
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!(
            (ones - 0.75).abs() < 0.03,
            "token 1 has p = 0.75, drawn {ones}"
        );
    }
}
