//! The step plan rank 0 broadcasts to the other ranks of a tensor-parallel group each step:
//! which tokens, which sequence chunks, which KV blocks. Followers run the same forward on their
//! shards; only rank 0 schedules and samples. Encoded as little-endian integers: a handful of
//! bytes per token, no schema to drift.

use crate::error::{Error, Result};
use crate::model::SeqChunk;

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Run this forward.
    Step(StepPlan),
    /// Nothing to run; proves rank 0 is alive so idle followers do not time out.
    Heartbeat,
    /// The group is shutting down.
    Stop,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    pub tokens: Vec<u32>,
    pub chunks: Vec<SeqChunk>,
    pub tables: Vec<Vec<u32>>,
}

impl StepPlan {
    /// The bytes of `Message::Step(self)`, without giving the plan up.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![STEP];
        put_u32s(&mut out, &self.tokens);
        put(&mut out, self.chunks.len() as u64);
        for (c, table) in self.chunks.iter().zip(&self.tables) {
            put(&mut out, c.seq_id);
            put(&mut out, c.context_len as u64);
            put(&mut out, c.len as u64);
            put(&mut out, c.rope_alpha.to_bits());
            put_u32s(&mut out, table);
        }
        out
    }
}

const STEP: u8 = 1;
const HEARTBEAT: u8 = 2;
const STOP: u8 = 3;

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Message::Heartbeat => out.push(HEARTBEAT),
            Message::Stop => out.push(STOP),
            Message::Step(p) => return p.encode(),
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { bytes, at: 0 };
        match r.u8()? {
            HEARTBEAT => Ok(Message::Heartbeat),
            STOP => Ok(Message::Stop),
            STEP => {
                let tokens = r.u32s()?;
                let n = r.u64()? as usize;
                let mut chunks = Vec::with_capacity(n.min(1 << 16));
                let mut tables = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    chunks.push(SeqChunk {
                        seq_id: r.u64()?,
                        context_len: r.u64()? as usize,
                        len: r.u64()? as usize,
                        rope_alpha: f64::from_bits(r.u64()?),
                    });
                    tables.push(r.u32s()?);
                }
                Ok(Message::Step(StepPlan { tokens, chunks, tables }))
            }
            other => Err(malformed(format!("unknown message kind {other}"))),
        }
    }
}

fn malformed(message: String) -> Error {
    Error::InvalidInput { field: "step_plan", message }
}

fn put(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32s(out: &mut Vec<u8>, vs: &[u32]) {
    put(out, vs.len() as u64);
    for v in vs {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| malformed(format!("truncated at byte {}", self.at)))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn u32s(&mut self) -> Result<Vec<u32>> {
        let n = self.u64()? as usize;
        let b = self.take(n.checked_mul(4).ok_or_else(|| malformed("length overflow".into()))?)?;
        Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let plan = Message::Step(StepPlan {
            tokens: vec![1, 2, 3, 4],
            chunks: vec![
                SeqChunk { seq_id: 7, context_len: 0, len: 3, rope_alpha: 1.0 },
                SeqChunk { seq_id: 9, context_len: 40, len: 1, rope_alpha: 3.0 },
            ],
            tables: vec![vec![0, 5], vec![2, 3, 4]],
        });
        for m in [plan, Message::Heartbeat, Message::Stop] {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
        let bytes = Message::Step(StepPlan { tokens: vec![1], chunks: vec![], tables: vec![] }).encode();
        assert!(Message::decode(&bytes[..bytes.len() - 2]).is_err());
        assert!(Message::decode(&[42]).is_err());
        assert!(Message::decode(&[]).is_err());
    }
}
