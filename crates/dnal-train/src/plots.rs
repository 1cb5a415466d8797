//! The SVG plots of a run: training curves, open gates per layer, the final alpha histogram,
//! widths before and after, and a supernet's surviving candidates. Each is drawn into memory and
//! written atomically.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::error::{Result, TrainError};
use crate::progress::EpochLog;

fn plot_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> TrainError + '_ {
    move |e| TrainError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A value of an epoch's log, for plotting.
type Metric = fn(&EpochLog) -> f64;

pub(crate) fn plot_curves(path: &Path, history: &[EpochLog]) -> Result<()> {
    let err = plot_err(path);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 700)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, bottom) = root.split_vertically(350);
        let max_loss = history
            .iter()
            .map(|l| l.loss.max(l.test_loss))
            .fold(0.1, f64::max);
        let accuracy: [(&str, RGBColor, Metric); 2] = [
            ("train", BLUE, |l| l.train_top1),
            ("test", RED, |l| l.test_top1),
        ];
        let loss: [(&str, RGBColor, Metric); 2] = [
            ("train (CE + penalty)", BLUE, |l| l.loss),
            ("test CE", RED, |l| l.test_loss),
        ];
        epoch_chart(&top, "Accuracy (%)", 100.0, history, &accuracy).map_err(|e| err(&e))?;
        epoch_chart(&bottom, "Loss", max_loss * 1.05, history, &loss).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(dnal_core::io::write_atomic(path, svg.as_bytes())?)
}

/// Lines of per-epoch metrics over all stages, with a legend.
fn epoch_chart(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    caption: &str,
    y_max: f64,
    history: &[EpochLog],
    series: &[(&str, RGBColor, Metric)],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let n = history.len().max(2) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..n, 0f64..y_max)?;
    chart.configure_mesh().x_desc("epoch (all stages)").draw()?;
    for &(label, color, f) in series {
        chart
            .draw_series(LineSeries::new(
                history
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i as f64 + 1.0, f(l))),
                color,
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

pub(crate) fn plot_gates(path: &Path, history: &[EpochLog]) -> Result<()> {
    let err = plot_err(path);
    let search: Vec<&EpochLog> = history
        .iter()
        .filter(|l| !l.open_by_layer.is_empty())
        .collect();
    let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, l) in search.iter().enumerate() {
        for (name, &open) in &l.open_by_layer {
            series
                .entry(name.as_str())
                .or_default()
                .push((i as f64 + 1.0, open as f64));
        }
    }
    let max = series.values().flatten().map(|p| p.1).fold(1.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Open gates per layer over the architecture epochs",
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .right_y_label_area_size(10)
            .build_cartesian_2d(0.5f64..(search.len().max(1) as f64 + 0.5), 0f64..max * 1.05)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("architecture epoch")
            .y_desc("open channels")
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (name, points)) in series.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points, color))
                .map_err(|e| err(&e))?
                .label(name.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(dnal_core::io::write_atomic(path, svg.as_bytes())?)
}

pub(crate) fn plot_alpha(path: &Path, alpha: &[f64]) -> Result<()> {
    let err = plot_err(path);
    let lo = alpha.iter().cloned().fold(0.0, f64::min);
    let hi = alpha.iter().cloned().fold(0.0, f64::max);
    let bins = 40usize;
    let width = ((hi - lo) / bins as f64).max(1e-6);
    let mut counts = vec![0u32; bins];
    for &a in alpha {
        let b = (((a - lo) / width) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Final alpha (kept: alpha > 0)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(lo..(lo + width * bins as f64), 0u32..top + top / 10 + 1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("alpha")
            .y_desc("channels")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &c)| {
                let x0 = lo + i as f64 * width;
                let color = if x0 + width / 2.0 > 0.0 { GREEN } else { RED };
                Rectangle::new([(x0, 0), (x0 + width, c)], color.mix(0.7).filled())
            }))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(dnal_core::io::write_atomic(path, svg.as_bytes())?)
}

/// Bars of each gated layer's width, `(before, after)`, in network order.
pub(crate) fn plot_widths(path: &Path, layers: &[(usize, usize)]) -> Result<()> {
    let err = plot_err(path);
    let max = layers.iter().map(|&(before, _)| before).max().unwrap_or(1) as f64;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Channels per gated layer: before (grey), after (blue)",
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..layers.len() as f64, 0f64..max * 1.05)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("gated layer (in order)")
            .y_desc("channels")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(layers.iter().enumerate().map(|(i, l)| {
                Rectangle::new(
                    [(i as f64 + 0.1, 0.0), (i as f64 + 0.9, l.0 as f64)],
                    BLACK.mix(0.2).filled(),
                )
            }))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(layers.iter().enumerate().map(|(i, l)| {
                Rectangle::new(
                    [(i as f64 + 0.25, 0.0), (i as f64 + 0.75, l.1 as f64)],
                    BLUE.mix(0.8).filled(),
                )
            }))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(dnal_core::io::write_atomic(path, svg.as_bytes())?)
}

/// A heat grid of kept fractions: one row per block, one column per candidate; white = removed.
pub(crate) fn plot_grid(path: &Path, grid: &dnal_zoo::StructureGrid) -> Result<()> {
    let err = plot_err(path);
    let (rows, cols) = (grid.rows.len().max(1), grid.columns.len().max(1));
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (120 + 90 * cols as u32, 80 + 22 * rows as u32))
                .into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Output channels kept per block and candidate (white: removed)",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0..cols, 0..rows)
            .map_err(|e| err(&e))?;
        let columns = grid.columns.clone();
        let row_names = grid.rows.clone();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(cols)
            .y_labels(rows)
            .x_label_formatter(&|x| columns.get(*x).cloned().unwrap_or_default())
            .y_label_formatter(&|y| {
                let name: Option<&String> = rows.checked_sub(y + 1).and_then(|r| row_names.get(r));
                name.map_or_else(String::new, |n| n.to_string())
            })
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(grid.cells.iter().enumerate().flat_map(|(r, row)| {
                row.iter().enumerate().map(move |(c, &v)| {
                    let y = rows - 1 - r;
                    let color = if v <= 0.0 {
                        WHITE.mix(1.0)
                    } else {
                        BLUE.mix(0.15 + 0.85 * v.min(1.0))
                    };
                    Rectangle::new([(c, y), (c + 1, y + 1)], color.filled())
                })
            }))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(dnal_core::io::write_atomic(path, svg.as_bytes())?)
}

/// How far below the dense baseline's top-1 a sweep row counts as collapsed, in points.
const COLLAPSED_POINTS: f64 = 15.0;

/// The rows the trade-off plot draws: those within [`COLLAPSED_POINTS`] of the dense top-1,
/// so that one collapsed lambda does not squeeze every working point into the top of the
/// axis; all of them if every row collapsed.
fn pareto_rows(table: &crate::sweep::SweepTable) -> Vec<&crate::sweep::SweepRow> {
    let floor = table.baseline_top1.mean - COLLAPSED_POINTS;
    let working: Vec<_> = table.rows.iter().filter(|r| r.top1.mean >= floor).collect();
    if working.is_empty() {
        table.rows.iter().collect()
    } else {
        working
    }
}

/// Top-1 against MACs (log scale) of a sweep: DNAL's points labelled with their lambda, the
/// paper's published points where the recipe has them, the dense baseline, and the comparison
/// methods. Collapsed rows ([`pareto_rows`]) are left out and counted in a note.
pub(crate) fn plot_pareto(path: &Path, table: &crate::sweep::SweepTable) -> Result<()> {
    use crate::sweep::Method;
    let err = plot_err(path);
    let rows = pareto_rows(table);
    let left_out = table.rows.len() - rows.len();
    let paper_points: Vec<(f64, f64)> = table
        .rows
        .iter()
        .filter_map(|r| r.paper.as_deref().and_then(parse_paper_row))
        .collect();
    let all_macs = rows
        .iter()
        .map(|r| r.macs.mean)
        .chain(paper_points.iter().map(|p| p.0))
        .chain([table.baseline_macs as f64]);
    let (lo, hi) = all_macs.fold((f64::MAX, 0f64), |(a, b), m| (a.min(m), b.max(m)));
    let tops = rows
        .iter()
        .map(|r| r.top1.mean)
        .chain(paper_points.iter().map(|p| p.1))
        .chain([table.baseline_top1.mean]);
    let (ylo, yhi) = tops.fold((100f64, 0f64), |(a, b), t| (a.min(t), b.max(t)));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        // A line under the chart for the note on left-out rows.
        let (area, foot) = root.split_vertically(if left_out > 0 { 578 } else { 600 });
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!("{}: top-1 against MACs", table.recipe),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(
                ((lo * 0.8).max(1.0)..hi * 1.25)
                    .log_scale()
                    .with_key_points(one_two_five((lo * 0.8).max(1.0), hi * 1.25)),
                (ylo - 2.0).max(0.0)..(yhi + 1.0).min(100.0),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("MACs per image (log scale)")
            .y_desc("top-1 %")
            .x_label_formatter(&|v| crate::report::human(*v as u64))
            .draw()
            .map_err(|e| err(&e))?;
        let series = [
            (Method::Dnal, "DNAL", BLUE),
            (Method::Uniform, "uniform width", GREEN),
            (Method::Magnitude, "BN magnitude", MAGENTA),
            (
                Method::Scratch,
                "DNAL widths, from scratch",
                RGBColor(230, 140, 0),
            ),
        ];
        for (method, label, color) in series {
            let points: Vec<(f64, f64, f64)> = rows
                .iter()
                .filter(|r| r.method == method)
                .map(|r| (r.macs.mean, r.top1.mean, r.lambda))
                .collect();
            if points.is_empty() {
                continue;
            }
            let mut line: Vec<(f64, f64)> = points.iter().map(|p| (p.0, p.1)).collect();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(1)))
                .map_err(|e| err(&e))?
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|p| Circle::new((p.0, p.1), 4, color.filled())),
                )
                .map_err(|e| err(&e))?;
            if method == Method::Dnal {
                chart
                    .draw_series(points.iter().map(|p| {
                        Text::new(
                            format!("λ={}", crate::recipes::lambda_label(p.2)),
                            (p.0, p.1 + 0.15),
                            ("sans-serif", 12),
                        )
                    }))
                    .map_err(|e| err(&e))?;
            }
        }
        if !paper_points.is_empty() {
            chart
                .draw_series(
                    paper_points
                        .iter()
                        .map(|&p| TriangleMarker::new(p, 6, BLACK.filled())),
                )
                .map_err(|e| err(&e))?
                .label("paper")
                .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, BLACK.filled()));
        }
        let base = (table.baseline_macs as f64, table.baseline_top1.mean);
        chart
            .draw_series([Cross::new(base, 7, RED.stroke_width(2))])
            .map_err(|e| err(&e))?
            .label(format!("dense ({})", table.baseline_kind))
            .legend(|(x, y)| Cross::new((x + 10, y), 6, RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| err(&e))?;
        if left_out > 0 {
            let note = format!(
                "not drawn: {left_out} collapsed row(s), more than {COLLAPSED_POINTS} points below \
                 the dense top-1 (sweep.md lists them)"
            );
            foot.draw(&Text::new(note, (70, 2), ("sans-serif", 12)))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(dnal_core::io::write_atomic(path, svg.as_bytes())?)
}

/// `(MACs, top-1)` of a published row such as `93.20 %, 36.94M, 0.25M` (none when the row has
/// no MACs figure).
fn parse_paper_row(row: &str) -> Option<(f64, f64)> {
    let mut parts = row.split(',').map(str::trim);
    let top1: f64 = parts.next()?.trim_end_matches('%').trim().parse().ok()?;
    let m = parts.next()?;
    let m = m.split_whitespace().next()?;
    let (num, scale) = match m.chars().last()? {
        'M' => (&m[..m.len() - 1], 1e6),
        'G' => (&m[..m.len() - 1], 1e9),
        'K' => (&m[..m.len() - 1], 1e3),
        _ => (m, 1.0),
    };
    Some((num.parse::<f64>().ok()? * scale, top1))
}

/// The values 1, 2 and 5 times a power of ten within `[lo, hi]`: tick marks that label a log
/// axis spanning less than a decade as well as one spanning many.
fn one_two_five(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powi(lo.max(1.0).log10().floor() as i32);
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = m * decade;
            if (lo..=hi).contains(&v) {
                ticks.push(v);
            }
        }
        decade *= 10.0;
    }
    ticks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::{Method, Stat, SweepRow, SweepTable};

    fn row(method: Method, lambda: f64, top1: f64, macs: f64) -> SweepRow {
        let stat = |mean| Stat { mean, sd: 0.0 };
        SweepRow {
            method,
            lambda,
            seeds: vec![0],
            top1: stat(top1),
            best_top1: stat(top1),
            top1_drop: stat(97.0 - top1),
            vs_dnal: None,
            derived_top1: None,
            derived_top1_recalibrated: None,
            macs: stat(macs),
            macs_reduction_pct: stat(0.0),
            macs_released: None,
            params: stat(0.0),
            params_reduction_pct: stat(0.0),
            dense_ms: stat(1.0),
            pruned_ms: stat(1.0),
            paper: None,
        }
    }

    fn table(rows: Vec<SweepRow>) -> SweepTable {
        SweepTable {
            recipe: "mnist-demo".into(),
            baseline_kind: "weight-stage".into(),
            baseline_top1: Stat {
                mean: 97.0,
                sd: 0.0,
            },
            baseline_macs: 18_000_000,
            paper_baseline: None,
            rows,
        }
    }

    #[test]
    fn collapsed_rows_are_left_out_of_the_trade_off_plot() {
        let t = table(vec![
            row(Method::Dnal, 1e-2, 97.5, 9e6),
            row(Method::Dnal, 4e-2, 96.0, 2e6),
            row(Method::Dnal, 5e-2, 25.7, 1.8e4),
            row(Method::Uniform, 5e-2, 82.5, 1.8e4),
        ]);
        let kept: Vec<f64> = pareto_rows(&t).iter().map(|r| r.top1.mean).collect();
        // 82.5 is 14.5 points below the dense 97.0: kept; 25.7 is not.
        assert_eq!(kept, vec![97.5, 96.0, 82.5]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pareto.svg");
        plot_pareto(&path, &t).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.contains("not drawn: 1 collapsed row"),
            "the note is missing"
        );
        // Nothing but collapsed rows: all of them are drawn, without a note.
        let t = table(vec![row(Method::Dnal, 5e-2, 25.7, 1.8e4)]);
        assert_eq!(pareto_rows(&t).len(), 1);
        plot_pareto(&path, &t).unwrap();
        assert!(
            !std::fs::read_to_string(&path)
                .unwrap()
                .contains("not drawn")
        );
    }
}
