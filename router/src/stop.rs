//! Stop strings over streamed text: text that could still turn into a stop string is held back,
//! so a client never sees part of a stop string, and a match ends generation at once.

pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received and not yet released.
    held: String,
}

/// What to do after a piece of text arrived.
#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    /// Text safe to send now.
    pub release: String,
    /// A stop string matched: `release` ends right before it and generation should stop.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    pub fn push(&mut self, piece: &str) -> Step {
        if self.stops.is_empty() {
            return Step { release: piece.to_string(), stopped: false };
        }
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let release = self.held[..at].to_string();
            self.held.clear();
            return Step { release, stopped: true };
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let release = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        Step { release, stopped: false }
    }

    /// Generation ended without a match: whatever was held back is plain text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let step = m.push(p);
            out.push_str(&step.release);
            if step.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stops_across_pieces_and_holds_back_prefixes() {
        assert_eq!(run(&["END"], &["hello E", "N", "D more"]), ("hello ".into(), true));
        assert_eq!(run(&["END"], &["hello E", "x"]), ("hello Ex".into(), false));
        assert_eq!(run(&["END"], &["trailing EN"]), ("trailing EN".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["", "b"], &["a", "b"]), ("a".into(), true));
        // The earliest of several matches wins.
        assert_eq!(run(&["cd", "bcd"], &["abcd"]), ("a".into(), true));
        // Multi-byte characters are never split.
        assert_eq!(run(&["世界!"], &["你好世", "界?"]), ("你好世界?".into(), false));
        assert_eq!(run(&["界"], &["你好世界"]), ("你好世".into(), true));
    }

    #[test]
    fn held_text_is_released_as_soon_as_it_cannot_match() {
        let mut m = StopMatcher::new(vec!["###".into()]);
        assert_eq!(m.push("a#").release, "a");
        assert_eq!(m.push("#b").release, "##b");
    }
}
