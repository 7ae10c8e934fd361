//! `bench_real scale`: E elections × 3 contenders, one pool at a time (lease-exec, then
//! client-go), default timings, for each E of `--points` (1, 10, 50, 150 by default: up to 450
//! contenders). Per point, after every election has a leader and a settling time, one window of
//! `--scale-window` seconds (180 by default) measures the API server's CPU seconds per minute (from
//! its process) and its RSS, Lease requests per minute by verb (`apiserver_request_total`), the
//! API server's Lease writes and reads to etcd per minute (`etcd_requests_total`), and the
//! contenders' total RSS; then 20 graceful handoffs on one more election, at that load. A baseline
//! window with no contender comes first. The table is printed, and drawn (API server CPU and
//! requests per minute against contenders, both pools) as an SVG with `plotters`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{Bench, Handoff, Journal, NS, Tool, cluster, footprint, handoff_on, kill_matching};

pub struct Point {
    pub tool: Option<Tool>,
    pub elections: usize,
    pub contenders: usize,
    /// API server CPU seconds per minute.
    pub cpu_per_min: f64,
    /// API server RSS at the end of the window, MiB.
    pub rss_mib: f64,
    /// Lease requests per minute by verb.
    pub requests: BTreeMap<String, f64>,
    /// The API server's Lease writes (create + update) and reads to etcd, per minute.
    pub etcd_writes: f64,
    pub etcd_reads: f64,
    /// The contenders' total RSS, MiB (lease-exec or the client-go contender, not the workers).
    pub contenders_rss_mib: f64,
    pub handoff: Option<Handoff>,
}

impl Point {
    pub fn requests_per_min(&self) -> f64 {
        self.requests
            .iter()
            .filter(|(verb, _)| *verb != "WATCH")
            .map(|(_, n)| n)
            .sum()
    }

    pub fn row(&self) -> String {
        let verbs: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, n)| n.abs() >= 0.05)
            .map(|(verb, n)| format!("{verb} {n:.1}"))
            .collect();
        let (p50, p99) = self.handoff.as_ref().map_or((f64::NAN, f64::NAN), |h| {
            (
                crate::percentile(&h.ms, 50.0),
                crate::percentile(&h.ms, 99.0),
            )
        });
        format!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.1} | {} | {:.1} | {:.1} | {:.0} | {p50:.1} / {p99:.1} |",
            self.tool.map_or("none", |t| t.name()),
            self.elections,
            self.contenders,
            self.cpu_per_min,
            self.rss_mib,
            self.requests_per_min(),
            if verbs.is_empty() {
                "none".into()
            } else {
                verbs.join(", ")
            },
            self.etcd_writes,
            self.etcd_reads,
            self.contenders_rss_mib,
        )
    }
}

pub const HEADER: &str = "| pool | elections | contenders | API server CPU s/min | API server RSS MiB | Lease requests/min (WATCH apart) | by verb | etcd Lease writes/min | etcd Lease reads/min | contenders' RSS MiB | handoff p50 / p99 ms (20) |\n|---|---|---|---|---|---|---|---|---|---|---|";

/// The API server's pid, from the control plane's directory.
fn apiserver_pid(dir: &Path) -> u32 {
    let pid = std::fs::read_to_string(dir.join("apiserver.pid"))
        .or_else(|_| std::fs::read_to_string(dir.join("apiserver-0/apiserver.pid")))
        .expect("the API server's pid file");
    pid.trim().parse().expect("a pid")
}

struct Sample {
    at: Instant,
    cpu_ms: u64,
    requests: BTreeMap<String, f64>,
    etcd: BTreeMap<String, f64>,
}

async fn sample(bench: &Bench, apiserver: u32) -> Sample {
    let (requests, _) = cluster::lease_metrics(&bench.client).await;
    let etcd = cluster::etcd_lease_requests(&bench.client).await;
    Sample {
        at: Instant::now(),
        cpu_ms: footprint(apiserver).map_or(0, |f| f.2),
        requests,
        etcd,
    }
}

async fn window(
    bench: &Bench,
    (tool, elections, contenders): (Option<Tool>, usize, usize),
    length: Duration,
    pids: &[u32],
) -> Point {
    let apiserver = apiserver_pid(&bench.cluster_dir);
    let before = sample(bench, apiserver).await;
    tokio::time::sleep(length).await;
    let after = sample(bench, apiserver).await;
    let seconds = after.at.duration_since(before.at).as_secs_f64();
    let per_min = |d: f64| d * 60.0 / seconds;
    let delta = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, key: &str| {
        a.get(key).copied().unwrap_or(0.0) - b.get(key).copied().unwrap_or(0.0)
    };
    let requests = after
        .requests
        .keys()
        .map(|verb| {
            (
                verb.clone(),
                per_min(delta(&after.requests, &before.requests, verb)),
            )
        })
        .collect();
    let etcd = |ops: &[&str]| {
        per_min(
            ops.iter()
                .map(|op| delta(&after.etcd, &before.etcd, op))
                .sum(),
        )
    };
    let rss: u64 = pids.iter().filter_map(|&p| footprint(p)).map(|f| f.1).sum();
    Point {
        tool,
        elections,
        contenders,
        cpu_per_min: per_min((after.cpu_ms - before.cpu_ms) as f64 / 1000.0),
        rss_mib: footprint(apiserver).map_or(0.0, |f| f.1 as f64 / 1024.0),
        requests,
        etcd_writes: etcd(&["create", "update", "guaranteedUpdate"]),
        etcd_reads: etcd(&["get", "list", "listStream"]),
        contenders_rss_mib: rss as f64 / 1024.0,
        handoff: None,
    }
}

pub async fn scale(
    bench: &Bench,
    tools: &[Tool],
    points: &[usize],
    length: Duration,
) -> Vec<Point> {
    let mut results = Vec::new();
    eprintln!("scale: baseline, no contender ({} s)", length.as_secs());
    let baseline = window(bench, (None, 0, 0), length, &[]).await;
    eprintln!("{}", baseline.row());
    results.push(baseline);
    for &tool in tools {
        for &elections in points {
            eprintln!(
                "scale: {} with {elections} elections × 3 contenders",
                tool.name()
            );
            let dir = bench
                .journals
                .join(format!("scale-{}-{elections}", tool.short()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut children = Vec::new();
            let mut journals = Vec::new();
            for i in 0..elections {
                let lease = format!("scale-{}-{elections}-{i}", tool.short());
                cluster::create_released(&bench.client, NS, &lease).await;
                let journal = Journal(dir.join(&lease));
                for c in 0..3 {
                    children.push(bench.spawn(tool, &lease, &format!("c{c}"), &journal, -1.0));
                }
                journals.push(journal);
            }
            let pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
            // Settled: every election has its worker, then 15 s more.
            let began = Instant::now();
            for journal in &journals {
                let left = Duration::from_secs(600).saturating_sub(began.elapsed());
                journal.more_than(0, left).await;
            }
            eprintln!(
                "scale: every election led {:.1} s after the start",
                began.elapsed().as_secs_f64()
            );
            tokio::time::sleep(Duration::from_secs(15)).await;
            let mut point =
                window(bench, (Some(tool), elections, 3 * elections), length, &pids).await;
            let probe = format!("scale-probe-{}-{elections}", tool.short());
            point.handoff = Some(handoff_on(bench, tool, 3, 20, &probe).await);
            eprintln!("{}", point.row());
            results.push(point);
            kill_matching(&dir.to_string_lossy());
            drop(children);
            // Let the API server see the watches end before the next point.
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }
    results
}

/// The per-contender figures against the targets: idle followers' API server CPU against
/// client-go's, their requests a minute, each leader's writes a minute, and the handoff p99 at
/// the largest point against the smallest.
pub fn targets(points: &[Point]) -> Vec<String> {
    let baseline = points.iter().find(|p| p.tool.is_none());
    let largest = |tool: Tool| {
        points
            .iter()
            .filter(|p| p.tool == Some(tool))
            .max_by_key(|p| p.elections)
    };
    let smallest = |tool: Tool| {
        points
            .iter()
            .filter(|p| p.tool == Some(tool))
            .min_by_key(|p| p.elections)
    };
    let mut out = Vec::new();
    let per_contender_cpu =
        |p: &Point| (p.cpu_per_min - baseline.map_or(0.0, |b| b.cpu_per_min)) / p.contenders as f64;
    if let (Some(le), Some(cg)) = (largest(Tool::LeaseExec), largest(Tool::ClientGo)) {
        let (a, b) = (per_contender_cpu(le), per_contender_cpu(cg));
        out.push(format!(
            "API server CPU per contender at {} contenders: lease-exec {:.4} s/min, client-go {:.4} s/min: ratio {:.3} ≤ 0.1: {}",
            le.contenders,
            a,
            b,
            a / b,
            crate::met(a / b <= 0.1)
        ));
    }
    if let Some(le) = largest(Tool::LeaseExec) {
        // 2 idle followers per election; the leader's requests are the PUTs (its renewals).
        let followers = (le.contenders - le.elections) as f64;
        let puts = le.requests.get("PUT").copied().unwrap_or(0.0);
        let others = le.requests_per_min() - puts;
        out.push(format!(
            "lease-exec requests per idle follower a minute at {} elections (all but PUTs): {:.2} ≤ 0.5: {}",
            le.elections,
            others / followers,
            crate::met(others / followers <= 0.5)
        ));
        // The baseline's writes (the API server's own Leases) are not the leaders'.
        let writes = (puts
            - baseline.map_or(0.0, |b| b.requests.get("PUT").copied().unwrap_or(0.0)))
            / le.elections as f64;
        out.push(format!(
            "lease-exec writes per leader a minute: {writes:.1} ≤ 12: {}",
            crate::met(writes <= 12.0)
        ));
        if let (Some(small), Some(h_large)) = (smallest(Tool::LeaseExec), le.handoff.as_ref())
            && let Some(h_small) = small.handoff.as_ref()
        {
            let (a, b) = (
                crate::percentile(&h_large.ms, 99.0),
                crate::percentile(&h_small.ms, 99.0),
            );
            out.push(format!(
                "lease-exec handoff p99 at {} elections {a:.1} ms vs {b:.1} ms at {}: within 2×: {}",
                le.elections,
                small.elections,
                crate::met(a <= 2.0 * b)
            ));
        }
    }
    // As rows of the report's targets table: what, measured, met.
    out.into_iter()
        .map(|t| match t.rsplit_once(": ") {
            Some((what, verdict)) => format!("| {what} | | {verdict} |"),
            None => format!("| {t} | | |"),
        })
        .collect()
}

/// API server CPU s/min and Lease requests/min against contenders, both pools, as an SVG.
pub fn plot(points: &[Point], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(480);
    let series = |tool: Tool, value: &dyn Fn(&Point) -> f64| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter(|p| p.tool == Some(tool))
            .map(|p| (p.contenders as f64, value(p)))
            .collect()
    };
    let max_x = points.iter().map(|p| p.contenders).max().unwrap_or(1) as f64 * 1.05;
    type Value<'a> = &'a dyn Fn(&Point) -> f64;
    let charts: [(&DrawingArea<SVGBackend, _>, &str, Value); 2] = [
        (&left, "API server CPU, s per minute", &|p: &Point| {
            p.cpu_per_min
        }),
        (&right, "Lease requests per minute", &|p: &Point| {
            p.requests_per_min()
        }),
    ];
    for (area, title, value) in charts {
        let max_y = points
            .iter()
            .filter(|p| p.tool.is_some())
            .map(value)
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
        chart
            .configure_mesh()
            .x_desc("contenders")
            .light_line_style(WHITE)
            .draw()?;
        for (tool, color) in [(Tool::LeaseExec, BLUE), (Tool::ClientGo, RED)] {
            let data = series(tool, value);
            chart
                .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))?
                .label(tool.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(
                data.iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
