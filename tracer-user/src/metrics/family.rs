//! Metric families whose label values come from a typed label set: the
//! label names and their order are written once, in the set's declaration,
//! and every call site names each value.

use std::marker::PhantomData;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    core::{Collector, MetricVec, MetricVecBuilder},
    proto::MetricFamily,
};

/// A set of label values, in the order of [`Self::NAMES`].
pub(crate) trait LabelSet {
    const NAMES: &'static [&'static str];
    /// Calls `f` with the values, in the order of [`Self::NAMES`].
    fn with<R>(&self, f: impl FnOnce(&[&str]) -> R) -> R;
}

/// The label set of a family, at any lifetime of its values.
pub(crate) trait Labels {
    type Of<'a>: LabelSet;
}

/// Declares a label set: a struct of `&str` fields whose names are the
/// label names, in order; `{ owner; ... }` begins with the owner's four
/// labels, given as one [`Owner`].
macro_rules! label_set {
    (@impl $name:ident [$($label:expr),+] $s:ident => [$($value:expr),+]) => {
        impl $crate::metrics::family::LabelSet for $name<'_> {
            const NAMES: &'static [&'static str] = &[$($label),+];

            fn with<R>(&self, f: impl FnOnce(&[&str]) -> R) -> R {
                let $s = self;
                f(&[$($value),+])
            }
        }

        impl $crate::metrics::family::Labels for $name<'static> {
            type Of<'a> = $name<'a>;
        }
    };
    ($(#[$doc:meta])* $name:ident { owner; $($field:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub(crate) struct $name<'a> {
            /// namespace, pod, container, role: the set's first four labels.
            pub(crate) owner: $crate::metrics::family::Owner<'a>,
            $(pub(crate) $field: &'a str),+
        }
        $crate::metrics::family::label_set!(
            @impl $name ["namespace", "pod", "container", "role", $(stringify!($field)),+]
            s => [s.owner.namespace, s.owner.pod, s.owner.container, s.owner.role, $(s.$field),+]
        );
    };
    ($(#[$doc:meta])* $name:ident { $($field:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub(crate) struct $name<'a> {
            $(pub(crate) $field: &'a str),+
        }
        $crate::metrics::family::label_set!(
            @impl $name [$(stringify!($field)),+] s => [$(s.$field),+]
        );
    };
}
pub(crate) use label_set;

/// The owner's labels, first in every per-owner label set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Owner<'a> {
    pub(crate) namespace: &'a str,
    pub(crate) pod: &'a str,
    pub(crate) container: &'a str,
    pub(crate) role: &'a str,
}

impl<'a> Owner<'a> {
    /// The labels of an attributed owner.
    pub(crate) fn of(a: &'a crate::owner::attribute::Attribution) -> Self {
        Self {
            namespace: &a.namespace,
            pod: &a.pod,
            container: &a.container,
            role: a.role.as_str(),
        }
    }
}

/// A family of metrics of kind `M`, labelled by the set `L`.
pub(crate) struct Family<L, M: MetricVecBuilder> {
    vec: MetricVec<M>,
    labels: PhantomData<L>,
}

/// The builder of a metric vector (prometheus does not export them by name).
pub(crate) trait Builder {
    type B: MetricVecBuilder;
}

impl<B: MetricVecBuilder> Builder for MetricVec<B> {
    type B = B;
}

pub(crate) type Counter<L> = Family<L, <IntCounterVec as Builder>::B>;
pub(crate) type Gauge<L> = Family<L, <IntGaugeVec as Builder>::B>;
pub(crate) type Histogram<L> = Family<L, <HistogramVec as Builder>::B>;

impl<L: Labels, M: MetricVecBuilder> Family<L, M> {
    /// The family of `vec`, registered in `r`.
    fn registered(r: &Registry, vec: MetricVec<M>) -> prometheus::Result<Self>
    where
        MetricVec<M>: Collector + Clone + 'static,
    {
        r.register(Box::new(vec.clone()))?;
        Ok(Self {
            vec,
            labels: PhantomData,
        })
    }

    /// The metric of these label values (created at 0 on first use).
    pub(crate) fn of(&self, labels: &L::Of<'_>) -> M::M {
        labels.with(|values| self.vec.with_label_values(values))
    }

    /// Removes every series.
    pub(crate) fn reset(&self) {
        self.vec.reset();
    }

    /// Removes the series whose labels (name -> value) satisfy `belongs`;
    /// returns how many.
    pub(crate) fn remove_where(
        &self,
        belongs: &dyn Fn(&std::collections::HashMap<&str, &str>) -> bool,
    ) -> usize {
        let mut removed = 0;
        for family in self.collect() {
            for metric in family.get_metric() {
                let labels: std::collections::HashMap<&str, &str> = metric
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                if belongs(&labels) && self.vec.remove(&labels).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// A copy of every series.
    pub(crate) fn collect(&self) -> Vec<MetricFamily> {
        self.vec.collect()
    }
}

impl<L: Labels> Counter<L> {
    pub(crate) fn register(r: &Registry, name: &str, help: &str) -> prometheus::Result<Self> {
        Self::registered(r, IntCounterVec::new(Opts::new(name, help), L::Of::NAMES)?)
    }

    pub(crate) fn inc(&self, labels: &L::Of<'_>) {
        self.of(labels).inc();
    }
}

impl<L: Labels> Gauge<L> {
    pub(crate) fn register(r: &Registry, name: &str, help: &str) -> prometheus::Result<Self> {
        Self::registered(r, IntGaugeVec::new(Opts::new(name, help), L::Of::NAMES)?)
    }

    pub(crate) fn set(&self, labels: &L::Of<'_>, v: i64) {
        self.of(labels).set(v);
    }
}

impl<L: Labels> Histogram<L> {
    pub(crate) fn register(
        r: &Registry,
        name: &str,
        help: &str,
        buckets: &[f64],
    ) -> prometheus::Result<Self> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        Self::registered(r, HistogramVec::new(opts, L::Of::NAMES)?)
    }

    pub(crate) fn observe(&self, labels: &L::Of<'_>, v: f64) {
        self.of(labels).observe(v);
    }
}

/// Registers a metric without labels and returns it.
pub(crate) fn plain<C: Collector + Clone + 'static>(
    r: &Registry,
    metric: prometheus::Result<C>,
) -> prometheus::Result<C> {
    let metric = metric?;
    r.register(Box::new(metric.clone()))?;
    Ok(metric)
}
