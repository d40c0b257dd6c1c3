//! Line charts as SVG with plotters: one line per series, optionally a log2 x axis and a
//! vertical marker (e.g. the training length).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// `(x, y)` points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// A chart description.
#[derive(Clone, Debug)]
pub struct Chart<'a> {
    /// Title.
    pub title: &'a str,
    /// x axis label.
    pub x_label: &'a str,
    /// y axis label.
    pub y_label: &'a str,
    /// Plot x on a log2 axis (ticks are labelled with the original values).
    pub log2_x: bool,
    /// A vertical marker at this x, with its legend label.
    pub marker: Option<(f64, &'a str)>,
    /// Plot y on a log10 axis (ticks are labelled with the original values); for perplexities
    /// that span orders of magnitude.
    pub log_y: bool,
    /// Fixed y range (original units); derived from the data when `None`.
    pub y_range: Option<(f64, f64)>,
}

/// Draws `series` into an SVG file at `path`.
pub fn line_chart_svg(path: &Path, chart: &Chart, series: &[Series]) -> Result<()> {
    draw(path, chart, series).map_err(|message| Error::Plot {
        path: path.to_path_buf(),
        message,
    })
}

fn draw(path: &Path, chart: &Chart, series: &[Series]) -> std::result::Result<(), String> {
    let tx = |x: f64| if chart.log2_x { x.max(1e-12).log2() } else { x };
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| tx(p.0)))
        .chain(chart.marker.map(|m| tx(m.0)))
        .collect();
    let ty = |y: f64| if chart.log_y { y.max(1e-12).log10() } else { y };
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .map(ty)
        .collect();
    if xs.is_empty() || ys.is_empty() {
        return Err("nothing to plot".into());
    }
    let (mut x0, mut x1) = min_max(&xs);
    if x0 == x1 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let (y0, y1) = chart
        .y_range
        .map(|(a, b)| (ty(a), ty(b)))
        .unwrap_or_else(|| {
            let (lo, hi) = min_max(&ys);
            let pad = ((hi - lo) * 0.05).max(1e-6);
            (lo - pad, hi + pad)
        });
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    let log2 = chart.log2_x;
    let format_x = move |v: &f64| {
        if log2 {
            format!("{}", 2f64.powf(*v).round())
        } else {
            format!("{v}")
        }
    };
    let log_y = chart.log_y;
    let format_y = move |v: &f64| {
        if log_y {
            let y = 10f64.powf(*v);
            if y >= 100.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.3}")
            }
        } else {
            format!("{}", (v * 1000.0).round() / 1000.0)
        }
    };
    ctx.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .x_label_formatter(&format_x)
        .y_label_formatter(&format_y)
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| (tx(x), ty(y)))
            .collect();
        ctx.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        ctx.draw_series(points.iter().map(|&p| Circle::new(p, 2, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    if let Some((x, label)) = chart.marker {
        let gray = RGBColor(120, 120, 120);
        ctx.draw_series(LineSeries::new(
            vec![(tx(x), y0), (tx(x), y1)],
            gray.stroke_width(1),
        ))
        .map_err(|e| e.to_string())?
        .label(label.to_string())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], gray));
    }
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}
