//! Predicted prefill time, for the `aic` prefill load model (`--router-prefill-load-model aic`,
//! spec §5 "AIS/AIC prefill-load model").
//!
//! With the model on, a worker's oldest active prefill does not weigh its full uncached tokens
//! until its first token arrives: its weight decays linearly over its *predicted* prefill time
//! (see [`crate::sequences`]). The prediction is a per-step polynomial, the shape of the engines'
//! timing (Dynamo mocker `perf_model.rs`, spec §15.2):
//!
//! `step_ms(T) = a + b·T + c·T²`, `T` = new tokens computed in one step,
//!
//! and a prompt of `n` uncached tokens is prefilled in chunks of at most the worker's
//! `max_num_batched_tokens` (`C`), so
//!
//! `prefill_ms(n) = a·k + b·n + c·Σ chunk²`, `k = ⌈n / C⌉` chunks.
//!
//! The coefficients are given (`--router-prefill-time-coefficients A,B,C`, in ms, ms/token,
//! ms/token²; the mocker's are `16.50142,0.01518344,4.209989e-7`) or fitted online from observed
//! TTFTs: a request that found no other prefill booked on its worker is a clean sample of
//! `prefill_ms`, and the three coefficients are its exponentially weighted least-squares fit.
//! Dynamo computes the prediction with AIConfigurator's perf database (`--ais-*`), which needs the
//! GPU's profile; this is the same decay with a model anyone can give or learn.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a worker's active prefill tokens count (`--router-prefill-load-model`,
/// `DYN_ROUTER_PREFILL_LOAD_MODEL`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefillLoadModel {
    /// A request's uncached tokens count in full until its first token (the reference default).
    #[default]
    None,
    /// The oldest active prefill on a worker decays linearly over its predicted prefill time.
    /// `ais` (the reference's current name) is accepted.
    #[serde(alias = "ais")]
    Aic,
}

impl FromStr for PrefillLoadModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "aic" | "ais" => Ok(Self::Aic),
            _ => Err(format!(
                "unknown prefill load model {s:?}: expected none or aic (ais)"
            )),
        }
    }
}

impl fmt::Display for PrefillLoadModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Aic => "aic",
        })
    }
}

/// `step_ms(T) = base_ms + per_token_ms·T + per_token2_ms·T²`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefillCoefficients {
    pub base_ms: f64,
    pub per_token_ms: f64,
    pub per_token2_ms: f64,
}

impl PrefillCoefficients {
    /// The mock engine's polynomial (spec §15.2), at speedup 1.
    pub const MOCKER: PrefillCoefficients = PrefillCoefficients {
        base_ms: 16.50142,
        per_token_ms: 1.518344e-2,
        per_token2_ms: 4.209989e-7,
    };

    /// Predicted milliseconds to prefill `tokens` uncached tokens in chunks of at most `chunk`
    /// tokens (`None` or 0: one step).
    pub fn prefill_ms(&self, tokens: u64, chunk: Option<u64>) -> f64 {
        let [k, n, sq] = features(tokens, chunk);
        self.base_ms * k + self.per_token_ms * n + self.per_token2_ms * sq
    }
}

impl FromStr for PrefillCoefficients {
    type Err = String;
    /// `"A,B,C"`: base ms, ms per token, ms per token², each finite and ≥ 0.
    fn from_str(s: &str) -> Result<Self, String> {
        let v: Vec<f64> = s
            .split(',')
            .map(|p| p.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("prefill time coefficients {s:?}: {e}"))?;
        match v[..] {
            [a, b, c] if v.iter().all(|x| x.is_finite() && *x >= 0.0) => Ok(Self {
                base_ms: a,
                per_token_ms: b,
                per_token2_ms: c,
            }),
            _ => Err(format!(
                "prefill time coefficients {s:?}: expected three numbers ≥ 0, \"A,B,C\" (ms, ms/token, ms/token²)"
            )),
        }
    }
}

impl fmt::Display for PrefillCoefficients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},{},{}",
            self.base_ms, self.per_token_ms, self.per_token2_ms
        )
    }
}

/// `[chunks, tokens, Σ chunk²]` of a prefill of `tokens` in chunks of `chunk`.
fn features(tokens: u64, chunk: Option<u64>) -> [f64; 3] {
    if tokens == 0 {
        return [0.0; 3];
    }
    let c = chunk.filter(|c| *c > 0).unwrap_or(tokens).min(tokens);
    let full = tokens / c;
    let rest = tokens % c;
    let k = full + u64::from(rest > 0);
    let sq = full as f64 * (c as f64).powi(2) + (rest as f64).powi(2);
    [k as f64, tokens as f64, sq]
}

/// Samples before a fitted model predicts anything.
pub const MIN_SAMPLES: u32 = 8;
/// Weight kept per new sample (an effective memory of ~200 samples).
const FORGET: f64 = 0.995;
/// Feature scales so the normal equations stay well conditioned: chunks, kilo-tokens,
/// mega-tokens².
const SCALE: [f64; 3] = [1.0, 1e-3, 1e-6];

/// Exponentially weighted least squares over `[chunks, tokens, Σ chunk²] → ms`.
#[derive(Clone, Debug, Default, PartialEq)]
struct OnlineFit {
    xtx: [[f64; 3]; 3],
    xty: [f64; 3],
    samples: u32,
    fitted: Option<PrefillCoefficients>,
}

impl OnlineFit {
    fn observe(&mut self, x: [f64; 3], ms: f64) {
        let x = [x[0] * SCALE[0], x[1] * SCALE[1], x[2] * SCALE[2]];
        for i in 0..3 {
            self.xty[i] = FORGET * self.xty[i] + x[i] * ms;
            for j in 0..3 {
                self.xtx[i][j] = FORGET * self.xtx[i][j] + x[i] * x[j];
            }
        }
        self.samples = self.samples.saturating_add(1);
        if self.samples >= MIN_SAMPLES {
            self.fitted = self.solve().or(self.fitted);
        }
    }

    /// The full model when its coefficients are all ≥ 0, else the best of the nested models
    /// with fewer terms (a few samples of similar sizes cannot separate the three).
    fn solve(&self) -> Option<PrefillCoefficients> {
        const SUBSETS: [&[usize]; 5] = [&[0, 1, 2], &[0, 1], &[1, 2], &[1], &[0]];
        for subset in SUBSETS {
            if let Some(beta) = solve_subset(&self.xtx, &self.xty, subset) {
                let mut c = [0.0; 3];
                for (k, &i) in subset.iter().enumerate() {
                    c[i] = beta[k] * SCALE[i];
                }
                if c.iter().all(|v| v.is_finite() && *v >= 0.0) && c.iter().any(|v| *v > 0.0) {
                    return Some(PrefillCoefficients {
                        base_ms: c[0],
                        per_token_ms: c[1],
                        per_token2_ms: c[2],
                    });
                }
            }
        }
        None
    }
}

/// Least squares restricted to the features in `subset`: Gaussian elimination with partial
/// pivoting on the normal equations; `None` when they are singular.
fn solve_subset(xtx: &[[f64; 3]; 3], xty: &[f64; 3], subset: &[usize]) -> Option<Vec<f64>> {
    let n = subset.len();
    let mut a: Vec<Vec<f64>> = subset
        .iter()
        .map(|&i| {
            let mut row: Vec<f64> = subset.iter().map(|&j| xtx[i][j]).collect();
            row.push(xty[i]);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        let scale = a.iter().map(|r| r[col].abs()).fold(0.0, f64::max);
        if a[pivot][col].abs() <= 1e-9 * scale.max(1e-300) {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..n).map(|i| a[i][n] / a[i][i]).collect())
}

/// The prediction in use: given coefficients, or the online fit once it has enough samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefillTimeModel {
    given: Option<PrefillCoefficients>,
    fit: OnlineFit,
}

impl PrefillTimeModel {
    /// `given`: fixed coefficients (observations are then ignored); `None` to fit online.
    pub fn new(given: Option<PrefillCoefficients>) -> Self {
        Self {
            given,
            fit: OnlineFit::default(),
        }
    }

    /// The coefficients predictions use now (`None` until an online fit has
    /// [`MIN_SAMPLES`] samples).
    pub fn coefficients(&self) -> Option<PrefillCoefficients> {
        self.given.or(self.fit.fitted)
    }

    /// Predicted prefill time of `tokens` uncached tokens on a worker stepping `chunk` tokens at
    /// most; `None` when nothing is known yet or there is nothing to prefill.
    pub fn predict(&self, tokens: u64, chunk: Option<u64>) -> Option<Duration> {
        if tokens == 0 {
            return None;
        }
        let ms = self.coefficients()?.prefill_ms(tokens, chunk);
        (ms.is_finite() && ms > 0.0).then(|| Duration::from_secs_f64(ms / 1e3))
    }

    /// A clean sample: `tokens` uncached tokens took `elapsed` from routing to first token on a
    /// worker with no other prefill booked. Ignored with given coefficients.
    pub fn observe(&mut self, tokens: u64, chunk: Option<u64>, elapsed: Duration) {
        if self.given.is_some() || tokens == 0 {
            return;
        }
        let ms = elapsed.as_secs_f64() * 1e3;
        if ms.is_finite() && ms > 0.0 {
            self.fit.observe(features(tokens, chunk), ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_prefill_sums_its_steps() {
        let m = PrefillCoefficients::MOCKER;
        // One step: the mocker's polynomial (4096 tokens → 85.75 ms, spec §15.2).
        assert!((m.prefill_ms(4096, None) - 85.75).abs() < 0.05);
        // 10,000 tokens in steps of 4096: 4096 + 4096 + 1808.
        let want = 2.0 * m.prefill_ms(4096, None) + m.prefill_ms(1808, None);
        assert!((m.prefill_ms(10_000, Some(4096)) - want).abs() < 1e-9);
        assert_eq!(m.prefill_ms(0, Some(4096)), 0.0);
        assert_eq!(features(100, Some(0)), [1.0, 100.0, 10_000.0]);
    }

    #[test]
    fn coefficients_parse_and_refuse_nonsense() {
        let c: PrefillCoefficients = "16.5, 0.0152, 4.2e-7".parse().unwrap();
        assert_eq!(c.per_token2_ms, 4.2e-7);
        for bad in ["1,2", "1,2,3,4", "1,-2,3", "a,b,c", "1,NaN,3", ""] {
            assert!(bad.parse::<PrefillCoefficients>().is_err(), "{bad}");
        }
        assert_eq!("AIS".parse::<PrefillLoadModel>(), Ok(PrefillLoadModel::Aic));
        assert!("fast".parse::<PrefillLoadModel>().is_err());
    }

    #[test]
    fn the_online_fit_recovers_the_engine_polynomial() {
        let truth = PrefillCoefficients::MOCKER;
        let mut m = PrefillTimeModel::new(None);
        assert_eq!(m.predict(1000, None), None, "nothing known yet");
        let chunk = Some(8192);
        for i in 0..200u64 {
            let n = 200 + (i * 7919) % 30_000;
            let ms = truth.prefill_ms(n, chunk);
            m.observe(n, chunk, Duration::from_secs_f64(ms / 1e3));
        }
        let c = m.coefficients().unwrap();
        for n in [500, 4000, 16_000, 40_000] {
            let (got, want) = (c.prefill_ms(n, chunk), truth.prefill_ms(n, chunk));
            assert!((got - want).abs() / want < 0.01, "{n}: {got} vs {want}");
        }
    }

    #[test]
    fn a_fit_of_one_prompt_size_still_predicts_that_size() {
        // Every sample the same size: the full model is singular; a nested one answers.
        let mut m = PrefillTimeModel::new(None);
        for _ in 0..MIN_SAMPLES {
            m.observe(2048, None, Duration::from_millis(50));
        }
        let p = m.predict(2048, None).unwrap().as_secs_f64() * 1e3;
        assert!((p - 50.0).abs() < 0.5, "{p}");
    }

    #[test]
    fn given_coefficients_win_and_ignore_samples() {
        let mut m = PrefillTimeModel::new(Some(PrefillCoefficients::MOCKER));
        for _ in 0..50 {
            m.observe(1000, None, Duration::from_secs(9));
        }
        let p = m.predict(4096, None).unwrap().as_secs_f64() * 1e3;
        assert!((p - 85.75).abs() < 0.05);
        assert_eq!(m.predict(0, None), None);
    }
}
