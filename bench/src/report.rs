//! Statistics of a series, the rows and targets of the report, the
//! machine it ran on, and the table printed at the end.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Value, json};

use crate::Args;
use crate::memory::mib;

/// Summary of a series; percentiles by nearest rank (p99 of 20 samples is
/// the maximum).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Stats {
    pub(crate) count: usize,
    mean: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    min: f64,
    pub(crate) max: f64,
}

impl Stats {
    pub(crate) fn of(samples: &[f64]) -> Stats {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let rank = |q: f64| -> f64 {
            if n == 0 {
                return f64::NAN;
            }
            let idx = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            v[idx]
        };
        Stats {
            count: n,
            mean: if n == 0 {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / n as f64
            },
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    pub(crate) fn get(&self, stat: Stat) -> f64 {
        match stat {
            Stat::P50 => self.p50,
            Stat::P95 => self.p95,
            Stat::P99 => self.p99,
        }
    }
}

/// A named series of samples and what it measures.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Series {
    pub(crate) name: String,
    what: String,
    unit: &'static str,
    stats: Stats,
    samples: Vec<f64>,
}

impl Series {
    pub(crate) fn new(name: &str, what: &str, unit: &'static str, samples: Vec<f64>) -> Series {
        let stats = Stats::of(&samples);
        let samples = samples
            .into_iter()
            .map(|s| (s * 10_000.0).round() / 10_000.0)
            .collect();
        Series {
            name: name.into(),
            what: what.into(),
            unit,
            stats,
            samples,
        }
    }

    pub(crate) fn ms(name: &str, what: &str, durations: &[Duration]) -> Series {
        Series::new(
            name,
            what,
            "ms",
            durations.iter().map(|d| d.as_secs_f64() * 1000.0).collect(),
        )
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Stat {
    P50,
    P95,
    P99,
}

/// An upper bound on one statistic.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Target {
    pub(crate) stat: Stat,
    pub(crate) max: f64,
    unit: &'static str,
    measured: Option<f64>,
    pub(crate) pass: bool,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Row {
    pub(crate) key: &'static str,
    pub(crate) title: &'static str,
    pub(crate) series: Option<Series>,
    targets: Vec<Target>,
    /// Every target met (false when the measurement errored).
    pub(crate) pass: bool,
    pub(crate) baseline: Option<Series>,
    /// `series.p50 / baseline.p50`.
    ratio_p50: Option<f64>,
    /// Target on `ratio_p50` (the row passes only at or below it).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_ratio_p50: Option<f64>,
    /// Further series that help explain the figure; not compared with targets.
    pub(crate) informational: Vec<Series>,
    pub(crate) details: Value,
    pub(crate) error: Option<String>,
}

impl Row {
    pub(crate) fn new(
        key: &'static str,
        title: &'static str,
        targets: &[(Stat, f64, &'static str)],
    ) -> Row {
        Row {
            key,
            title,
            series: None,
            targets: targets
                .iter()
                .map(|&(stat, max, unit)| Target {
                    stat,
                    max,
                    unit,
                    measured: None,
                    pass: false,
                })
                .collect(),
            pass: false,
            baseline: None,
            ratio_p50: None,
            max_ratio_p50: None,
            informational: Vec::new(),
            details: Value::Null,
            error: None,
        }
    }

    /// A target on the p50 ratio to the same-run baseline (`1.5`: at most
    /// 1.5 times the baseline's p50).
    pub(crate) fn with_max_ratio(mut self, max: f64) -> Row {
        self.max_ratio_p50 = Some(max);
        self
    }

    /// Fills targets and the ratio once the series are known.
    pub(crate) fn finish(&mut self) {
        if let Some(s) = &self.series {
            for t in &mut self.targets {
                let v = s.stats.get(t.stat);
                t.measured = Some(v);
                t.pass = v <= t.max;
            }
            self.pass = self.error.is_none() && self.targets.iter().all(|t| t.pass);
            if let Some(b) = &self.baseline {
                self.ratio_p50 = Some(s.stats.p50 / b.stats.p50);
            }
            if let Some(max) = self.max_ratio_p50 {
                self.pass &= self.ratio_p50.is_some_and(|r| r <= max);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Machine information

fn command_output(program: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Some(text.trim().to_owned())
}

pub(crate) fn machine_info(args: &Args) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")?
            .split_once(':')
            .map(|(_, v)| v.trim().to_owned())
    });
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_kib = meminfo.lines().find_map(|l| {
        l.strip_prefix("MemTotal:")?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    });
    json!({
        "nproc": std::thread::available_parallelism().map(usize::from).ok(),
        "cpuModel": cpu_model,
        "memTotalMiB": mem_total_kib.map(mib),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
        "loadavg": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_owned()),
        "runscVersion": command_output(&args.runsc, &["--version"]),
        "python": command_output(&args.python, &["--version"]),
        "isolation": args.isolation,
        "runscPlatform": "ptrace (agent default)",
        "cgroup": if Path::new("/sys/fs/cgroup/memory").is_dir() { "v1 (memory hierarchy present)" } else { "v2" },
    })
}

// ---------------------------------------------------------------------------
// Report

fn fmt_value(v: f64, unit: &str) -> String {
    if v.is_nan() {
        return "-".into();
    }
    match unit {
        "ms" if v < 10.0 => format!("{v:.3} ms"),
        "ms" => format!("{v:.1} ms"),
        _ => format!("{v:.1} {unit}"),
    }
}

pub(crate) fn print_series(s: &Series) {
    let st = &s.stats;
    println!(
        "  {:<34} n={:<5} mean={:<12} p50={:<12} p95={:<12} p99={:<12}",
        s.name,
        st.count,
        fmt_value(st.mean, s.unit),
        fmt_value(st.p50, s.unit),
        fmt_value(st.p95, s.unit),
        fmt_value(st.p99, s.unit),
    );
}

pub(crate) fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<32} {:>11} {:>11} {:>11}  {:<22} {:<6} {:>14} {:>9}",
        "measurement", "p50", "p95", "p99", "target", "result", "baseline p50", "ratio"
    );
    println!("{}", "-".repeat(125));
    for r in rows {
        let target = r
            .targets
            .iter()
            .map(|t| format!("{:?}<={}", t.stat, t.max).to_lowercase() + t.unit)
            .chain(r.max_ratio_p50.map(|m| format!("ratio<={m}x")))
            .collect::<Vec<_>>()
            .join(", ");
        let Some(s) = &r.series else {
            println!(
                "{:<32} {:>11} {:>11} {:>11}  {:<22} {:<6}",
                r.title, "-", "-", "-", target, "ERROR"
            );
            continue;
        };
        let st = &s.stats;
        let verdict = if r.error.is_some() {
            "ERROR"
        } else if r.pass {
            "pass"
        } else {
            "FAIL"
        };
        println!(
            "{:<32} {:>11} {:>11} {:>11}  {:<22} {:<6} {:>14} {:>9}",
            r.title,
            fmt_value(st.p50, s.unit),
            fmt_value(st.p95, s.unit),
            fmt_value(st.p99, s.unit),
            target,
            verdict,
            r.baseline
                .as_ref()
                .map_or("-".into(), |b| fmt_value(b.stats.p50, b.unit)),
            r.ratio_p50.map_or("-".into(), |x| format!("{x:.2}x")),
        );
    }
    println!();
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
