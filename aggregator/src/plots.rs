//! Run plots with plotters, as PNG and SVG: server policy loss, per-client training loss,
//! update norms and bytes received per round.
//!
//! Text is drawn with ab_glyph from DejaVu Sans, shipped in `assets/` (license beside it), so
//! no system font or fontconfig is needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::outputs::{PolicyLossHistory, RoundRecord};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| "the shipped DejaVu Sans font is invalid".to_string())
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// A named series of (round, value) points.
type Series = (String, Vec<(f64, f64)>);

/// Writes every plot into `dir` and returns the files written.
pub fn write_all(
    dir: &Path,
    history: &PolicyLossHistory,
    rounds: &[RoundRecord],
) -> Result<Vec<PathBuf>> {
    register_font()?;
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    let policy: Vec<(f64, f64)> = history
        .points
        .iter()
        .map(|p| (p.round as f64, p.policy_loss))
        .collect();
    let per_client = |f: &dyn Fn(&crate::outputs::ClientRecord) -> Option<f64>| -> Vec<Series> {
        let mut m: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for r in rounds {
            for c in &r.clients {
                if let Some(v) = f(c) {
                    m.entry(c.client_id.clone())
                        .or_default()
                        .push((r.round as f64, v));
                }
            }
        }
        m.into_iter().collect()
    };
    let mut bytes = per_client(&|c| Some(c.bytes as f64 / 1e6));
    bytes.push((
        "total".into(),
        rounds
            .iter()
            .map(|r| (r.round as f64, r.bytes_received as f64 / 1e6))
            .collect(),
    ));
    let plots: Vec<(&str, &str, &str, Vec<Series>)> = vec![
        (
            "server_policy_loss",
            "Server policy loss (held-out; round 0 = initial model)",
            "policy loss",
            vec![("server eval".into(), policy)],
        ),
        (
            "client_loss",
            "Client training loss per round",
            "loss",
            per_client(&|c| c.loss),
        ),
        (
            "update_norms",
            "Client update norm ‖Δ‖₂ per round",
            "‖Δ‖₂",
            per_client(&|c| c.update_norm),
        ),
        (
            "bytes_per_round",
            "Update bytes received per round",
            "MB",
            bytes,
        ),
    ];
    for (stem, title, ylabel, series) in plots {
        let png = dir.join(format!("{stem}.png"));
        let svg = dir.join(format!("{stem}.svg"));
        {
            let root = BitMapBackend::new(&png, (960, 540)).into_drawing_area();
            draw(&root, title, ylabel, &series)?;
            root.present()
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", png.display()))?;
        }
        {
            let root = SVGBackend::new(&svg, (960, 540)).into_drawing_area();
            draw(&root, title, ylabel, &series)?;
            root.present()
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", svg.display()))?;
        }
        files.push(png);
        files.push(svg);
    }
    Ok(files)
}

/// (lo, hi) around the finite values, never empty.
fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        (hi - lo) * 0.08
    } else {
        lo.abs() * 0.1 + 1e-6
    };
    (lo - pad, hi + pad)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    ylabel: &str,
    series: &[Series],
) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("plotting {title}: {e}");
    root.fill(&WHITE).map_err(err)?;
    let pts = || series.iter().flat_map(|(_, p)| p.iter());
    // Rounds are integers: a third of a round either side keeps the end points off the axes.
    let xs = || pts().map(|p| p.0).filter(|x| x.is_finite());
    let (x0, x1) = (
        xs().fold(f64::INFINITY, f64::min),
        xs().fold(f64::NEG_INFINITY, f64::max),
    );
    let (x0, x1) = if x0.is_finite() {
        (x0 - 0.3, x1.max(x0 + 1.0) + 0.3)
    } else {
        (0.0, 1.0)
    };
    let (y0, y1) = range(pts().map(|p| p.1));
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(ylabel)
        // Rounds are integers: label only integer ticks (plotters may pick halves).
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.4}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, (name, p)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let p: Vec<(f64, f64)> = p.iter().copied().filter(|v| v.1.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(p.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                p.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::{ClientRecord, PolicyLossPoint};

    #[test]
    fn writes_png_and_svg_for_every_plot() {
        let d = tempfile::tempdir().unwrap();
        let history = PolicyLossHistory {
            dataset: "held".into(),
            points: (0..4)
                .map(|r| PolicyLossPoint {
                    round: r,
                    model_id: format!("m{r}"),
                    policy_loss: 2.0 / (r as f64 + 1.0),
                })
                .collect(),
        };
        let rounds: Vec<RoundRecord> = (1..4)
            .map(|r| RoundRecord {
                round: r,
                model_id: format!("m{r}"),
                base_model_id: format!("m{}", r - 1),
                aggregated: BTreeMap::new(),
                bytes_received: 3000 * r,
                server_eval: None,
                server_eval_error: None,
                excluded: Vec::new(),
                clients: ["a", "b"]
                    .iter()
                    .map(|c| ClientRecord {
                        client_id: c.to_string(),
                        dataset: None,
                        loss: Some(1.0 / r as f64),
                        fedprox_loss: None,
                        grad_norm: None,
                        update_norm: Some(0.1 * r as f64),
                        steps: None,
                        seconds: None,
                        examples: 10,
                        codec: "f32".into(),
                        bytes: 1500 * r,
                        sha256: String::new(),
                    })
                    .collect(),
                duration_ms: 1,
            })
            .collect();
        let files = write_all(d.path(), &history, &rounds).unwrap();
        assert_eq!(files.len(), 8);
        for f in &files {
            let b = std::fs::read(f).unwrap();
            assert!(b.len() > 1000, "{} is tiny", f.display());
            if f.extension().is_some_and(|e| e == "png") {
                assert_eq!(&b[1..4], b"PNG");
            } else {
                let s = String::from_utf8(b).unwrap();
                assert!(
                    s.contains("<svg") && s.contains("polyline"),
                    "{}",
                    f.display()
                );
            }
        }
    }
}
