//! Summary statistics of repeated measurements.

/// Median, spread and mean of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Sample standard deviation (0 for fewer than two samples).
    pub stddev: f64,
}

impl Summary {
    /// `None` for no samples; NaNs are ignored.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Some(Self {
            n,
            median: percentile_sorted(&v, 50.0),
            mean,
            min: v[0],
            max: v[n - 1],
            stddev: var.sqrt(),
        })
    }
}

/// The `p`-th percentile (0-100) of sorted samples, interpolating linearly
/// between closest ranks.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = p.clamp(0.0, 100.0) / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// The `p`-th percentile of unsorted samples.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, p)
}

/// Least-squares slope of y over x (`None` with fewer than two distinct x).
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn summary_of_odd_and_even_counts() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!(s.n, 3);
        assert!(close(s.median, 2.0) && close(s.mean, 2.0));
        assert!(close(s.min, 1.0) && close(s.max, 3.0));
        assert!(close(s.stddev, 1.0));
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert!(close(s.median, 2.5));
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[f64::NAN]).is_none());
        let one = Summary::of(&[7.0]).unwrap();
        assert!(close(one.median, 7.0) && close(one.stddev, 0.0));
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = [10.0, 20.0, 30.0, 40.0, 50.0];
        assert!(close(percentile(&v, 0.0), 10.0));
        assert!(close(percentile(&v, 100.0), 50.0));
        assert!(close(percentile(&v, 50.0), 30.0));
        assert!(close(percentile(&v, 95.0), 48.0));
        assert!(close(percentile(&[5.0, 1.0], 50.0), 3.0));
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn slope_of_a_line_and_degenerate_inputs() {
        let pts = [(1.0, 3.0), (2.0, 5.0), (4.0, 9.0)];
        assert!(close(slope(&pts).unwrap(), 2.0));
        assert!(slope(&[(1.0, 1.0)]).is_none());
        assert!(slope(&[(1.0, 1.0), (1.0, 2.0)]).is_none());
    }
}
