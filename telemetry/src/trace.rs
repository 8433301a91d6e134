//! W3C trace context (`traceparent`) carried from clients through the router to workers, in
//! HTTP headers and gRPC metadata, so one request's log lines (and, with OTLP on, its spans)
//! share a trace id across processes.

use rand::Rng;

pub const TRACEPARENT: &str = "traceparent";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of whatever this process does for the request.
    pub parent_id: [u8; 8],
    pub sampled: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl TraceContext {
    /// Parses `version-traceid-parentid-flags` (version 00; later versions' first four fields
    /// are read the same way, as the spec asks). All-zero ids are invalid.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let version = parts.next()?;
        if version.len() != 2 || version == "ff" {
            return None;
        }
        let trace_id = unhex::<16>(parts.next()?)?;
        let parent_id = unhex::<8>(parts.next()?)?;
        let flags = unhex::<1>(parts.next()?)?;
        if version == "00" && parts.next().is_some() {
            return None;
        }
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceContext { trace_id, parent_id, sampled: flags[0] & 1 == 1 })
    }

    /// A new trace, for a request that arrived without one.
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        TraceContext { trace_id: rng.random::<u128>().max(1).to_be_bytes(), parent_id: new_span_id(), sampled: true }
    }

    /// The context to hand the next hop: same trace, `span_id` as its parent.
    pub fn with_parent(&self, span_id: [u8; 8]) -> Self {
        TraceContext { parent_id: span_id, ..*self }
    }

    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.parent_id), u8::from(self.sampled))
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn from_metadata(m: &tonic::metadata::MetadataMap) -> Option<Self> {
        Self::parse(m.get(TRACEPARENT)?.to_str().ok()?)
    }

    pub fn to_metadata(&self, m: &mut tonic::metadata::MetadataMap) {
        if let Ok(v) = self.header().parse() {
            m.insert(TRACEPARENT, v);
        }
    }

    pub fn from_headers(h: &axum::http::HeaderMap) -> Option<Self> {
        Self::parse(h.get(TRACEPARENT)?.to_str().ok()?)
    }
}

pub fn new_span_id() -> [u8; 8] {
    rand::rng().random::<u64>().max(1).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_w3c_traceparent() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(h).unwrap();
        assert_eq!(c.header(), h);
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(c.sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?}");
        }
        // A future version with extra fields is read by its first four.
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x").is_some());
        let root = TraceContext::new_root();
        let next = root.with_parent(new_span_id());
        assert_eq!(TraceContext::parse(&next.header()), Some(next));
        assert_eq!(next.trace_id, root.trace_id);
    }
}
