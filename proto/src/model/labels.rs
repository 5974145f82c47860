//! The catalog's label sets (a service's, a workload's, a view endpoint's): a sorted list
//! rather than a map.

use std::collections::BTreeMap;

/// Labels sorted by key, each key once, in a slice of exactly their number.
///
/// A view holds one set per endpoint (and the registry's catalog one per workload), and a
/// `BTreeMap` allocates a node with room for eleven pairs (544 bytes of `String` headers)
/// for the one to three labels an endpoint usually has. The registry's views of 100,000 endpoints paid that for each, and so did
/// every proxy for each endpoint in its copy of the view. Lookups are a binary search.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Box<[(String, String)]>);

/// What a label selector is matched against: a set of [`Labels`], or a map (the VM agent's
/// own configuration keeps one).
pub trait LabelLookup {
    /// The value of label `key`, if set.
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelLookup for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl LabelLookup for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl Labels {
    /// The value of label `key`, if set.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Sets label `key` to `value`, returning the value it replaces. The slice is made
    /// again, one longer: for building a set, not for a hot path.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                let mut pairs = std::mem::take(&mut self.0).into_vec();
                pairs.insert(i, (key, value));
                self.0 = pairs.into_boxed_slice();
                None
            }
        }
    }

    pub fn clear(&mut self) {
        self.0 = Box::default();
    }

    /// The labels in key order.
    pub fn iter(&self) -> Iter<'_> {
        self.0.iter().map(as_refs)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The iterator of [`Labels::iter`]: pairs of references, as a map's iterator yields them.
pub type Iter<'a> = std::iter::Map<
    std::slice::Iter<'a, (String, String)>,
    fn(&(String, String)) -> (&String, &String),
>;

fn as_refs((k, v): &(String, String)) -> (&String, &String) {
    (k, v)
}

/// As a map's indexing: the value of a label that must be set (it panics otherwise).
impl std::ops::Index<&str> for Labels {
    type Output = String;

    fn index(&self, key: &str) -> &String {
        self.get(key).unwrap_or_else(|| panic!("no label {key:?}"))
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self(map.into_iter().collect())
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    fn from(map: &BTreeMap<String, String>) -> Self {
        Self(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

/// Collects as a map does: sorted by key, and of a key given twice the last value kept.
impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        pairs.into_iter().collect::<BTreeMap<_, _>>().into()
    }
}

impl IntoIterator for Labels {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_are_sorted_and_found_as_in_a_map() {
        let given = pairs(&[("version", "v1"), ("app", "web"), ("track", "canary")]);
        let labels: Labels = given.clone().into_iter().collect();
        let map: BTreeMap<String, String> = given.into_iter().collect();
        assert!(
            labels.iter().eq(map.iter()),
            "the same pairs in the same order"
        );
        for key in ["app", "track", "version", "absent", "", "zzz"] {
            assert_eq!(labels.get(key), map.get(key), "{key}");
            assert_eq!(labels.label(key), map.label(key), "{key}");
        }
        assert_eq!(labels.len(), 3);
        assert_eq!(Labels::from(&map), labels);
        assert_eq!(labels.into_iter().collect::<BTreeMap<_, _>>(), map);
    }

    #[test]
    fn a_key_given_twice_keeps_its_last_value() {
        let mut labels: Labels = pairs(&[("app", "a"), ("app", "b")]).into_iter().collect();
        assert_eq!(labels.get("app").map(String::as_str), Some("b"));
        assert_eq!(labels.len(), 1);
        assert_eq!(labels.insert("app".into(), "c".into()), Some("b".into()));
        assert_eq!(labels.insert("zone".into(), "z".into()), None);
        assert_eq!(labels.insert("tier".into(), "t".into()), None);
        assert_eq!(labels.insert("a".into(), "1".into()), None);
        let keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "app", "tier", "zone"]);
        assert_eq!(labels.get("app").map(String::as_str), Some("c"));
        assert!(Labels::default().is_empty());
        assert_eq!(Labels::default().get("app"), None);
    }
}
