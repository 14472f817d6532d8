//! The rule of `connection_imbalance`: the long-lived connections this
//! node's clients hold to one Service port concentrate on few of its ready
//! backends. Pure: the caller counts the connections per backend.

use std::collections::BTreeMap;

/// Fewer long-lived connections than this say nothing about balance.
pub(crate) const MIN_CONNECTIONS: u64 = 20;

/// How unlikely the busiest backend's share must be if every connection
/// had picked a ready backend uniformly at random (kube-proxy's and most
/// resolvers' choice), over all backends: a few connections over many
/// backends are uneven by chance alone, and that is no finding.
const CHANCE: f64 = 1e-3;

/// What the rule saw, for the finding's evidence.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Imbalance {
    /// Long-lived connections over all ready backends.
    pub total: u64,
    pub mean: f64,
    /// The busiest backend and its connections.
    pub busiest: String,
    pub max: u64,
    /// `max / mean`.
    pub factor: f64,
    /// The chance that uniform random picks put `max` or more on one of
    /// the backends (a bound: the binomial tail times the backends).
    pub chance_if_random: f64,
}

/// The imbalance of `per_backend` (every ready backend of one Service
/// port, those with 0 connections included) when `max / mean` is at least
/// `factor`, with at least [`MIN_CONNECTIONS`] connections over at least
/// two backends, and the busiest backend's count is one random picks
/// would give with a chance below 0.1 %.
pub(crate) fn imbalance(per_backend: &BTreeMap<String, u64>, factor: f64) -> Option<Imbalance> {
    let backends = per_backend.len();
    if backends < 2 {
        return None;
    }
    let total: u64 = per_backend.values().sum();
    if total < MIN_CONNECTIONS {
        return None;
    }
    let (busiest, &max) = per_backend.iter().max_by_key(|(_, n)| **n)?;
    #[expect(
        clippy::cast_precision_loss,
        reason = "connection and backend counts are far below 2^52"
    )]
    let (mean, k, n, m) = (
        total as f64 / backends as f64,
        backends as f64,
        total as f64,
        max as f64,
    );
    let observed = m / mean;
    if observed < factor {
        return None;
    }
    let chance = (binomial_tail(n, m, 1.0 / k) * k).min(1.0);
    (chance < CHANCE).then(|| Imbalance {
        total,
        mean,
        busiest: busiest.clone(),
        max,
        factor: observed,
        chance_if_random: chance,
    })
}

/// P(X >= at_least) for X ~ Binomial(trials, p), summed in log space
/// (millions of trials stay finite).
fn binomial_tail(trials: f64, at_least: f64, p: f64) -> f64 {
    if at_least <= 0.0 {
        return 1.0;
    }
    // ln C(trials, at_least), then each next term from the one before.
    let mut ln_choose = 0.0;
    let mut i = 1.0;
    while i <= at_least {
        ln_choose += ((trials - at_least + i) / i).ln();
        i += 1.0;
    }
    let (ln_p, ln_q) = (p.ln(), (1.0 - p).ln());
    let mut sum = 0.0;
    let mut hits = at_least;
    while hits <= trials {
        sum += (ln_choose + hits * ln_p + (trials - hits) * ln_q).exp();
        ln_choose += ((trials - hits) / (hits + 1.0)).ln();
        hits += 1.0;
    }
    sum.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(counts: &[u64]) -> BTreeMap<String, u64> {
        counts
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("shop/grpc-{i}"), *n))
            .collect()
    }

    #[test]
    fn twenty_of_twenty_four_on_one_of_three_backends_is_an_imbalance() {
        let found = imbalance(&spread(&[20, 2, 2]), 2.0).expect("an imbalance");
        assert_eq!((found.total, found.max), (24, 20));
        assert_eq!(found.busiest, "shop/grpc-0");
        assert!((found.mean - 8.0).abs() < 1e-9);
        assert!((found.factor - 2.5).abs() < 1e-9);
        assert!(found.chance_if_random < 1e-5, "{found:?}");
        assert_eq!(imbalance(&spread(&[8, 8, 8]), 2.0), None, "balanced");
        assert_eq!(imbalance(&spread(&[20, 2, 2]), 3.0), None, "below 3");
    }

    #[test]
    fn fewer_than_twenty_connections_or_one_backend_is_no_finding() {
        assert_eq!(imbalance(&spread(&[19, 0, 0]), 2.0), None);
        assert!(imbalance(&spread(&[20, 0, 0]), 2.0).is_some());
        assert_eq!(imbalance(&spread(&[500]), 1.0), None, "one backend");
        assert_eq!(imbalance(&spread(&[]), 1.0), None);
    }

    #[test]
    fn backends_with_no_connection_count_in_the_mean() {
        // 24 over 6 backends: mean 4, not 12 (the two that have some).
        let found = imbalance(&spread(&[14, 10, 0, 0, 0, 0]), 2.0).expect("an imbalance");
        assert!((found.mean - 4.0).abs() < 1e-9);
        assert!((found.factor - 3.5).abs() < 1e-9);
        // Two backends, all on one: max/mean is 2 at most, and reaches it.
        assert!(imbalance(&spread(&[30, 0]), 2.0).is_some());
    }

    #[test]
    fn the_unevenness_of_random_picks_is_no_finding() {
        // 20 connections over 10 backends, 5 on one: max/mean 2.5, and
        // uniform random picks do that about half the time.
        let mut c = [2u64; 10];
        c[0] = 5;
        c[1] = 0;
        c[2] = 1;
        assert_eq!(imbalance(&spread(&c), 2.0), None);
        // The same factor with 10 times the connections is no chance.
        let c: Vec<u64> = c.iter().map(|n| n * 10).collect();
        assert!(imbalance(&spread(&c), 2.0).is_some());
    }

    #[test]
    fn the_binomial_tail_is_right() {
        assert!((binomial_tail(10.0, 0.0, 0.5) - 1.0).abs() < 1e-12);
        assert!((binomial_tail(2.0, 1.0, 0.5) - 0.75).abs() < 1e-12);
        assert!((binomial_tail(3.0, 3.0, 0.5) - 0.125).abs() < 1e-12);
        let big = binomial_tail(1e6, 5e5, 0.5);
        assert!((0.49..0.51).contains(&big), "{big}");
    }
}
