//! What `fio-bench` writes: a markdown table with ratios to the baselines
//! and an SVG plot (IOPS and p99 latency per workload, one bar per target).

use std::fmt::Write;

use crate::suite::Result;

fn find<'a>(results: &'a [Result], target: &str, workload: &str) -> Option<&'a Result> {
    results
        .iter()
        .find(|r| r.target == target && r.workload == workload)
}

/// Returns the markdown table: one row per workload and target.
pub fn markdown(results: &[Result], workloads: &[&str], targets: &[String]) -> String {
    let mut out = String::from(
        "| workload | target | IOPS | MiB/s | mean µs | p50 µs | p99 µs | p99.9 µs | daemon cores | IOPS/daemon core | vs qemu-nbd | vs raw |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for workload in workloads {
        for target in targets {
            let Some(r) = find(results, target, workload) else {
                continue;
            };
            let ratio = |base: &str| {
                find(results, base, workload)
                    .filter(|b| b.iops > 0.0 && base != target)
                    .map_or("-".to_string(), |b| format!("{:.2}x", r.iops / b.iops))
            };
            let _ = writeln!(
                out,
                "| {workload} | {target} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
                r.iops,
                r.mib_per_sec,
                r.latency_us_mean,
                r.latency_us_p50,
                r.latency_us_p99,
                r.latency_us_p999,
                if r.daemon_cores > 0.0 {
                    format!("{:.2}", r.daemon_cores)
                } else {
                    "-".into()
                },
                if r.iops_per_daemon_core > 0.0 {
                    format!("{:.0}", r.iops_per_daemon_core)
                } else {
                    "-".into()
                },
                ratio("qemu-nbd"),
                ratio("raw"),
            );
        }
    }
    out
}

/// Reads one figure of a result.
type Metric = fn(&Result) -> f64;

const COLORS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
];

/// Returns an SVG with two panels: IOPS (log scale) and p99 latency (log
/// scale) per workload, one bar per target.
pub fn svg(results: &[Result], workloads: &[&str], targets: &[String]) -> String {
    let group_width = 28.0 * targets.len().max(1) as f64 + 24.0;
    let width = 90.0 + group_width * workloads.len() as f64;
    let panel_height = 260.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{:.0}" font-family="sans-serif" font-size="11">"#,
        2.0 * panel_height + 140.0
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let panels: [(&str, Metric); 2] = [
        ("IOPS (log scale)", |r| r.iops),
        ("p99 latency, µs (log scale)", |r| r.latency_us_p99),
    ];
    for (panel, (title, value)) in panels.iter().enumerate() {
        let top = 30.0 + panel as f64 * (panel_height + 50.0);
        let bottom = top + panel_height;
        let values: Vec<f64> = results.iter().map(value).filter(|v| *v > 0.0).collect();
        let max = values.iter().cloned().fold(1.0, f64::max).log10().ceil();
        let min = values
            .iter()
            .cloned()
            .fold(f64::MAX, f64::min)
            .log10()
            .floor()
            .min(max - 1.0);
        let scale = |v: f64| {
            let fraction = ((v.max(1e-9).log10() - min) / (max - min)).clamp(0.0, 1.0);
            bottom - fraction * panel_height
        };
        let _ = writeln!(
            out,
            r#"<text x="10" y="{:.0}" font-size="13" font-weight="bold">{title}</text>"#,
            top - 10.0
        );
        let mut decade = min;
        while decade <= max {
            let y = scale(10f64.powf(decade));
            let _ = writeln!(
                out,
                r##"<line x1="60" x2="{width:.0}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="55" y="{:.1}" text-anchor="end">1e{decade:.0}</text>"##,
                y + 4.0
            );
            decade += 1.0;
        }
        for (w, workload) in workloads.iter().enumerate() {
            let x0 = 70.0 + w as f64 * group_width;
            for (t, target) in targets.iter().enumerate() {
                let Some(r) = find(results, target, workload) else {
                    continue;
                };
                let y = scale(value(r));
                let _ = writeln!(
                    out,
                    r#"<rect x="{:.1}" y="{y:.1}" width="24" height="{:.1}" fill="{}"><title>{target} {workload}: {:.0}</title></rect>"#,
                    x0 + t as f64 * 28.0,
                    bottom - y,
                    COLORS[t % COLORS.len()],
                    value(r)
                );
            }
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{workload}</text>"#,
                x0 + group_width / 2.0 - 12.0,
                bottom + 14.0
            );
        }
    }
    let legend_y = 2.0 * panel_height + 120.0;
    for (t, target) in targets.iter().enumerate() {
        let x = 70.0 + t as f64 * 150.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x:.0}" y="{:.0}" width="12" height="12" fill="{}"/><text x="{:.0}" y="{:.0}">{target}</text>"#,
            legend_y - 10.0,
            COLORS[t % COLORS.len()],
            x + 16.0,
            legend_y
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(target: &str, workload: &str, iops: f64) -> Result {
        Result {
            target: target.into(),
            workload: workload.into(),
            iops,
            latency_us_p99: 100.0,
            ..Result::default()
        }
    }

    #[test]
    fn ratios_compare_with_the_baselines_of_the_same_workload() {
        let results = vec![
            result("raw", "w", 1000.0),
            result("qemu-nbd", "w", 500.0),
            result("basalt", "w", 250.0),
        ];
        let targets = vec!["raw".into(), "qemu-nbd".into(), "basalt".into()];
        let table = markdown(&results, &["w"], &targets);
        let basalt = table
            .lines()
            .find(|l| l.contains("| basalt |"))
            .unwrap_or_default();
        assert!(basalt.contains("| 0.50x | 0.25x |"), "{basalt}");
        let svg = svg(&results, &["w"], &targets);
        assert_eq!(
            svg.matches("<rect x=").count(),
            3 * 2 + 3,
            "bars and legend"
        );
    }
}
