//! Charts as SVG with plotters. Line charts: one line per series, the legend in a column of
//! its own right of the plot, optionally log axes with round tick values and a labelled
//! vertical marker (the training length). Bar charts: one labelled horizontal bar per entry.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::util::write_atomic;

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
    let mut svg = String::new();
    draw(&mut svg, chart, series).map_err(|message| Error::Plot {
        path: path.to_path_buf(),
        message,
    })?;
    // Drawn in memory, written whole: a full disk cannot leave half a picture.
    write_atomic(path, &svg)
}

/// Size of the whole picture, and the width of the legend column right of the plot.
const SIZE: (u32, u32) = (1020, 540);
const LEGEND_WIDTH: u32 = 290;

fn draw(svg: &mut String, chart: &Chart, series: &[Series]) -> std::result::Result<(), String> {
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
    let xpad = (x1 - x0) * 0.03;
    let (x0, x1) = (x0 - xpad, x1 + xpad);
    let (y0, y1) = chart
        .y_range
        .map(|(a, b)| (ty(a), ty(b)))
        .unwrap_or_else(|| {
            let (lo, hi) = min_max(&ys);
            let pad = ((hi - lo) * 0.05).max(1e-6);
            (lo - pad, hi + pad)
        });
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (plot_area, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    let mut ctx = ChartBuilder::on(&plot_area)
        .caption(chart.title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(52)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    // Log axes get round tick values chosen here (plotters would place its ticks evenly in
    // log space and label them 7.943, 12.589, …); linear axes keep plotters' own ticks.
    let x_ticks = chart
        .log2_x
        .then(|| log2_ticks(2f64.powf(x0), 2f64.powf(x1)));
    let y_ticks = chart
        .log_y
        .then(|| log10_ticks(10f64.powf(y0), 10f64.powf(y1)));
    let mut mesh = ctx.configure_mesh();
    mesh.x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .axis_desc_style(("sans-serif", 18))
        .bold_line_style(RGBColor(225, 225, 225))
        .light_line_style(RGBColor(246, 246, 246))
        .label_style(("sans-serif", 16))
        .x_label_formatter(&|v: &f64| format!("{}", (v * 1000.0).round() / 1000.0))
        .y_label_formatter(&|v: &f64| format!("{}", (v * 1000.0).round() / 1000.0));
    if x_ticks.is_some() {
        mesh.x_labels(0).disable_x_mesh();
    }
    if y_ticks.is_some() {
        mesh.y_labels(0).disable_y_mesh();
    }
    mesh.draw().map_err(|e| e.to_string())?;
    let grid = RGBColor(225, 225, 225);
    let label = ("sans-serif", 16).into_font().color(&BLACK);
    for &x in x_ticks.iter().flatten() {
        ctx.draw_series(LineSeries::new([(tx(x), y0), (tx(x), y1)], grid))
            .map_err(|e| e.to_string())?;
        let (px, py) = ctx.backend_coord(&(tx(x), y0));
        plot_area
            .draw(&Text::new(
                tick_label(x),
                (px, py + 6),
                label.pos(Pos::new(HPos::Center, VPos::Top)),
            ))
            .map_err(|e| e.to_string())?;
    }
    for &y in y_ticks.iter().flatten() {
        ctx.draw_series(LineSeries::new([(x0, ty(y)), (x1, ty(y))], grid))
            .map_err(|e| e.to_string())?;
        let (px, py) = ctx.backend_coord(&(x0, ty(y)));
        plot_area
            .draw(&Text::new(
                tick_label(y),
                (px - 6, py),
                label.pos(Pos::new(HPos::Right, VPos::Center)),
            ))
            .map_err(|e| e.to_string())?;
    }
    let mut legend: Vec<(String, RGBAColor, u32)> = Vec::new();
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| (tx(x), ty(y)))
            .collect();
        ctx.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        ctx.draw_series(points.iter().map(|&p| Circle::new(p, 2, color.filled())))
            .map_err(|e| e.to_string())?;
        legend.push((s.name.clone(), color, 2));
    }
    if let Some((x, text)) = chart.marker {
        let gray = RGBColor(110, 110, 110).to_rgba();
        ctx.draw_series(DashedLineSeries::new(
            [(tx(x), y0), (tx(x), y1)],
            6,
            4,
            gray.stroke_width(1),
        ))
        .map_err(|e| e.to_string())?;
        // The marker is labelled where it stands, so that a printed plot needs no legend.
        let (px, py) = ctx.backend_coord(&(tx(x), y1));
        plot_area
            .draw(&Text::new(
                format!("{text} {}", tick_label(x)),
                (px + 4, py + 4),
                ("sans-serif", 16)
                    .into_font()
                    .color(&gray)
                    .pos(Pos::new(HPos::Left, VPos::Top)),
            ))
            .map_err(|e| e.to_string())?;
        legend.push((format!("{text} ({})", tick_label(x)), gray, 1));
    }
    draw_legend(&legend_area, &legend)?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// One bar of a bar chart.
#[derive(Clone, Debug)]
pub struct Bar {
    /// Label, left of the bar.
    pub name: String,
    /// Length of the bar (non-negative), also written at its end.
    pub value: f64,
}

/// Draws one horizontal bar per entry, top to bottom in the order given, into an SVG file.
pub fn bar_chart_svg(path: &Path, title: &str, x_label: &str, bars: &[Bar]) -> Result<()> {
    let mut svg = String::new();
    draw_bars(&mut svg, title, x_label, bars).map_err(|message| Error::Plot {
        path: path.to_path_buf(),
        message,
    })?;
    // Drawn in memory, written whole: a full disk cannot leave half a picture.
    write_atomic(path, &svg)
}

fn draw_bars(
    svg: &mut String,
    title: &str,
    x_label: &str,
    bars: &[Bar],
) -> std::result::Result<(), String> {
    if bars.is_empty() {
        return Err("nothing to plot".into());
    }
    if let Some(b) = bars
        .iter()
        .find(|b| !(b.value.is_finite() && b.value >= 0.0))
    {
        return Err(format!(
            "bar {} has value {}; bars need a finite value >= 0",
            b.name, b.value
        ));
    }
    let n = bars.len();
    let max = bars.iter().map(|b| b.value).fold(0.0, f64::max).max(1e-12);
    let height = 120 + 34 * n as u32;
    let root = SVGBackend::with_string(svg, (SIZE.0, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    // Bar i spans y in [n - i - 1, n - i), so the first bar is at the top.
    let mut ctx = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(52)
        .y_label_area_size(LEGEND_WIDTH)
        .build_cartesian_2d(0.0..max * 1.15, 0.0..n as f64)
        .map_err(|e| e.to_string())?;
    ctx.configure_mesh()
        .x_desc(x_label)
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 16))
        .bold_line_style(RGBColor(225, 225, 225))
        .light_line_style(RGBColor(246, 246, 246))
        .disable_y_mesh()
        .y_labels(0)
        .x_label_formatter(&|v: &f64| tick_label(*v))
        .draw()
        .map_err(|e| e.to_string())?;
    let font = ("sans-serif", 16).into_font().color(&BLACK);
    for (i, bar) in bars.iter().enumerate() {
        let top = (n - i) as f64 - 0.15;
        let bottom = (n - i - 1) as f64 + 0.15;
        let color = Palette99::pick(i).to_rgba();
        ctx.draw_series([Rectangle::new(
            [(0.0, bottom), (bar.value, top)],
            color.filled(),
        )])
        .map_err(|e| e.to_string())?;
        let middle = (n - i) as f64 - 0.5;
        let (px, py) = ctx.backend_coord(&(0.0, middle));
        root.draw(&Text::new(
            bar.name.clone(),
            (px - 8, py),
            font.pos(Pos::new(HPos::Right, VPos::Center)),
        ))
        .map_err(|e| e.to_string())?;
        let (px, py) = ctx.backend_coord(&(bar.value, middle));
        root.draw(&Text::new(
            format!("{:.3}", bar.value),
            (px + 6, py),
            font.pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// The legend in its own column right of the plot, so that it never covers a curve.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[(String, RGBAColor, u32)],
) -> std::result::Result<(), String> {
    let top = 60;
    let step = 22;
    for (i, (name, color, width)) in entries.iter().enumerate() {
        let y = top + step * i as i32;
        area.draw(&PathElement::new(
            vec![(8, y), (36, y)],
            color.stroke_width(*width),
        ))
        .map_err(|e| e.to_string())?;
        area.draw(&Text::new(
            name.clone(),
            (44, y),
            ("sans-serif", 17)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A tick value as people write it: 6, 8, 10, 15, 1.5, 0.25.
fn tick_label(v: f64) -> String {
    let rounded = (v * 1000.0).round() / 1000.0;
    if rounded.fract() == 0.0 {
        format!("{rounded:.0}")
    } else {
        format!("{rounded}")
    }
}

/// Powers of two in `[lo, hi]` (every other one when there would be more than 10).
fn log2_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let first = lo.max(1e-12).log2().ceil() as i32;
    let last = hi.max(1e-12).log2().floor() as i32;
    let all: Vec<f64> = (first..=last).map(|k| 2f64.powi(k)).collect();
    if all.len() > 10 {
        all.into_iter().step_by(2).collect()
    } else {
        all
    }
}

/// Round values in `[lo, hi]` for a log axis: the finest of the mantissa sets below that gives
/// at most 9 ticks (from 1, 1.2, …, 9 × 10^k down to 1 × 10^k).
fn log10_ticks(lo: f64, hi: f64) -> Vec<f64> {
    const SETS: &[&[f64]] = &[
        &[
            1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0,
        ],
        &[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0],
        &[1.0, 2.0, 3.0, 5.0],
        &[1.0, 2.0, 5.0],
        &[1.0, 3.0],
        &[1.0],
    ];
    let (lo, hi) = (lo.max(1e-12), hi.max(1e-12));
    let ticks_of = |set: &[f64]| -> Vec<f64> {
        let k0 = lo.log10().floor() as i32 - 1;
        let k1 = hi.log10().ceil() as i32 + 1;
        (k0..=k1)
            .flat_map(|k| set.iter().map(move |m| m * 10f64.powi(k)))
            .map(|v| (v * 1e6).round() / 1e6)
            .filter(|&v| v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9))
            .collect()
    };
    SETS.iter()
        .map(|set| ticks_of(set))
        .find(|ticks| ticks.len() <= 9)
        .unwrap_or_else(|| ticks_of(&[1.0]))
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_are_round_values_inside_the_range() {
        assert_eq!(log10_ticks(5.5, 21.0), [6.0, 8.0, 10.0, 15.0, 20.0]);
        assert_eq!(log10_ticks(7.0, 9.5), [7.0, 8.0, 9.0]);
        assert_eq!(
            log10_ticks(6.1, 18.3),
            [7.0, 8.0, 9.0, 10.0, 12.0, 14.0, 16.0, 18.0]
        );
        assert_eq!(
            log10_ticks(2.0, 900.0),
            [2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]
        );
        assert_eq!(
            log2_ticks(100.0, 9000.0),
            [128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0]
        );
        assert_eq!(tick_label(1.5), "1.5");
        assert_eq!(tick_label(8.0), "8");
    }

    #[test]
    fn a_chart_is_written_with_its_legend_and_marker() {
        let path = std::env::temp_dir().join(format!("dape-plot-{}.svg", std::process::id()));
        let series = [Series {
            name: "alibi".into(),
            points: vec![(128.0, 7.2), (1024.0, 6.9), (8192.0, 14.0)],
        }];
        let chart = Chart {
            title: "t",
            x_label: "x",
            y_label: "y",
            log2_x: true,
            marker: Some((128.0, "training length")),
            log_y: true,
            y_range: None,
        };
        line_chart_svg(&path, &chart, &series).unwrap();
        // plotters writes each text on a line of its own.
        let svg = std::fs::read_to_string(&path).unwrap().replace('\n', "");
        std::fs::remove_file(&path).unwrap();
        for text in ["alibi", "training length 128", ">8<", ">10<", ">1024<"] {
            assert!(svg.contains(text), "{text} missing from the SVG");
        }
        assert!(!svg.contains("7.943"), "log ticks must be round values");
    }

    #[test]
    fn a_bar_chart_names_every_bar_and_its_value() {
        let path = std::env::temp_dir().join(format!("dape-bars-{}.svg", std::process::id()));
        let bars = [
            Bar {
                name: "alibi".into(),
                value: 0.25,
            },
            Bar {
                name: "dape_kerple_log".into(),
                value: 0.5,
            },
        ];
        bar_chart_svg(&path, "cost", "s per 1k tokens", &bars).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap().replace('\n', "");
        std::fs::remove_file(&path).unwrap();
        for text in [
            "alibi",
            "dape_kerple_log",
            "0.250",
            "0.500",
            "s per 1k tokens",
        ] {
            assert!(svg.contains(text), "{text} missing from the SVG");
        }
        let bad = [Bar {
            name: "x".into(),
            value: f64::NAN,
        }];
        let err = bar_chart_svg(&path, "cost", "s", &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bar x has value NaN"), "{err}");
    }
}
