//! Prometheus text exposition over HTTP: `GET /metrics` renders a registry (after a refresh hook
//! that copies snapshot values, e.g. engine stats, into gauges).

use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Something that can be scraped.
pub trait Scrape: Send + Sync + 'static {
    /// Prometheus text format.
    fn render(&self) -> String;
}

pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes `registry` in the Prometheus text format 0.0.4. prometheus-client writes OpenMetrics,
/// which differs in three ways fixed here: no `# EOF` trailer or `# UNIT` lines, and a counter's
/// HELP/TYPE name carries its `_total` suffix as its samples do.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        return String::new();
    }
    let counters: std::collections::HashSet<&str> =
        out.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut text = String::with_capacity(out.len() + 16 * counters.len());
    for line in out.lines().filter(|l| *l != "# EOF" && !l.starts_with("# UNIT ")) {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{tag}{name}_total {tail}"))
        });
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

/// Longest label value kept; longer ones are cut (with `...`) so no value can bloat a scrape.
pub const MAX_LABEL_LEN: usize = 128;

/// A label value safe to expose: backslash, double quote and newline escaped as the text format
/// requires (prometheus-client writes values as they are), at most [`MAX_LABEL_LEN`] characters.
/// Every label value that did not come from a fixed set goes through here.
pub fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(MAX_LABEL_LEN + 8));
    for (i, c) in value.chars().enumerate() {
        if i == MAX_LABEL_LEN {
            out.push_str("...");
            break;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The `/metrics` route, to merge into an existing axum app.
pub fn route<S: Clone + Send + Sync + 'static>(source: Arc<dyn Scrape>) -> axum::Router<S> {
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let source = source.clone();
            async move { ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], source.render()).into_response() }
        }),
    )
}

/// Serves `/metrics` alone on `listener` until `cancel`.
pub async fn serve(listener: TcpListener, source: Arc<dyn Scrape>, cancel: CancellationToken) {
    let app: axum::Router = route(source);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await {
        tracing::error!(error = %e, "metrics server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;

    #[test]
    fn prometheus_text_format() {
        let mut r = Registry::with_prefix("x");
        let c: Counter = Counter::default();
        c.inc();
        r.register("hits", "Hits", c);
        r.register("depth", "Depth", Gauge::<i64>::default());
        r.register("h", "Latency", crate::AtomicHistogram::new([1.0]));
        let text = render(&r);
        assert!(text.contains("# HELP x_hits_total Hits.\n# TYPE x_hits_total counter\nx_hits_total 1\n"), "{text}");
        assert!(text.contains("# TYPE x_depth gauge\nx_depth 0\n"), "{text}");
        assert!(text.contains("x_h_bucket{le=\"+Inf\"} 0"), "{text}");
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn label_values_are_escaped_and_bounded() {
        assert_eq!(label("qwen2.5-7b"), "qwen2.5-7b");
        assert_eq!(label("a\"b\\c\nd\re"), "a\\\"b\\\\c\\nd e");
        assert_eq!(label(&"x".repeat(10_000)).len(), MAX_LABEL_LEN + 3);
    }
}
