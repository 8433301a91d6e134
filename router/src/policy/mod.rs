//! Routing policies: which worker group serves a request. One file per policy behind [`Policy`];
//! `--policy` parses into [`PolicyKind`] and [`build`] makes the policy.

use std::sync::Arc;

mod cache_aware;
mod least_load;
mod power_of_two;
mod prefix_tree;
mod round_robin;
mod session;

pub use cache_aware::{CacheAware, CacheAwareConfig};
pub use least_load::LeastLoad;
pub use power_of_two::PowerOfTwo;
pub use prefix_tree::PrefixTree;
pub use round_robin::RoundRobin;
pub use session::SessionAffinity;

/// What a policy knows about one candidate group when it picks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Requests the router has open on the group right now (always fresh).
    pub in_flight: usize,
    /// From the group's last Stats: sequences running and waiting in its engine.
    pub running: u32,
    pub waiting: u32,
}

impl Load {
    /// One number to compare groups by. `in_flight` overlaps with `running + waiting` once Stats
    /// catch up; counting both weighs the fresh router-side view double, which is what we want
    /// between Stats reports.
    pub fn score(&self) -> usize {
        self.in_flight.saturating_add(self.running as usize).saturating_add(self.waiting as usize)
    }
}

/// One healthy group serving the requested model.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The group's name (stable across reconnects; the key policies remember groups by).
    pub group: Arc<str>,
    pub load: Load,
}

/// The parts of a request a policy may look at.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// The prompt as token ids (after the chat template).
    pub tokens: &'a [u32],
    /// Client-supplied affinity key (gRPC `session_key`, HTTP `user` or the `x-session-key` header).
    pub session_key: Option<&'a str>,
}

pub trait Policy: Send + Sync {
    fn name(&self) -> &'static str;
    /// Index into `candidates`, which is never empty.
    fn pick(&self, request: &RouteRequest<'_>, candidates: &[Candidate]) -> usize;
    /// The group left the pool: forget what is kept about it.
    fn remove_group(&self, _group: &str) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyKind {
    RoundRobin,
    LeastLoad,
    PowerOfTwo,
    CacheAware,
    Session,
}

/// Everything [`build`] needs; the fields a policy does not use are ignored.
#[derive(Debug, Clone, Copy)]
pub struct PolicyConfig {
    pub kind: PolicyKind,
    pub cache: CacheAwareConfig,
    /// Session affinity: a group takes a keyed request only while its load stays within this
    /// multiple of the average (values below 1 act as 1, which would otherwise leave no group).
    pub session_load_factor: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig { kind: PolicyKind::CacheAware, cache: CacheAwareConfig::default(), session_load_factor: 1.25 }
    }
}

pub fn build(cfg: &PolicyConfig) -> Box<dyn Policy> {
    match cfg.kind {
        PolicyKind::RoundRobin => Box::new(RoundRobin::new()),
        PolicyKind::LeastLoad => Box::new(LeastLoad::new()),
        PolicyKind::PowerOfTwo => Box::new(PowerOfTwo::new()),
        PolicyKind::CacheAware => Box::new(CacheAware::new(cfg.cache)),
        PolicyKind::Session => Box::new(SessionAffinity::new(cfg.session_load_factor)),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::{Candidate, Load};

    /// Candidates `g0..gN` whose score is the given number (all of it as `in_flight`).
    pub fn candidates(scores: &[usize]) -> Vec<Candidate> {
        scores
            .iter()
            .enumerate()
            .map(|(i, &s)| Candidate {
                group: format!("g{i}").into(),
                load: Load { in_flight: s, running: 0, waiting: 0 },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_adds_everything_without_overflow() {
        assert_eq!(Load { in_flight: 3, running: 4, waiting: 5 }.score(), 12);
        assert_eq!(Load { in_flight: usize::MAX, running: 1, waiting: 1 }.score(), usize::MAX);
    }

    #[test]
    fn build_makes_each_kind() {
        let cases = [
            (PolicyKind::RoundRobin, "round-robin"),
            (PolicyKind::LeastLoad, "least-load"),
            (PolicyKind::PowerOfTwo, "power-of-two"),
            (PolicyKind::CacheAware, "cache-aware"),
            (PolicyKind::Session, "session"),
        ];
        let cands = test_util::candidates(&[1, 0, 2]);
        let req = RouteRequest { tokens: &[1, 2, 3], session_key: Some("k") };
        for (kind, name) in cases {
            let policy = build(&PolicyConfig { kind, ..PolicyConfig::default() });
            assert_eq!(policy.name(), name);
            assert!(policy.pick(&req, &cands) < cands.len());
            policy.remove_group("g1");
        }
    }
}
