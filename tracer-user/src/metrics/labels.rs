//! The caps that keep every open-ended label bounded.

use std::collections::HashSet;

/// Caps the distinct values of one label: the first `max` values pass,
/// later new ones fold into "other".
#[derive(Debug)]
pub(crate) struct LabelCap {
    seen: HashSet<String>,
    max: usize,
    /// Values folded into "other" so far.
    pub overflowed: u64,
}

pub(crate) const OTHER: &str = "other";

impl LabelCap {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            seen: HashSet::new(),
            max,
            overflowed: 0,
        }
    }

    /// The value to use for `value`.
    pub(crate) fn admit(&mut self, value: String) -> String {
        if self.seen.contains(&value) {
            return value;
        }
        if self.seen.len() < self.max {
            self.seen.insert(value.clone());
            return value;
        }
        self.overflowed += 1;
        OTHER.to_string()
    }

    /// Frees `value`'s place (a deleted pod's peer name): a later value can
    /// take it. Returns whether it was admitted.
    pub(crate) fn forget(&mut self, value: &str) -> bool {
        self.seen.remove(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_folds_new_values_into_other() {
        let mut cap = LabelCap::new(2);
        assert_eq!(cap.admit("a".into()), "a");
        assert_eq!(cap.admit("b".into()), "b");
        assert_eq!(cap.admit("c".into()), OTHER);
        assert_eq!(cap.admit("a".into()), "a", "known values keep passing");
        assert_eq!(cap.overflowed, 1);
    }
}
