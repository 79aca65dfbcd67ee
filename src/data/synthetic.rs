//! The built-in synthetic corpus: deterministic by seed, learnable by a small model.
//!
//! Token ids: 0 pad, 1 BOS, 2 EOS, 3 reserved, content tokens in [4, V).
//! A document of drawn length L (>= 2) is BOS, L - 2 body tokens, EOS. The body is
//! - a first-order Markov chain over content tokens: the first token is uniform, then each
//!   token has 4 successors (fixed by the seed) taken with probabilities 0.70, 0.15, 0.10, 0.05
//!   (entropy ~0.91 nats, far below ln V);
//! - with probability 0.3 at each position once 16 body tokens exist, a copy of a random
//!   earlier span (4..=16 tokens, cut at the end of the body) of the same document instead,
//!   so attention to earlier tokens (induction) pays off.
//!
//! Every token is a label. Randomness comes from `ChaCha8Rng` seeded with the config seed, on
//! separate streams: lengths (0), the transition table (1), document i's content (2 + i). So
//! lengths never depend on content or vocabulary, and documents can be generated in parallel.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};
use rayon::prelude::*;

use super::limits::{synthetic_origin, Limits};
use super::{DataError, Document};
use crate::config::{LengthDistribution, SyntheticConfig};

pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
/// The first content token id.
pub const FIRST_CONTENT: u32 = 4;

const LENGTH_STREAM: u64 = 0;
const TABLE_STREAM: u64 = 1;
const FIRST_DOC_STREAM: u64 = 2;

/// Successors per token and their probabilities in percent.
const SUCCESSOR_PERCENT: [u32; 4] = [70, 15, 10, 5];
/// Body tokens that must exist before a copy may start.
const COPY_AFTER: usize = 16;
const COPY_PROBABILITY: f64 = 0.3;
const COPY_MIN: usize = 4;
const COPY_MAX: usize = 16;
/// Documents generated in parallel at a time.
const CHUNK_DOCS: usize = 1024;

fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// The lengths of the synthetic corpus's first `n` documents (before `data.max_doc_tokens`
/// applies), drawn from `cfg.lengths` and clipped to [max(min_len, 2), max_len]. Generates no
/// tokens: cheap for millions of documents.
pub fn synthetic_lengths(cfg: &SyntheticConfig, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = rng(seed, LENGTH_STREAM);
    let lo = cfg.min_len.max(2) as f64;
    let hi = (cfg.max_len as f64).max(lo).min(u32::MAX as f64);
    let clip = |x: f64| {
        if x.is_nan() {
            lo as u32
        } else {
            x.round().clamp(lo, hi) as u32
        }
    };
    let fixed = || vec![clip(cfg.median_len); n];
    match cfg.lengths {
        LengthDistribution::LogNormal => {
            match LogNormal::new(cfg.median_len.ln(), cfg.sigma.max(0.0)) {
                Ok(d) => (0..n).map(|_| clip(d.sample(&mut rng))).collect(),
                Err(_) => fixed(),
            }
        }
        LengthDistribution::Uniform => {
            let (lo, hi) = (lo as u32, hi as u32);
            (0..n).map(|_| rng.random_range(lo..=hi)).collect()
        }
        LengthDistribution::Fixed => fixed(),
    }
}

/// The fixed sparse transition table: 4 distinct successors per content token.
struct Markov {
    vocab: u32,
    successors: Vec<[u32; 4]>,
}

impl Markov {
    fn new(vocab: u32, seed: u64) -> Self {
        let mut rng = rng(seed, TABLE_STREAM);
        let successors = (FIRST_CONTENT..vocab)
            .map(|_| {
                let mut next = [0u32; 4];
                let mut k = 0;
                while k < 4 {
                    let t = rng.random_range(FIRST_CONTENT..vocab);
                    if !next[..k].contains(&t) {
                        next[k] = t;
                        k += 1;
                    }
                }
                next
            })
            .collect();
        Self { vocab, successors }
    }

    fn first(&self, rng: &mut ChaCha8Rng) -> u32 {
        rng.random_range(FIRST_CONTENT..self.vocab)
    }

    fn next(&self, prev: u32, rng: &mut ChaCha8Rng) -> u32 {
        let mut r = rng.random_range(0..100u32);
        let succ = &self.successors[(prev - FIRST_CONTENT) as usize];
        for (k, &p) in SUCCESSOR_PERCENT.iter().enumerate() {
            if r < p {
                return succ[k];
            }
            r -= p;
        }
        succ[3]
    }

    /// Synthetic document `i` of `len` tokens (BOS, body, EOS).
    fn document(&self, i: usize, len: usize, seed: u64) -> Vec<u32> {
        let mut rng = rng(seed, FIRST_DOC_STREAM.wrapping_add(i as u64));
        let body_len = len.saturating_sub(2);
        let mut tokens = Vec::with_capacity(body_len + 2);
        tokens.push(BOS);
        if body_len > 0 {
            tokens.push(self.first(&mut rng));
        }
        // `p` body tokens exist; body token j is tokens[1 + j].
        let mut p = tokens.len() - 1;
        while p < body_len {
            if p >= COPY_AFTER && rng.random_bool(COPY_PROBABILITY) {
                let k = rng.random_range(COPY_MIN..=COPY_MAX).min(body_len - p);
                let start = rng.random_range(0..=p - k);
                tokens.extend_from_within(1 + start..1 + start + k);
                p += k;
            } else {
                let prev = tokens[p];
                tokens.push(self.next(prev, &mut rng));
                p += 1;
            }
        }
        tokens.push(EOS);
        tokens
    }
}

/// Generate the corpus of `cfg` into `limits`, in document order.
pub(crate) fn generate(
    cfg: &SyntheticConfig,
    vocab: usize,
    seed: u64,
    limits: &mut Limits,
) -> Result<(), DataError> {
    let min_vocab = FIRST_CONTENT as usize + 4;
    if vocab < min_vocab || vocab > u32::MAX as usize {
        return Err(DataError::Synthetic {
            message: format!(
                "model.vocab_size = {vocab} must be in [{min_vocab}, {}] \
                 (4 special ids, then at least 4 content tokens)",
                u32::MAX
            ),
        });
    }
    let markov = Markov::new(vocab as u32, seed);
    let lengths = synthetic_lengths(cfg, cfg.num_docs, seed);
    for (c, chunk) in lengths.chunks(CHUNK_DOCS).enumerate() {
        let first = c * CHUNK_DOCS;
        let docs: Vec<Vec<u32>> = chunk
            .par_iter()
            .enumerate()
            .map(|(j, &len)| markov.document(first + j, len as usize, seed))
            .collect();
        for (j, tokens) in docs.into_iter().enumerate() {
            limits.push(Document::new(tokens), synthetic_origin(first + j))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LongDocuments;
    use crate::data::TokenStore;

    fn cfg(lengths: LengthDistribution, num_docs: usize) -> SyntheticConfig {
        SyntheticConfig {
            num_docs,
            lengths,
            ..SyntheticConfig::default()
        }
    }

    fn corpus(cfg: &SyntheticConfig, vocab: usize, seed: u64) -> TokenStore {
        let mut limits = Limits::new(1 << 20, LongDocuments::Split, vocab);
        generate(cfg, vocab, seed, &mut limits).unwrap();
        limits.finish().unwrap()
    }

    fn quantile(sorted: &[u32], q: f64) -> f64 {
        sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64
    }

    #[test]
    fn corpus_is_deterministic_by_seed() {
        let c = cfg(LengthDistribution::LogNormal, 300);
        let (a, b) = (corpus(&c, 512, 7), corpus(&c, 512, 7));
        assert_eq!(a.lengths(), b.lengths());
        for i in 0..a.num_docs() {
            assert_eq!(a.tokens(i), b.tokens(i), "doc {i}");
        }
        let other = corpus(&c, 512, 8);
        assert_ne!(a.tokens(0), other.tokens(0));
    }

    #[test]
    fn corpus_uses_the_published_lengths_which_ignore_vocab() {
        let c = cfg(LengthDistribution::LogNormal, 500);
        let s = corpus(&c, 512, 3);
        assert_eq!(s.lengths(), synthetic_lengths(&c, 500, 3));
        assert_eq!(corpus(&c, 64, 3).lengths(), s.lengths());
        // A prefix of the lengths is the lengths of a smaller corpus.
        assert_eq!(synthetic_lengths(&c, 100, 3)[..], s.lengths()[..100]);
    }

    #[test]
    fn lognormal_lengths_have_the_configured_median_and_spread() {
        let c = cfg(LengthDistribution::LogNormal, 10_000);
        let mut l = synthetic_lengths(&c, 10_000, 1234);
        l.sort_unstable();
        let median = quantile(&l, 0.5);
        assert!(
            (median / c.median_len - 1.0).abs() < 0.03,
            "median {median}"
        );
        // Quartiles of a log-normal sit at median * exp(±0.6745 sigma).
        let q3 = quantile(&l, 0.75);
        let want = c.median_len * (0.6745 * c.sigma).exp();
        assert!((q3 / want - 1.0).abs() < 0.05, "q3 {q3} want {want}");
        assert!(l[0] as usize >= c.min_len && *l.last().unwrap() as usize <= c.max_len);
    }

    #[test]
    fn a_million_lengths_are_cheap() {
        let c = SyntheticConfig::default();
        let t = std::time::Instant::now();
        let l = synthetic_lengths(&c, 1_000_000, 1);
        assert_eq!(l.len(), 1_000_000);
        // Generous bound (debug builds, a busy machine): no tokens are generated.
        assert!(t.elapsed().as_secs_f64() < 5.0, "{:?}", t.elapsed());
    }

    #[test]
    fn uniform_and_fixed_lengths() {
        let mut c = cfg(LengthDistribution::Uniform, 10_000);
        c.min_len = 10;
        c.max_len = 30;
        let l = synthetic_lengths(&c, 10_000, 5);
        assert!(l.iter().all(|&x| (10..=30).contains(&x)));
        assert!(l.contains(&10) && l.contains(&30));
        let mean = l.iter().map(|&x| x as f64).sum::<f64>() / l.len() as f64;
        assert!((mean - 20.0).abs() < 0.3, "mean {mean}");

        c.lengths = LengthDistribution::Fixed;
        c.median_len = 17.4;
        assert_eq!(synthetic_lengths(&c, 3, 5), vec![17, 17, 17]);
        c.median_len = 1.0; // clipped up to min_len
        assert_eq!(synthetic_lengths(&c, 1, 5), vec![10]);
    }

    #[test]
    fn documents_have_bos_content_eos() {
        let mut c = cfg(LengthDistribution::Uniform, 200);
        c.min_len = 2;
        c.max_len = 80;
        let s = corpus(&c, 40, 9);
        for i in 0..s.num_docs() {
            let t = s.tokens(i);
            assert_eq!((t[0], t[t.len() - 1]), (BOS, EOS), "doc {i}");
            assert!(t[1..t.len() - 1].iter().all(|&x| (4..40).contains(&x)));
            assert!((0..t.len()).all(|j| s.is_label(i, j)));
        }
    }

    #[test]
    fn body_follows_the_chain_and_copies_earlier_spans() {
        let markov = Markov::new(512, 11);
        let (mut follow, mut pairs, mut copied) = (0, 0, 0);
        for i in 0..50 {
            let t = markov.document(i, 600, 11);
            assert_eq!(t.len(), 600);
            let body = &t[1..t.len() - 1];
            for w in body.windows(2) {
                pairs += 1;
                follow += markov.successors[(w[0] - 4) as usize].contains(&w[1]) as usize;
            }
            // A 4-gram seen earlier in the body marks a copy (chance repeats are rare at V = 512).
            for j in 20..body.len() - 4 {
                let g = &body[j..j + 4];
                copied += body[..j + 3].windows(4).any(|h| h == g) as usize;
            }
        }
        // Chain steps always follow; copy boundaries rarely do.
        assert!(follow as f64 / pairs as f64 > 0.8, "{follow}/{pairs}");
        assert!(copied as f64 / (50.0 * 574.0) > 0.5, "copied {copied}");
    }
}
