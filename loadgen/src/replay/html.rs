//! The replay's HTML page: the day's table and two inline SVG charts (pickup-time
//! distributions of every mode, served rate by hour). No script, no external asset.

use std::fmt::Write;

use super::report::{BIN_S, BINS, Outcome};

const COLOURS: [&str; 6] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart: one polyline per series over `n` x positions, y from 0 to `ymax`.
fn chart(
    title: &str,
    xlabels: &[String],
    series: &[(String, Vec<f64>)],
    ymax: f64,
    ylabel: &str,
) -> String {
    let (w, h, l, b) = (720.0, 300.0, 50.0, 40.0);
    let n = xlabels.len().max(2);
    let x = |i: usize| l + (w - l - 10.0) * i as f64 / (n - 1) as f64;
    let y = |v: f64| h - b - (h - b - 20.0) * (v / ymax.max(1e-9)).min(1.0);
    let mut s = String::new();
    let _ = write!(
        s,
        "<h2>{}</h2><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-size=\"11\">",
        esc(title)
    );
    let _ = write!(
        s,
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#444\"/>",
        h - b,
        w - 10.0,
        h - b
    );
    let _ = write!(
        s,
        "<line x1=\"{l}\" y1=\"20\" x2=\"{l}\" y2=\"{}\" stroke=\"#444\"/>",
        h - b
    );
    for k in 0..=4 {
        let v = ymax * k as f64 / 4.0;
        let _ = write!(s, "<text x=\"4\" y=\"{:.1}\">{v:.0}</text>", y(v) + 4.0);
    }
    let _ = write!(s, "<text x=\"4\" y=\"12\">{}</text>", esc(ylabel));
    let step = (xlabels.len() / 12).max(1);
    for (i, lab) in xlabels.iter().enumerate().step_by(step) {
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x(i),
            h - b + 15.0,
            esc(lab)
        );
    }
    for (k, (name, vals)) in series.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        let pts: Vec<String> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        );
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{}</text>",
            w - 170.0,
            30 + 14 * k,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

pub fn page(outs: &[Outcome]) -> String {
    let mut s = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>dispatchd replay</title>\
         <style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}</style>\
         </head><body><h1>Replayed day: greedy against batched matching</h1>",
    );
    s.push_str("<table><tr><th>drivers</th><th>mode</th><th>requests</th><th>served %</th><th>pickup mean s</th><th>p50</th><th>p90</th><th>wait mean s</th><th>1st offer mean s</th><th>utilisation %</th><th>empty km</th></tr>");
    for o in outs {
        let d = &o.day;
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{:.1}</td><td>{:.1}</td><td>{:.0}</td></tr>",
            o.drivers,
            esc(&o.mode),
            d.requests,
            d.served_pct,
            d.pickup_s.mean,
            d.pickup_s.p50,
            d.pickup_s.p90,
            d.wait_s.mean,
            d.to_first_offer_s.mean,
            d.utilisation_pct,
            d.empty_km
        );
    }
    s.push_str("</table>");
    let bins: Vec<String> = (0..BINS)
        .map(|i| format!("{}", i as u64 * BIN_S / 60))
        .collect();
    let dists: Vec<(String, Vec<f64>)> = outs
        .iter()
        .map(|o| {
            let total = o.pickup_hist.iter().sum::<u64>().max(1) as f64;
            (
                o.mode.clone(),
                o.pickup_hist
                    .iter()
                    .map(|c| 100.0 * *c as f64 / total)
                    .collect(),
            )
        })
        .collect();
    let ymax = dists
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(1.0, f64::max);
    s.push_str(&chart(
        "Pickup time distribution (minutes, 30 s bins)",
        &bins,
        &dists,
        ymax,
        "% of pickups",
    ));
    let hours: Vec<String> = outs.first().map_or(Vec::new(), |o| {
        o.hours
            .iter()
            .map(|r| format!("{:02}", r.hour.unwrap_or(0)))
            .collect()
    });
    let served: Vec<(String, Vec<f64>)> = outs
        .iter()
        .map(|o| {
            (
                o.mode.clone(),
                o.hours.iter().map(|r| r.served_pct).collect(),
            )
        })
        .collect();
    s.push_str(&chart(
        "Served within the dispatch deadline, by hour of request",
        &hours,
        &served,
        100.0,
        "% served",
    ));
    s.push_str("</body></html>\n");
    s
}
