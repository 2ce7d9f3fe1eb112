//! `avp bench all` (every bench as JSON lines) and `avp bench report --out DIR` (an
//! HTML page with SVG plots of those lines, and the machine they came from).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use plotters::prelude::*;
use serde_json::Value;

/// Arguments of `avp bench all`.
#[derive(clap::Args, Debug)]
pub struct AllArgs {
    /// Also write the lines to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Model for the model bench.
    #[arg(long, default_value = "smollm2")]
    model: String,
}

/// Arguments of `avp bench report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Directory to write index.html, the SVG plots and results.jsonl to.
    #[arg(long)]
    out: PathBuf,
    /// Plot these JSON lines (from `avp bench all --out`) instead of running the benches.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Model for the model bench.
    #[arg(long, default_value = "smollm2")]
    model: String,
}

/// Run the wire, transport and model benches (each as `avp bench … --json` in a
/// child process), echo their lines, and return them.
fn all_lines(model: &str, echo: bool) -> anyhow::Result<Vec<Value>> {
    let mut lines = Vec::new();
    let runs: [&[&str]; 3] = [
        &["wire", "--json"],
        &["transport", "--json"],
        &["model", "--json", "--model", model],
    ];
    for args in runs {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("bench")
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("start avp bench {}", args[0]))?;
        for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
            let line = line?;
            if echo {
                println!("{line}");
                std::io::stdout().flush()?;
            }
            lines.push(serde_json::from_str(&line).with_context(|| format!("bench line {line}"))?);
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("avp bench {} failed: {status}", args[0]);
        }
    }
    Ok(lines)
}

fn write_lines(path: &Path, lines: &[Value]) -> anyhow::Result<()> {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// `avp bench all`.
pub fn all(a: AllArgs) -> anyhow::Result<()> {
    let lines = all_lines(&a.model, true)?;
    if let Some(p) = &a.out {
        write_lines(p, &lines)?;
    }
    Ok(())
}

/// A named series of (x, y) points: the `bench` lines' `x` and `y` fields, one
/// series per value of their `key` field (or one series named `key` when the lines
/// have no such field).
type Series = (String, Vec<(f64, f64)>);

fn series(lines: &[Value], bench: &str, key: &str, x: &str, y: &str) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for l in lines.iter().filter(|l| l["bench"] == bench) {
        let name = l[key].as_str().unwrap_or(key).to_owned();
        let (Some(xv), Some(yv)) = (l[x].as_f64(), l[y].as_f64()) else {
            continue;
        };
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, pts)) => pts.push((xv, yv)),
            None => out.push((name, vec![(xv, yv)])),
        }
    }
    for (_, pts) in &mut out {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// A log-log line plot of `series` into `path`.
fn plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let pts = || series.iter().flat_map(|(_, p)| p.iter());
    if pts().next().is_none() {
        bail!("no data for {title}");
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (x0 * 0.8..x1 * 1.25).log_scale(),
            (y0.max(1e-9) * 0.8..y1 * 1.25).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or("?".into(), |kib| {
            format!("{:.0} GiB", kib as f64 / 1048576.0)
        });
    format!("{cpu}, {cores} cores, {mem}")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `avp bench report`.
pub fn report(a: ReportArgs) -> anyhow::Result<()> {
    let lines = match &a.input {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("read {}", p.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).context("a JSON line"))
            .collect::<anyhow::Result<Vec<Value>>>()?,
        None => all_lines(&a.model, false)?,
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("create {}", a.out.display()))?;
    write_lines(&a.out.join("results.jsonl"), &lines)?;
    let mut figures = Vec::new();
    let transport = series(&lines, "transport", "transport", "size_bytes", "p50_us");
    if !transport.is_empty() {
        plot(
            &a.out.join("latency.svg"),
            "Handoff latency (p50) vs payload size",
            "payload bytes",
            "p50 latency (µs)",
            &transport,
        )?;
        figures.push(("latency.svg", "Send → receiver holds a validated message, per transport; memcpy and raw loopback TCP are the reference lines."));
        plot(
            &a.out.join("throughput.svg"),
            "Handoff throughput vs payload size",
            "payload bytes",
            "GB/s",
            &series(&lines, "transport", "transport", "size_bytes", "gbps"),
        )?;
        figures.push(("throughput.svg", "Throughput of the same runs."));
    }
    // No "label" field in handoff lines: the label is the series name.
    let mut ttft = series(
        &lines,
        "handoff",
        "latent (KV cache over shm)",
        "context_tokens",
        "ttft_latent_ms",
    );
    ttft.extend(series(
        &lines,
        "handoff",
        "text (re-prefill)",
        "context_tokens",
        "ttft_text_ms",
    ));
    if ttft.len() == 2 {
        plot(
            &a.out.join("ttft.svg"),
            "Agent B's time to first token vs context length",
            "context tokens",
            "time to first token (ms)",
            &ttft,
        )?;
        figures.push((
            "ttft.svg",
            "Latent: A's KV cache arrives over shared memory; text: B re-reads A's tokens.",
        ));
    }
    let mut html = String::from(
        "<!doctype html><meta charset=utf-8><title>avp benchmarks</title>\n<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}td,th{padding:2px 8px;text-align:right}pre{white-space:pre-wrap}</style>\n<h1>avp benchmarks</h1>\n",
    );
    html.push_str(&format!(
        "<p>Machine: {} · avp {}</p>\n",
        escape(&machine()),
        env!("CARGO_PKG_VERSION")
    ));
    for (file, caption) in &figures {
        html.push_str(&format!(
            "<figure><img src=\"{file}\" width=760><figcaption>{}</figcaption></figure>\n",
            escape(caption)
        ));
    }
    html.push_str("<h2>All results</h2>\n<pre>");
    for l in &lines {
        html.push_str(&escape(&l.to_string()));
        html.push('\n');
    }
    html.push_str("</pre>\n");
    std::fs::write(a.out.join("index.html"), html)?;
    println!("{}", a.out.join("index.html").display());
    Ok(())
}
