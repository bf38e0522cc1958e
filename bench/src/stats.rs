//! Medians and spread of a handful of repetitions.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// (max - min) / median, in percent: with 3-5 repetitions on a shared machine the
    /// whole range says more than a standard deviation.
    pub spread_pct: f64,
    pub p10: f64,
    pub p90: f64,
}

/// Nearest-rank percentile of sorted data.
fn percentile(sorted: &[f64], pct: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((pct / 100.0) * (sorted.len() - 1) as f64).round();
    let index = (rank.max(0.0) as usize).min(sorted.len() - 1);
    sorted.get(index).copied().unwrap_or(f64::NAN)
}

pub fn summarize(values: &[f64]) -> Summary {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted.get(n / 2).copied().unwrap_or(f64::NAN),
        _ => {
            let a = sorted.get(n / 2 - 1).copied().unwrap_or(f64::NAN);
            let b = sorted.get(n / 2).copied().unwrap_or(f64::NAN);
            (a + b) / 2.0
        }
    };
    let min = sorted.first().copied().unwrap_or(f64::NAN);
    let max = sorted.last().copied().unwrap_or(f64::NAN);
    let spread_pct = if median != 0.0 {
        (max - min) / median * 100.0
    } else {
        0.0
    };
    Summary {
        n,
        median,
        min,
        max,
        spread_pct,
        p10: percentile(&sorted, 10.0),
        p90: percentile(&sorted, 90.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even_medians() {
        let s = summarize(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert!((s.spread_pct - 100.0).abs() < 1e-9);
        assert_eq!(summarize(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }

    #[test]
    fn percentiles_of_a_range() {
        let values: Vec<f64> = (0..=100).map(f64::from).collect();
        let s = summarize(&values);
        assert_eq!((s.p10, s.p90, s.median), (10.0, 90.0, 50.0));
        assert!(summarize(&[]).median.is_nan());
    }
}
