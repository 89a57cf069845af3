//! The chart: grouped bars of IOPS and p99 latency per job and target,
//! written as plain SVG text (no plotting crate: a few rectangles suffice).
//!
//! Each job gets its own panel with its own linear scale, because figures
//! differ by orders of magnitude between 4k QD1 and 1M QD8; values are
//! printed on the bars so panels are never compared by bar height alone.
//! A whisker on each bar shows the spread (min..max) over repetitions.

use std::fmt::Write as _;

use crate::report::{Figure, RunRecord};

const PALETTE: [&str; 16] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#1f3b73", "#a0522d", "#2e8b57", "#8b008b", "#b8860b", "#4682b4",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the chart of `rec`.
pub fn chart(rec: &RunRecord) -> String {
    let targets: Vec<&str> = rec
        .targets
        .iter()
        .filter(|t| t.skipped.is_none())
        .map(|t| t.name.as_str())
        .collect();
    let rows = [
        (Figure::Iops, "IOPS (higher is better)"),
        (Figure::P99, "p99 total latency (lower is better)"),
    ];
    let slot = 30.0;
    let panel_w = (slot * targets.len().max(1) as f64 + 40.0).max(190.0);
    let panel_h = 230.0;
    let (left, top) = (20.0, 90.0);
    let width = left * 2.0 + panel_w * rec.jobs.len().max(1) as f64;
    let height = top + panel_h * rows.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"##
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="22" font-size="15" font-weight="bold">mirrorblk vs peers through fio (nbd engine), {} s × {} run(s), median with min..max whiskers</text>"##,
        rec.settings.runtime_s, rec.settings.repeat
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="40" fill="#555">{} · {} CPUs · kernel {} · load before {}</text>"##,
        esc(&rec.started_utc),
        rec.machine.nproc,
        esc(&rec.machine.kernel),
        esc(&rec.machine.load_before)
    );
    // Legend.
    let mut x = left;
    for (i, t) in targets.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let _ = writeln!(
            s,
            r##"<rect x="{x}" y="54" width="12" height="12" fill="{c}"/><text x="{}" y="64">{}</text>"##,
            x + 16.0,
            esc(t)
        );
        x += 24.0 + 7.0 * t.len() as f64;
    }
    for (ri, (fig, title)) in rows.iter().enumerate() {
        let y0 = top + panel_h * ri as f64;
        let _ = writeln!(
            s,
            r##"<text x="{left}" y="{}" font-size="13" font-weight="bold">{}</text>"##,
            y0 + 4.0,
            esc(title)
        );
        for (ji, job) in rec.jobs.iter().enumerate() {
            let x0 = left + panel_w * ji as f64;
            // Bars occupy [base - plot_h, base]; the space above is for labels.
            let base = y0 + panel_h - 40.0;
            let plot_h = panel_h - 110.0;
            let vals: Vec<Option<(f64, f64, f64)>> = targets
                .iter()
                .map(|t| {
                    rec.cells
                        .iter()
                        .find(|c| c.job == job.name && c.target == *t)
                        .and_then(|c| c.summary.get(fig.key()))
                        .map(|sm| (sm.median, sm.min, sm.max))
                })
                .collect();
            let max = vals
                .iter()
                .flatten()
                .map(|v| v.2)
                .fold(0.0_f64, f64::max)
                .max(f64::MIN_POSITIVE);
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{base}" x2="{}" y2="{base}" stroke="#333"/><text x="{}" y="{}" text-anchor="middle">{}</text>"##,
                x0 + panel_w - 20.0,
                x0 + (panel_w - 20.0) / 2.0,
                base + 16.0,
                esc(job.name)
            );
            for (ti, v) in vals.iter().enumerate() {
                let bx = x0 + 10.0 + slot * ti as f64;
                let c = PALETTE[ti % PALETTE.len()];
                let Some((med, lo, hi)) = v else {
                    let _ = writeln!(
                        s,
                        r##"<text x="{}" y="{}" font-size="9" text-anchor="middle" fill="#999">n/a</text>"##,
                        bx + slot / 2.0 - 2.0,
                        base - 4.0
                    );
                    continue;
                };
                let h = med / max * plot_h;
                let _ = writeln!(
                    s,
                    r##"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{c}"><title>{} {}: {}</title></rect>"##,
                    base - h,
                    slot - 6.0,
                    esc(targets[ti]),
                    esc(job.name),
                    esc(&fig.format(*med))
                );
                let cx = bx + (slot - 6.0) / 2.0;
                if hi > lo {
                    let (ylo, yhi) = (base - lo / max * plot_h, base - hi / max * plot_h);
                    let _ = writeln!(
                        s,
                        r##"<path d="M{cx:.1} {ylo:.1}V{yhi:.1}M{:.1} {ylo:.1}h6M{:.1} {yhi:.1}h6" stroke="#222" fill="none"/>"##,
                        cx - 3.0,
                        cx - 3.0
                    );
                }
                // Rotated so long labels ("12.3 ms") fit over narrow bars.
                let ty = base - h.max(hi / max * plot_h) - 4.0;
                let _ = writeln!(
                    s,
                    r##"<text transform="translate({:.1},{ty:.1}) rotate(-90)" font-size="9">{}</text>"##,
                    cx + 3.0,
                    esc(&fig.format(*med))
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}
