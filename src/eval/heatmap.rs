//! A grid of cells as SVG (the needle-in-a-haystack picture): columns and rows named by their
//! labels, each cell coloured by its value in `0..=1` (red 0, yellow ½, green 1) and written
//! as a percentage; a missing value is a grey cell.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::util::write_atomic;

/// What to draw.
#[derive(Clone, Debug)]
pub struct Heatmap<'a> {
    /// Title.
    pub title: &'a str,
    /// Label of the columns' axis.
    pub x_label: &'a str,
    /// Label of the rows' axis.
    pub y_label: &'a str,
    /// Column labels, left to right.
    pub columns: Vec<String>,
    /// Row labels, top to bottom.
    pub rows: Vec<String>,
    /// `values[row][column]` in `0..=1`, `None` where nothing was measured.
    pub values: Vec<Vec<Option<f64>>>,
}

/// Draws `map` into an SVG file at `path`.
pub fn heatmap_svg(path: &Path, map: &Heatmap) -> Result<()> {
    let mut svg = String::new();
    draw(&mut svg, map).map_err(|message| Error::Plot {
        path: path.to_path_buf(),
        message,
    })?;
    // Drawn in memory, written whole: a full disk cannot leave half a picture.
    write_atomic(path, &svg)
}

/// Red (0) through yellow (½) to green (1).
fn colour(value: f64) -> RGBColor {
    let v = value.clamp(0.0, 1.0);
    let (r, g) = if v < 0.5 {
        (220.0, 60.0 + 2.0 * v * 160.0)
    } else {
        (
            220.0 - 2.0 * (v - 0.5) * 180.0,
            220.0 - 2.0 * (v - 0.5) * 40.0,
        )
    };
    RGBColor(r as u8, g as u8, 70)
}

const CELL: (i32, i32) = (78, 30);
const MARGIN: (i32, i32) = (110, 70);

fn draw(svg: &mut String, map: &Heatmap) -> std::result::Result<(), String> {
    let (nx, ny) = (map.columns.len() as i32, map.rows.len() as i32);
    if nx == 0 || ny == 0 {
        return Err("nothing to draw: no columns or no rows".into());
    }
    let width = (MARGIN.0 + nx * CELL.0 + 30) as u32;
    let height = (MARGIN.1 + ny * CELL.1 + 60) as u32;
    let root = SVGBackend::with_string(svg, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let text = |size: i32, h: HPos, v: VPos| {
        ("sans-serif", size)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(h, v))
    };
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.draw_text(
        map.title,
        &text(17, HPos::Center, VPos::Top),
        (width as i32 / 2, 10),
    )
    .map_err(err)?;
    for (r, row) in map.values.iter().enumerate() {
        let y = MARGIN.1 + r as i32 * CELL.1;
        for (c, value) in row.iter().enumerate() {
            let x = MARGIN.0 + c as i32 * CELL.0;
            let fill = value.map_or(RGBColor(200, 200, 200), colour);
            root.draw(&Rectangle::new(
                [(x, y), (x + CELL.0, y + CELL.1)],
                fill.filled(),
            ))
            .map_err(err)?;
            root.draw(&Rectangle::new(
                [(x, y), (x + CELL.0, y + CELL.1)],
                WHITE.stroke_width(1),
            ))
            .map_err(err)?;
            let label = value.map_or("–".to_string(), |v| format!("{:.0}", 100.0 * v));
            root.draw_text(
                &label,
                &text(13, HPos::Center, VPos::Center),
                (x + CELL.0 / 2, y + CELL.1 / 2),
            )
            .map_err(err)?;
        }
        root.draw_text(
            &map.rows[r],
            &text(13, HPos::Right, VPos::Center),
            (MARGIN.0 - 8, y + CELL.1 / 2),
        )
        .map_err(err)?;
    }
    let below = MARGIN.1 + ny * CELL.1;
    for (c, label) in map.columns.iter().enumerate() {
        root.draw_text(
            label,
            &text(13, HPos::Center, VPos::Top),
            (MARGIN.0 + c as i32 * CELL.0 + CELL.0 / 2, below + 6),
        )
        .map_err(err)?;
    }
    root.draw_text(
        map.x_label,
        &text(14, HPos::Center, VPos::Top),
        (MARGIN.0 + nx * CELL.0 / 2, below + 28),
    )
    .map_err(err)?;
    root.draw_text(
        map.y_label,
        &text(14, HPos::Left, VPos::Bottom),
        (10, MARGIN.1 - 8),
    )
    .map_err(err)?;
    root.present().map_err(|e| e.to_string())
}
