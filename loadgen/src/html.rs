//! `--html`: a standalone page (no scripts, no external files) with the report's numbers
//! and two inline SVG charts: latency over time and latency distribution.

use std::fmt::Write as _;

use crate::report::Report;

const COLORS: [(&str, &str); 4] = [
    ("request_to_dispatching", "#1f77b4"),
    ("request_to_offer", "#d62728"),
    ("request_to_assigned", "#2ca02c"),
    ("quote_rest", "#9467bd"),
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct Series {
    name: String,
    color: &'static str,
    dash: &'static str,
    points: Vec<(f64, f64)>,
}

/// A line chart with a log-scaled y axis (milliseconds).
fn chart(title: &str, x_label: &str, x_ticks: &[(f64, String)], series: &[Series]) -> String {
    let (w, h) = (980.0, 360.0);
    let (ml, mr, mt, mb) = (70.0, 250.0, 30.0, 45.0);
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        let y = y.max(0.001);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<text x="{}" y="18" font-size="14" font-weight="bold">{}</text>"#,
        ml,
        esc(title)
    );
    if x0 > x1 {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}">no samples</text></svg>"#,
            ml + 20.0,
            mt + 40.0
        );
        return s;
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let (ly0, ly1) = (
        y0.log10().floor(),
        y1.log10().ceil().max(y0.log10().floor() + 1.0),
    );
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + ph - (y.max(0.001).log10() - ly0) / (ly1 - ly0) * ph;
    let _ = write!(
        s,
        "<rect x=\"{ml}\" y=\"{mt}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>"
    );
    // Y grid: every power of ten, with 2 and 5 in between.
    let mut e = ly0 as i32;
    while e as f64 <= ly1 {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(e);
            if v.log10() < ly0 - 1e-9 || v.log10() > ly1 + 1e-9 {
                continue;
            }
            let y = sy(v);
            let label = if v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            };
            let _ = write!(
                s,
                "<line x1=\"{ml}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#{}\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
                ml + pw,
                if m == 1.0 { "ccc" } else { "eee" },
                ml - 6.0,
                y + 4.0
            );
        }
        e += 1;
    }
    for (x, label) in x_ticks {
        if *x < x0 - 1e-9 || *x > x1 + 1e-9 {
            continue;
        }
        let px = sx(*x);
        let _ = write!(
            s,
            "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{mt}\" y2=\"{}\" stroke=\"#eee\"/><text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            mt + ph,
            mt + ph + 16.0,
            esc(label)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        ml + pw / 2.0,
        h - 8.0,
        esc(x_label)
    );
    let _ = write!(
        s,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">ms (log scale)</text>"#,
        mt + ph / 2.0,
        mt + ph / 2.0
    );
    for (i, se) in series.iter().enumerate() {
        if se.points.is_empty() {
            continue;
        }
        let path: Vec<String> = se
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.6" stroke-dasharray="{}" points="{}"/>"#,
            se.color,
            se.dash,
            path.join(" ")
        );
        let ly = mt + 14.0 + i as f64 * 18.0;
        let lx = ml + pw + 12.0;
        let _ = write!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="2" stroke-dasharray="{}"/><text x="{}" y="{}">{}</text>"#,
            lx + 22.0,
            se.color,
            se.dash,
            lx + 28.0,
            ly + 4.0,
            esc(&se.name)
        );
    }
    s.push_str("</svg>");
    s
}

/// The whole page.
pub fn page(r: &Report) -> String {
    let mut over = Vec::new();
    for (name, color) in COLORS {
        let Some(pts) = r.latency_over_time.get(name) else {
            continue;
        };
        over.push(Series {
            name: format!("{name} p50"),
            color,
            dash: "",
            points: pts.iter().map(|p| (p.t_s as f64, p.p50_ms)).collect(),
        });
        over.push(Series {
            name: format!("{name} p99"),
            color,
            dash: "4 3",
            points: pts.iter().map(|p| (p.t_s as f64, p.p99_ms)).collect(),
        });
    }
    let max_t = r
        .latency_over_time
        .values()
        .flat_map(|v| v.iter().map(|p| p.t_s))
        .max()
        .unwrap_or(0);
    let step = ((max_t as f64 / 10.0).ceil() as i64).max(1);
    let time_ticks: Vec<(f64, String)> = (0..=max_t / step + 1)
        .map(|i| ((i * step) as f64, format!("{}", i * step)))
        .collect();
    let mut dist = Vec::new();
    for (name, color) in COLORS {
        if let Some(pts) = r.distribution.get(name) {
            dist.push(Series {
                name: name.to_owned(),
                color,
                dash: "",
                points: pts.clone(),
            });
        }
    }
    let nines: Vec<(f64, String)> = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
        .map(|(i, l)| (i as f64, l.to_string()))
        .collect();

    let mut h = String::new();
    h.push_str("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>loadgen report</title><style>body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.pass{color:#080;font-weight:bold}.fail{color:#b00;font-weight:bold}pre{background:#f8f8f8;padding:8px;white-space:pre-wrap}</style></head><body>");
    let _ = write!(
        h,
        "<h1>loadgen report: <span class=\"{}\">{}</span></h1>",
        if r.passed { "pass" } else { "fail" },
        if r.passed { "PASS" } else { "FAIL" }
    );
    let c = &r.config;
    let _ = write!(
        h,
        "<p>{} drivers, {} riders, {} for {:.0} s; pings every {} ms; seed {}; time scale {}; {} worker(s); demand: {}; server {}.</p>",
        c.drivers,
        c.riders,
        c.requests(),
        c.duration_s,
        c.ping_interval_ms,
        c.seed,
        c.time_scale,
        c.workers,
        esc(&c.demand),
        esc(&c.url)
    );
    h.push_str(
        "<h2>Checks</h2><table><tr><th>check</th><th>limit</th><th>value</th><th>result</th></tr>",
    );
    for ch in &r.checks {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
            esc(&ch.name),
            esc(&ch.limit),
            esc(&ch.value),
            if ch.passed { "pass" } else { "fail" },
            if ch.passed { "PASS" } else { "FAIL" }
        );
    }
    h.push_str("</table><h2>Latency</h2><table><tr><th>metric</th><th>count</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th></tr>");
    for (k, l) in &r.latency {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            esc(k),
            l.count,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms
        );
    }
    h.push_str("</table><ul>");
    for n in &r.latency_notes {
        let _ = write!(h, "<li>{}</li>", esc(n));
    }
    h.push_str("</ul>");
    h.push_str(&chart(
        "Latency over time (per second: p50 solid, p99 dashed)",
        "seconds since the run began",
        &time_ticks,
        &over,
    ));
    h.push_str("<br>");
    h.push_str(&chart(
        "Latency distribution (by percentile)",
        "percentile",
        &nines,
        &dist,
    ));
    if let Some(c) = r.cpu.server.as_ref().and_then(|sv| sv.capacity.as_ref()) {
        capacity(&mut h, c);
    }
    let _ = write!(h, "<h2>Full report</h2><pre>{}</pre>", esc(&r.text()));
    h.push_str("</body></html>\n");
    h
}

/// The capacity report: the steady window's costs and the projection to 1M drivers.
fn capacity(h: &mut String, c: &crate::capacity::Capacity) {
    let opt = |v: Option<f64>, digits: usize| v.map_or("?".into(), |v| format!("{v:.digits$}"));
    h.push_str("<h2>Capacity (steady window)</h2><table><tr><th>what</th><th>value</th></tr>");
    let rows = [
        ("window", format!("{:.1} s", c.window_s)),
        ("clients connected", c.clients.to_string()),
        ("server CPU", format!("{:.2} cores", c.server_cores)),
        ("pings", format!("{} ({:.0}/s)", c.pings, c.pings_per_s)),
        (
            "server CPU per ping",
            format!("{} µs", opt(c.cpu_us_per_ping, 1)),
        ),
        (
            "server CPU per request",
            format!("{} ms", opt(c.cpu_ms_per_request, 2)),
        ),
        ("server RSS", format!("{:.0} MiB", c.rss_mib)),
        (
            "RSS per client",
            format!("{} KiB", opt(c.rss_kib_per_client, 1)),
        ),
        (
            "RSS per client above the idle baseline",
            format!("{} KiB", opt(c.rss_kib_per_client_marginal, 1)),
        ),
    ];
    for (k, v) in rows {
        let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&v));
    }
    h.push_str("</table>");
    if let Some(p) = &c.projection {
        let _ = write!(h, "<p>Projection: {}</p>", esc(&p.arithmetic));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_self_contained_svg() {
        let s = chart(
            "t",
            "x",
            &[(0.0, "0".into()), (10.0, "10".into())],
            &[Series {
                name: "a<b".into(),
                color: "#000",
                dash: "",
                points: vec![(0.0, 0.5), (5.0, 12.0), (10.0, 300.0)],
            }],
        );
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains("polyline") && s.contains("a&lt;b"));
        assert!(!s.contains("NaN"));
        let empty = chart("t", "x", &[], &[]);
        assert!(empty.contains("no samples"));
    }
}
