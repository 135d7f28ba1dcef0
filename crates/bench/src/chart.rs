//! PNG chart of throughput and latency against load, one line per run (server).
//!
//! Invariants: text is drawn with Noto Sans embedded in the binary (plotters' `ab_glyph`
//! backend), so charts look the same on any machine and need no system fonts; the image is
//! rendered into an RGB buffer and encoded with `png`, nothing else touches the disk; a metric a
//! level lacks leaves a gap instead of a zero.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::report::RunResult;
use crate::stats::{LevelResult, Load};

/// Chart size in pixels.
const WIDTH: u32 = 1500;
/// Chart height in pixels.
const HEIGHT: u32 = 520;
/// Line colours, one per series (colour-blind-safe Okabe–Ito picks).
const COLORS: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

/// Why a chart could not be written.
#[derive(Debug)]
pub struct ChartError(pub String);

impl std::fmt::Display for ChartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "chart: {}", self.0)
    }
}

impl std::error::Error for ChartError {}

fn err<E: std::fmt::Display>(e: E) -> ChartError {
    ChartError(e.to_string())
}

/// Registers the embedded font once for the whole process.
fn ensure_font() -> Result<(), ChartError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        register_font("sans-serif", FontStyle::Normal, ttf_noto_sans::REGULAR).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(ChartError("the embedded font could not be loaded".into()))
    }
}

/// One panel: its title, y-axis name and the value it plots.
type Panel = (&'static str, &'static str, fn(&LevelResult) -> Option<f64>);

const PANELS: [Panel; 3] = [
    ("Output throughput (all streams)", "tokens/s", |l| {
        (l.completed > 0).then_some(l.output_throughput)
    }),
    ("Time to first token, p50", "ms", |l| {
        l.ttft_ms.map(|s| s.p50)
    }),
    ("Time per output token, p50", "ms", |l| {
        l.tpot_ms.map(|s| s.p50)
    }),
];

/// Every load any run measured, ascending: the chart puts them at evenly spaced positions
/// (1, 4, 16 streams read better evenly spaced than on a linear axis).
fn load_axis(runs: &[RunResult]) -> Vec<f64> {
    let mut xs: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.levels.iter().map(|l| l.load.x()))
        .collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.dedup();
    xs
}

/// Points of one series for one panel: (position on the load axis, value), sorted by load.
fn points(run: &RunResult, axis: &[f64], get: fn(&LevelResult) -> Option<f64>) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = run
        .levels
        .iter()
        .filter_map(|l| {
            let pos = axis.iter().position(|&x| x == l.load.x())?;
            get(l).filter(|v| v.is_finite()).map(|v| (pos as f64, v))
        })
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts
}

/// Tick label of an axis position: the load there, or nothing between levels.
fn tick_label(axis: &[f64], pos: f64) -> String {
    let i = pos.round();
    if (pos - i).abs() > 1e-6 || i < 0.0 || i as usize >= axis.len() {
        return String::new();
    }
    let x = axis[i as usize];
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x}")
    }
}

/// Tick label of a value axis.
fn value_label(y: f64) -> String {
    if y.abs() >= 10.0 || y == 0.0 {
        format!("{y:.0}")
    } else {
        format!("{y:.1}")
    }
}

/// Draws the chart of `runs` into an RGB buffer of `WIDTH`×`HEIGHT`.
pub fn render(title: &str, runs: &[RunResult]) -> Result<Vec<u8>, ChartError> {
    ensure_font()?;
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root
            .titled(title, ("sans-serif", 26).into_font())
            .map_err(err)?;
        let x_desc = match runs.first().and_then(|r| r.levels.first()).map(|l| l.load) {
            Some(Load::RequestRate(_)) => "request rate (req/s)",
            _ => "concurrent streams",
        };
        let axis = load_axis(runs);
        let x_last = axis.len().max(1) as f64 - 1.0;
        for (area, (name, unit, get)) in root.split_evenly((1, 3)).iter().zip(PANELS) {
            let y_max = runs
                .iter()
                .flat_map(|r| points(r, &axis, get))
                .map(|p| p.1)
                .fold(0.0f64, f64::max);
            let y_top = if y_max > 0.0 { y_max * 1.25 } else { 1.0 };
            let mut chart = ChartBuilder::on(area)
                .caption(name, ("sans-serif", 20).into_font())
                .margin(14)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d(-0.4..x_last + 0.4, 0.0..y_top)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_labels(axis.len().max(2))
                .x_label_formatter(&|x| tick_label(&axis, *x))
                .y_label_formatter(&|y| value_label(*y))
                .disable_x_mesh()
                .x_desc(x_desc)
                .y_desc(unit)
                .label_style(("sans-serif", 15).into_font())
                .axis_desc_style(("sans-serif", 16).into_font())
                .draw()
                .map_err(err)?;
            for (i, run) in runs.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let pts = points(run, &axis, get);
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))
                    .map_err(err)?
                    .label(run.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))
                    });
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))
                    .map_err(err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font(("sans-serif", 15).into_font())
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(buf)
}

/// Renders the chart of `runs` and writes it as a PNG file.
pub fn write_png(path: &Path, title: &str, runs: &[RunResult]) -> Result<(), ChartError> {
    let rgb = render(title, runs)?;
    let file = File::create(path).map_err(|e| ChartError(format!("{}: {e}", path.display())))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(err)?;
    writer.write_image_data(&rgb).map_err(err)?;
    writer.finish().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::RunSettings;
    use crate::stats::{RequestRecord, aggregate};

    fn run(label: &str, speed: f64) -> RunResult {
        let levels = [1usize, 4, 16]
            .iter()
            .map(|&c| {
                let rec = RequestRecord {
                    ttft_s: Some(0.05 * c as f64),
                    e2e_s: 1.0 + 0.1 * c as f64 / speed,
                    itl_s: vec![0.02; 9],
                    prompt_tokens: Some(16),
                    output_tokens: 10,
                    requested_output_tokens: 10,
                    requested_prompt_tokens: 16,
                    ..RequestRecord::default()
                };
                aggregate(Load::Concurrency(c), &vec![rec; c], 0)
            })
            .collect();
        RunResult {
            scenario: "decode".into(),
            label: label.into(),
            started_unix_s: 0,
            settings: RunSettings {
                url: "http://127.0.0.1:1/v1/completions".into(),
                model: None,
                prompt_tokens: "16".into(),
                output_tokens: "10".into(),
                temperature: 0.0,
                seed: 0,
                max_duration_s: 1.0,
                warmup: 0,
            },
            levels,
        }
    }

    #[test]
    fn loads_sit_at_even_positions_labelled_by_value() {
        let runs = [run("a", 1.0)];
        let axis = load_axis(&runs);
        assert_eq!(axis, vec![1.0, 4.0, 16.0]);
        assert_eq!(tick_label(&axis, 2.0), "16");
        assert_eq!(tick_label(&axis, 0.5), "");
        assert_eq!(tick_label(&axis, 3.0), "");
        let pts = points(&runs[0], &axis, PANELS[0].2);
        assert_eq!(
            pts.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![0.0, 1.0, 2.0]
        );
    }

    #[test]
    fn chart_draws_every_series_and_writes_a_png() {
        let runs = [run("ours", 2.0), run("theirs", 1.0)];
        let rgb = render("test", &runs).expect("renders");
        assert_eq!(rgb.len(), (WIDTH * HEIGHT * 3) as usize);
        // Both series' colours appear (lines were drawn), and text made some dark pixels.
        for c in &COLORS[..2] {
            let found = rgb.chunks(3).any(|p| p == [c.0, c.1, c.2]);
            assert!(found, "colour {c:?} missing");
        }
        assert!(rgb.chunks(3).filter(|p| p.iter().all(|&v| v < 60)).count() > 500);

        let dir = std::env::temp_dir().join(format!("mpt-bench-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("c.png");
        write_png(&path, "test", &runs).expect("writes");
        let bytes = std::fs::read(&path).expect("reads back");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
