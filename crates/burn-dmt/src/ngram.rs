//! The n-gram floor: a bigram model with interpolated absolute discounting
//! (Ney, Essen and Kneser 1994; the interpolated form of Chen and Goodman
//! 1999), counted on the training tokens and scored on held-out text, so a
//! neural model's figures can be read against what counting alone gives.
//!
//! `P(w | v) = max(c(v, w) − D, 0) / c(v) + D · N₁₊(v ·) / c(v) · P₁(w)`,
//! with `D = n₁ / (n₁ + 2 n₂)` from the counts of bigrams seen once and
//! twice, and the unigram `P₁(w) = (c(w) + 1) / (N + V)` (add-one, so every
//! token of the vocabulary has a probability); a context never seen falls
//! back to `P₁`.

use std::collections::HashMap;

use crate::train::Window;
use crate::{DmtError, Result};

/// A bigram model with interpolated absolute discounting.
#[derive(Clone, Debug)]
pub struct Bigram {
    vocab: usize,
    discount: f64,
    unigram: Vec<u64>,
    total: u64,
    /// Per context: its count, the number of distinct followers, and the
    /// followers' counts.
    contexts: HashMap<u32, (u64, u64, HashMap<u32, u64>)>,
}

impl Bigram {
    /// Counts `tokens` (ids below `vocab`).
    pub fn fit(tokens: &[u32], vocab: usize) -> Result<Self> {
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(DmtError::TokenOutOfRange { id: t, vocab });
        }
        let mut unigram = vec![0u64; vocab];
        for &t in tokens {
            unigram[t as usize] += 1;
        }
        let mut contexts: HashMap<u32, (u64, u64, HashMap<u32, u64>)> = HashMap::new();
        for w in tokens.windows(2) {
            let e = contexts.entry(w[0]).or_default();
            e.0 += 1;
            *e.2.entry(w[1]).or_default() += 1;
        }
        let (mut n1, mut n2) = (0u64, 0u64);
        for e in contexts.values_mut() {
            e.1 = e.2.len() as u64;
            for &c in e.2.values() {
                n1 += (c == 1) as u64;
                n2 += (c == 2) as u64;
            }
        }
        let discount = if n1 + n2 == 0 {
            0.5
        } else {
            n1 as f64 / (n1 + 2 * n2) as f64
        };
        Ok(Bigram {
            vocab,
            discount,
            unigram,
            total: tokens.len() as u64,
            contexts,
        })
    }

    /// The discount `D`.
    pub fn discount(&self) -> f64 {
        self.discount
    }

    /// `P(w | v)`.
    pub fn prob(&self, v: u32, w: u32) -> f64 {
        let p1 =
            (self.unigram.get(w as usize).copied().unwrap_or(0) + 1) as f64 / (self.total + self.vocab as u64) as f64;
        match self.contexts.get(&v) {
            None => p1,
            Some((cv, followers, next)) => {
                let c = next.get(&w).copied().unwrap_or(0) as f64;
                let cv = *cv as f64;
                (c - self.discount).max(0.0) / cv + self.discount * *followers as f64 / cv * p1
            }
        }
    }

    /// Mean cross-entropy (nats per token) of the next tokens of `windows`
    /// (each target given the input token before it, as a bigram sees it).
    pub fn cross_entropy(&self, windows: &[Window]) -> Result<f64> {
        let (mut nll, mut n) = (0.0f64, 0usize);
        for w in windows {
            for (&v, &t) in w.inputs.iter().zip(&w.targets) {
                nll -= self.prob(v as u32, t as u32).ln();
                n += 1;
            }
        }
        if n == 0 {
            return Err(DmtError::InvalidArgument("no held-out text to evaluate".into()));
        }
        Ok(nll / n as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_sum_to_one_and_follow_the_counts() {
        let tokens = [0u32, 1, 2, 1, 2, 1, 3, 0, 1, 2];
        let m = Bigram::fit(&tokens, 5).unwrap();
        for v in 0..5u32 {
            let sum: f64 = (0..5u32).map(|w| m.prob(v, w)).sum();
            assert!((sum - 1.0).abs() < 1e-12, "context {v} sums to {sum}");
        }
        // After 1 comes 2 three times and 3 once.
        assert!(m.prob(1, 2) > m.prob(1, 3) && m.prob(1, 3) > m.prob(1, 4));
        // An unseen context falls back to the add-one unigram.
        assert!((m.prob(4, 1) - 5.0 / 15.0).abs() < 1e-12);
        assert!(Bigram::fit(&[7], 5).is_err());
    }
}
