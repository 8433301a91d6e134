//! The etcd key layout, all of it. Everything lives under one versioned prefix so a cluster can
//! share etcd with other users and a future layout can sit beside this one.

use crate::{ClusterError, Result};

pub const PREFIX: &str = "/qwen-serve/v1";

/// A validated group name: a tensor-parallel group of ranks that serves as one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupName(String);

impl GroupName {
    /// Lowercase letters, digits, `-`, `_` and `.`, 1 to 128 characters: safe inside a key.
    pub fn new(name: &str) -> Result<Self> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
        if ok {
            Ok(GroupName(name.to_string()))
        } else {
            Err(ClusterError::Invalid(format!("group name {name:?}: use 1-128 of a-z, 0-9, '-', '_', '.'")))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Everything one group keeps.
pub fn group_prefix(group: &GroupName) -> String {
    format!("{PREFIX}/groups/{}/", group.as_str())
}

/// Where rank 0 publishes how to reach it.
pub fn rendezvous(group: &GroupName) -> String {
    format!("{}rendezvous", group_prefix(group))
}

/// Every serving group's registration: the router discovers workers by listing and watching this.
pub fn workers_prefix() -> String {
    format!("{PREFIX}/workers/")
}

/// Where a group registers itself for routing. One key per group, so a group's registration
/// is a single leased record that vanishes with rank 0.
pub fn worker(group: &GroupName) -> String {
    format!("{}{}", workers_prefix(), group.as_str())
}

/// The group whose registration `key` is: `None` for anything else under (or outside) the
/// workers prefix, e.g. a nested key or an invalid name someone wrote by hand.
pub fn worker_group(key: &str) -> Option<GroupName> {
    GroupName::new(key.strip_prefix(&workers_prefix())?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_names() {
        let g = GroupName::new("qwen-72b.g0").unwrap();
        assert_eq!(rendezvous(&g), "/qwen-serve/v1/groups/qwen-72b.g0/rendezvous");
        assert!(rendezvous(&g).starts_with(&group_prefix(&g)));
        for bad in ["", "A", "a/b", "a b", &"x".repeat(129)] {
            assert!(GroupName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn worker_keys() {
        let g = GroupName::new("qwen-72b.g0").unwrap();
        assert_eq!(workers_prefix(), "/qwen-serve/v1/workers/");
        assert_eq!(worker(&g), "/qwen-serve/v1/workers/qwen-72b.g0");
        assert_eq!(worker_group(&worker(&g)), Some(g.clone()));
        for other in ["/qwen-serve/v1/workers/", "/qwen-serve/v1/workers/a/b", "/elsewhere/g", &rendezvous(&g)] {
            assert_eq!(worker_group(other), None, "{other:?}");
        }
        // A prefix watch on the workers must not see a group's other keys, nor they its.
        assert!(!group_prefix(&g).starts_with(&workers_prefix()));
        assert!(!worker(&g).starts_with(&group_prefix(&g)));
    }
}
