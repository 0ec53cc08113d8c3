//! PNG charts of comparison results: one picture that says at a glance where ours wins and
//! where it loses, next to the Markdown tables that hold the numbers.
//!
//! Sections with ratios become horizontal bars of "ours vs peer" advantage (one bar per
//! peer, log scale, starting at the 1.0 line: right of it ours is better, left of it the
//! peer is). Sections without ratios (such as `idle`) become plain value bars, one panel
//! per metric, since their rows share no scale with each other or with the ratios.
//!
//! Text goes through plotters' `ab_glyph` feature with DejaVu Sans loaded at run time from
//! Debian's fonts-dejavu-core, so no fontconfig or freetype library is needed; the image is
//! drawn into a buffer and encoded by the `png` crate (plotters' own encoder would pull in
//! the `image` crate with JPEG and BMP codecs we do not use).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::compare::report::{self, Metric, Row, Section};

/// The chart font, from Debian's fonts-dejavu-core.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The bold face of the same package, for headings (the regular face stands in if absent).
pub const FONT_BOLD: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";
/// Width of every chart in pixels; the height follows the number of rows.
pub const WIDTH: u32 = 1400;

/// The family name the fonts are registered under with plotters.
const FAMILY: &str = "sans-serif";
/// Margin around the picture.
const MARGIN: i32 = 24;
/// Height of one bar and the gap between the bars of one row.
const BAR_H: i32 = 15;
const BAR_GAP: i32 = 3;
/// Space above and below the bars of a row.
const ROW_PAD: i32 = 5;
/// Height of a section heading band.
const HEADING_H: i32 = 30;
/// Height of a line of axis tick labels.
const AXIS_H: i32 = 24;
/// Room left and right of the plot area for the value printed at the end of a bar.
const VALUE_ROOM: i32 = 70;
/// Widest the row labels may get before they are cut with "…".
const MAX_LABEL_W: u32 = 600;
/// Log2 of the smallest and largest ratio the axis shows (1/64× .. 64×); longer bars are
/// cut at the edge, their value is still printed.
const MAX_LOG2: f64 = 6.0;
/// Peer colours (Tableau 10: distinct, and readable on white).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0x9c, 0x75, 0x5f),
];
const GRID: RGBColor = RGBColor(0xd8, 0xd8, 0xd8);
const STRIPE: RGBColor = RGBColor(0xf4, 0xf4, 0xf4);
const BAND: RGBColor = RGBColor(0xe3, 0xea, 0xf3);
const MUTED: RGBColor = RGBColor(0x70, 0x70, 0x70);
const TARGET: RGBColor = RGBColor(0xbb, 0xbb, 0xbb);
const FAILED: RGBColor = RGBColor(0xc0, 0x1c, 0x1c);

/// Errors of drawing a chart.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    /// The font file is missing or unreadable; it comes with Debian's fonts-dejavu-core
    /// (tests/guest/setup.sh installs it).
    #[error(
        "cannot read the chart font {}: {source}; install Debian's fonts-dejavu-core (apt-get install fonts-dejavu-core)",
        path.display()
    )]
    FontMissing {
        /// The font file looked for.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The font file is there but is not a font ab_glyph can parse.
    #[error("{} is not a usable TrueType font; reinstall fonts-dejavu-core", .0.display())]
    FontInvalid(PathBuf),
    /// plotters failed to draw (a font or backend error, as text: plotters' error types
    /// are generic over the backend).
    #[error("drawing the chart: {0}")]
    Draw(String),
    /// The PNG encoder failed.
    #[error("encoding the chart as PNG: {0}")]
    Encode(#[from] png::EncodingError),
    /// The PNG file could not be created.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The chart file.
        path: PathBuf,
        /// Why it could not be written.
        source: std::io::Error,
    },
}

/// Whether the fonts are registered with plotters (its registry is global and wants
/// `'static` bytes, so each file is read and leaked once per process).
static FONTS_READY: Mutex<bool> = Mutex::new(false);

fn read_font(path: &str) -> Result<&'static [u8], ChartError> {
    let bytes = std::fs::read(path).map_err(|source| ChartError::FontMissing {
        path: path.into(),
        source,
    })?;
    Ok(Box::leak(bytes.into_boxed_slice()))
}

/// Loads the chart font. The compare commands call this before measuring, so a missing
/// font is reported at once instead of after minutes of measurements.
pub fn load_font() -> Result<(), ChartError> {
    let mut ready = FONTS_READY.lock().unwrap_or_else(|e| e.into_inner());
    if *ready {
        return Ok(());
    }
    let regular = read_font(FONT)?;
    plotters::style::register_font(FAMILY, FontStyle::Normal, regular)
        .map_err(|_| ChartError::FontInvalid(FONT.into()))?;
    // Bold headings are a nicety: without the file, plotters falls back to the regular face.
    if let Ok(bold) = read_font(FONT_BOLD) {
        plotters::style::register_font(FAMILY, FontStyle::Bold, bold)
            .map_err(|_| ChartError::FontInvalid(FONT_BOLD.into()))?;
    }
    *ready = true;
    Ok(())
}

/// Draws `sections` into one PNG at `path` (see the module documentation).
pub fn write_chart(sections: &[Section], path: &Path) -> Result<(), ChartError> {
    write_chart_with_notes(sections, &[], path)
}

/// Like [`write_chart`], with remarks printed under the bars: `bench compare all` lists
/// the comparisons that failed or were skipped, so the picture does not look complete
/// when it is not.
pub fn write_chart_with_notes(
    sections: &[Section],
    notes: &[String],
    path: &Path,
) -> Result<(), ChartError> {
    load_font()?;
    let layout = Layout::new(sections, notes)?;
    let (w, h) = (WIDTH, layout.height());
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        layout.draw(&root).map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    let write_err = |source| ChartError::Write {
        path: path.into(),
        source,
    };
    let file = File::create(path).map_err(write_err)?;
    let mut enc = png::Encoder::new(BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&buf)?;
    writer.finish()?;
    Ok(())
}

/// The drawing area of a chart, and what drawing on it returns.
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Drawn =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

fn draw_err(e: impl std::fmt::Display) -> ChartError {
    ChartError::Draw(e.to_string())
}

/// A text style of our font.
fn font(size: f64, style: FontStyle) -> TextStyle<'static> {
    (FAMILY, size, style).into_font().color(&BLACK)
}

/// Width of `text` in `style`, in pixels.
fn text_width(style: &TextStyle, text: &str) -> Result<u32, ChartError> {
    style
        .font
        .box_size(text)
        .map(|(w, _)| w)
        .map_err(|e| ChartError::Draw(format!("measuring text: {e}")))
}

/// `text` cut with "…" so that it fits in `max` pixels.
fn fit(style: &TextStyle, text: &str, max: u32) -> Result<String, ChartError> {
    if text_width(style, text)? <= max {
        return Ok(text.to_string());
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let s: String = chars.iter().collect::<String>() + "…";
        if text_width(style, &s)? <= max {
            return Ok(s);
        }
    }
    Ok(String::new())
}

/// Draws `text` with its capitals centred on `y`. plotters' ab_glyph text puts the
/// baseline half a size below the anchor, so "centre" is computed here rather than with
/// `VPos::Center`, which would sit a quarter of a line too high.
fn label(area: &Area, text: &str, (x, y): (i32, i32), style: &TextStyle, h: HPos) -> Drawn {
    let size = style.font.get_size();
    let top = y - (size * 0.14).round() as i32;
    area.draw(&Text::new(
        text.to_string(),
        (x, top),
        style.pos(Pos::new(h, VPos::Top)),
    ))
}

/// "name (unit)" or "name".
fn metric_label(m: &Metric) -> String {
    if m.unit.is_empty() {
        m.name.to_string()
    } else {
        format!("{} ({})", m.name, m.unit)
    }
}

/// Ratio formatted for a bar end: "1.23×", "12.3×", "0.045×".
fn ratio_text(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.1}×")
    } else if r >= 0.1 {
        format!("{r:.2}×")
    } else {
        format!("{r:.3}×")
    }
}

/// Value formatted for a value bar: three significant digits or so.
fn value_text(v: f64, unit: &str) -> String {
    let n = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if unit.is_empty() {
        n
    } else {
        format!("{n} {unit}")
    }
}

/// One horizontal line of bars with its label.
struct BarRow {
    label: String,
    /// (colour index, value; None: not measured).
    bars: Vec<(usize, Option<f64>)>,
    /// What a row without bars says: "not measured", or ours' own value when no peer
    /// has one (a measurement of ours alone, such as migrate's switch-over stall).
    empty: String,
}

impl BarRow {
    fn height(&self) -> i32 {
        let n = self.bars.len().max(1) as i32;
        n * BAR_H + (n - 1) * BAR_GAP + 2 * ROW_PAD
    }
}

/// A panel of value bars: one metric of one section without ratios.
struct ValuePanel {
    heading: String,
    unit: &'static str,
    /// Value that spans the whole plot width.
    max: f64,
    rows: Vec<BarRow>,
    /// Contender names with their text widths, when there is more than one (a legend in
    /// the heading band says which colour is which).
    legend: Vec<(String, i32)>,
}

impl ValuePanel {
    /// Colour of contender `i`: a column named "target" (see `idle`) is grey, so that it
    /// reads as a reference rather than as one more contender.
    fn color(&self, i: usize) -> RGBColor {
        match self.legend.get(i) {
            Some((name, _)) if name == "target" => TARGET,
            _ => PALETTE[i % PALETTE.len()],
        }
    }
}

/// Everything placed, before any pixel is drawn (the height must be known first).
struct Layout {
    title: String,
    subtitle: String,
    /// Names of the peers, indexed by colour.
    peers: Vec<String>,
    /// Ratio sections: heading and rows (empty rows: "no results").
    ratio_sections: Vec<(String, Vec<BarRow>)>,
    value_panels: Vec<ValuePanel>,
    notes: Vec<String>,
    /// Log2 range of the ratio axis.
    lo: f64,
    hi: f64,
    /// Right edge of the labels; left and right edge of the plot area.
    label_right: i32,
    plot_left: i32,
    plot_right: i32,
}

const TITLE_PX: f64 = 24.0;
const SUBTITLE_PX: f64 = 15.0;
const TEXT_PX: f64 = 14.0;
const VALUE_PX: f64 = 13.0;
const HEADING_PX: f64 = 15.0;
const LINE_H: i32 = 22;

impl Layout {
    fn new(sections: &[Section], notes: &[String]) -> Result<Self, ChartError> {
        let mut peers: Vec<String> = Vec::new();
        let mut ratio_sections = Vec::new();
        let mut value_panels = Vec::new();
        let (mut min_r, mut max_r) = (1.0f64, 1.0f64);
        for s in sections {
            let heading = format!("{} — {}", s.name, s.title);
            if s.ratios {
                let mut color_of = Vec::new();
                for i in s.peers() {
                    let name = &s.contenders[i];
                    let c = match peers.iter().position(|p| p == name) {
                        Some(c) => c,
                        None => {
                            peers.push(name.clone());
                            peers.len() - 1
                        }
                    };
                    color_of.push((i, c));
                }
                let rows = s
                    .rows
                    .iter()
                    .map(|r| BarRow {
                        label: format!("{}: {} {}", s.name, r.case, r.metric.name),
                        // Only peers measured in this row get a bar (net's load-generator
                        // rows have no guest peer and the other way round); a row with
                        // none says "not measured" once.
                        bars: color_of
                            .iter()
                            .filter_map(|&(i, c)| {
                                r.advantage(i).filter(|a| *a > 0.0).map(|a| (c, Some(a)))
                            })
                            .collect(),
                        empty: match r.median(0) {
                            Some(v) => format!("ours only: {}", value_text(v, r.metric.unit)),
                            None => "not measured".into(),
                        },
                    })
                    .collect::<Vec<_>>();
                for v in rows.iter().flat_map(|r| r.bars.iter().filter_map(|b| b.1)) {
                    min_r = min_r.min(v);
                    max_r = max_r.max(v);
                }
                ratio_sections.push((heading, rows));
            } else {
                value_panels.extend(value_panels_of(s)?);
            }
        }
        // Whole powers of two around the data, at least 0.5×..2×, at most 1/64×..64×.
        let lo = min_r.log2().floor().clamp(-MAX_LOG2, -1.0);
        let hi = max_r.log2().ceil().clamp(1.0, MAX_LOG2);

        let text = font(TEXT_PX, FontStyle::Normal);
        let mut widest = 0;
        for r in ratio_sections
            .iter()
            .flat_map(|(_, rows)| rows)
            .chain(value_panels.iter().flat_map(|p| &p.rows))
        {
            widest = widest.max(text_width(&text, &r.label)?);
        }
        let label_w = widest.min(MAX_LABEL_W) as i32;
        for r in ratio_sections
            .iter_mut()
            .flat_map(|(_, rows)| rows)
            .chain(value_panels.iter_mut().flat_map(|p| &mut p.rows))
        {
            r.label = fit(&text, &r.label, label_w as u32)?;
        }
        let label_right = MARGIN + label_w;
        let plot_left = label_right + 12 + VALUE_ROOM;
        let plot_right = WIDTH as i32 - MARGIN - VALUE_ROOM;

        let when = report::now_utc();
        Ok(Layout {
            title: if sections.is_empty() {
                "vhost dataplane: no results".into()
            } else if ratio_sections.is_empty() {
                format!(
                    "vhost dataplane: {}",
                    sections
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                "vhost dataplane: ours vs peers (ratio of medians; > 1 = ours better)".into()
            },
            // The machine line grew the idle setting: cut to the width, not off the canvas.
            subtitle: fit(
                &font(SUBTITLE_PX, FontStyle::Normal),
                &format!("{} · {when}", report::machine()),
                WIDTH - 2 * MARGIN as u32,
            )?,
            peers,
            ratio_sections,
            value_panels,
            notes: notes
                .iter()
                .map(|n| fit(&text, n, WIDTH - 2 * MARGIN as u32))
                .collect::<Result<_, _>>()?,
            lo,
            hi,
            label_right,
            plot_left,
            plot_right,
        })
    }

    /// Lines of the legend (peer swatches wrapped to the width), computed on a fixed
    /// character estimate so that height() needs no font.
    fn legend_lines(&self) -> Vec<Vec<usize>> {
        let mut lines: Vec<Vec<usize>> = Vec::new();
        let mut used = i32::MAX;
        let avail = WIDTH as i32 - 2 * MARGIN;
        for (i, p) in self.peers.iter().enumerate() {
            let w = Self::legend_item_w(p);
            if used.saturating_add(w) > avail {
                lines.push(Vec::new());
                used = 100; // "ours vs:"
            }
            used += w;
            if let Some(l) = lines.last_mut() {
                l.push(i);
            }
        }
        lines
    }

    fn legend_item_w(name: &str) -> i32 {
        // 8 px per character is generous for DejaVu Sans at 14 px; plus swatch and gap.
        name.chars().count() as i32 * 8 + 16 + 8 + 28
    }

    fn header_height(&self) -> i32 {
        let mut h = MARGIN + 32 + 22; // title, subtitle
        if !self.ratio_sections.is_empty() {
            h += 8 + LINE_H * self.legend_lines().len() as i32 + LINE_H; // legend, explanation
        }
        h + 10
    }

    fn ratio_height(&self) -> i32 {
        if self.ratio_sections.is_empty() {
            return 0;
        }
        let rows: i32 = self
            .ratio_sections
            .iter()
            .map(|(_, rows)| {
                HEADING_H
                    + if rows.is_empty() {
                        LINE_H
                    } else {
                        rows.iter().map(BarRow::height).sum()
                    }
            })
            .sum();
        2 * AXIS_H + rows + 16
    }

    fn value_height(&self) -> i32 {
        self.value_panels
            .iter()
            .map(|p| HEADING_H + p.rows.iter().map(BarRow::height).sum::<i32>() + 12)
            .sum()
    }

    fn height(&self) -> u32 {
        let notes = if self.notes.is_empty() {
            0
        } else {
            8 + LINE_H * self.notes.len() as i32
        };
        (self.header_height() + self.ratio_height() + self.value_height() + notes + MARGIN).max(200)
            as u32
    }

    /// x pixel of a ratio (clamped to the axis).
    fn x_of(&self, ratio: f64) -> i32 {
        let v = ratio.log2().clamp(self.lo, self.hi);
        let f = (v - self.lo) / (self.hi - self.lo);
        self.plot_left + (f * f64::from(self.plot_right - self.plot_left)).round() as i32
    }

    /// Ratios that get a grid line and a tick label: powers of two, and 1.5× and 3× (and
    /// their inverses) when there is room for them.
    fn ticks(&self) -> Vec<f64> {
        let px_per_octave = f64::from(self.plot_right - self.plot_left) / (self.hi - self.lo);
        let mut t = Vec::new();
        let mut e = self.lo;
        while e <= self.hi + 1e-9 {
            t.push(e.exp2());
            e += 1.0;
        }
        if px_per_octave >= 150.0 {
            for r in [1.5, 3.0, 6.0, 12.0, 24.0, 48.0] {
                for v in [r, 1.0 / r] {
                    let l = f64::log2(v);
                    if l > self.lo && l < self.hi {
                        t.push(v);
                    }
                }
            }
        }
        t.sort_by(|a, b| a.total_cmp(b));
        t
    }

    fn draw(&self, root: &Area) -> Drawn {
        root.fill(&WHITE)?;
        let w = WIDTH as i32;
        let text = font(TEXT_PX, FontStyle::Normal);
        let muted = text.color(&MUTED);
        let mut y = MARGIN;
        label(
            root,
            &self.title,
            (MARGIN, y + 12),
            &font(TITLE_PX, FontStyle::Bold),
            HPos::Left,
        )?;
        y += 32;
        label(
            root,
            &self.subtitle,
            (MARGIN, y + 9),
            &font(SUBTITLE_PX, FontStyle::Normal).color(&MUTED),
            HPos::Left,
        )?;
        y += 22;

        if !self.ratio_sections.is_empty() {
            y += 8;
            for (n, line) in self.legend_lines().into_iter().enumerate() {
                let cy = y + LINE_H / 2;
                if n == 0 {
                    label(root, "ours vs:", (MARGIN, cy), &text, HPos::Left)?;
                }
                let mut x = MARGIN + 100;
                for i in line {
                    let color = PALETTE[i % PALETTE.len()];
                    root.draw(&Rectangle::new(
                        [(x, cy - 7), (x + 16, cy + 7)],
                        color.filled(),
                    ))?;
                    label(root, &self.peers[i], (x + 24, cy), &text, HPos::Left)?;
                    x += Self::legend_item_w(&self.peers[i]);
                }
                y += LINE_H;
            }
            label(
                root,
                "Bars start at 1.0 (log scale): right = ours better by that factor, left = the peer better. \
                 Latency and CPU: the peer's value over ours.",
                (MARGIN, y + LINE_H / 2),
                &muted,
                HPos::Left,
            )?;
            y += LINE_H;
        }
        y += 10;

        if !self.ratio_sections.is_empty() {
            let top = y + AXIS_H;
            let bottom = top + self.ratio_height() - 2 * AXIS_H - 16;
            // Stripes first, the grid over them, then headings (on top of the grid, so no
            // line runs through their text), then the bars and the 1.0 line per section.
            let mut ry = top;
            let mut stripe = false;
            let mut headings = Vec::new();
            let mut row_ys = Vec::new();
            let mut spans = Vec::new();
            for (heading, rows) in &self.ratio_sections {
                headings.push((ry, heading, rows.is_empty()));
                ry += HEADING_H;
                if rows.is_empty() {
                    ry += LINE_H;
                    continue;
                }
                let start = ry;
                for r in rows {
                    if stripe {
                        root.draw(&Rectangle::new(
                            [(MARGIN, ry), (w - MARGIN, ry + r.height())],
                            STRIPE.filled(),
                        ))?;
                    }
                    stripe = !stripe;
                    row_ys.push((ry, r));
                    ry += r.height();
                }
                spans.push((start, ry));
            }
            for t in self.ticks() {
                let x = self.x_of(t);
                let one = (t - 1.0).abs() < 1e-9;
                if !one {
                    root.draw(&PathElement::new(
                        vec![(x, top), (x, bottom)],
                        GRID.stroke_width(1),
                    ))?;
                }
                let tick = ratio_tick(t);
                let style = if one {
                    font(TEXT_PX, FontStyle::Bold)
                } else {
                    text.clone()
                };
                label(root, &tick, (x, top - AXIS_H / 2), &style, HPos::Center)?;
                label(root, &tick, (x, bottom + AXIS_H / 2), &style, HPos::Center)?;
            }
            for (hy, heading, empty) in headings {
                root.draw(&Rectangle::new(
                    [(MARGIN, hy + 4), (w - MARGIN, hy + HEADING_H - 2)],
                    BAND.filled(),
                ))?;
                label(
                    root,
                    heading,
                    (MARGIN + 8, hy + HEADING_H / 2 + 1),
                    &font(HEADING_PX, FontStyle::Bold),
                    HPos::Left,
                )?;
                if empty {
                    label(
                        root,
                        "no results",
                        (MARGIN + 8, hy + HEADING_H + LINE_H / 2),
                        &muted,
                        HPos::Left,
                    )?;
                }
            }
            let x1 = self.x_of(1.0);
            for (ry, r) in row_ys {
                label(
                    root,
                    &r.label,
                    (self.label_right, ry + r.height() / 2),
                    &text,
                    HPos::Right,
                )?;
                if r.bars.is_empty() {
                    label(
                        root,
                        &r.empty,
                        (x1 + 6, ry + r.height() / 2),
                        &font(VALUE_PX, FontStyle::Normal).color(&MUTED),
                        HPos::Left,
                    )?;
                }
                let mut by = ry + ROW_PAD;
                for &(c, v) in &r.bars {
                    let color = PALETTE[c % PALETTE.len()];
                    let cy = by + BAR_H / 2;
                    match v {
                        Some(v) => {
                            let x = self.x_of(v);
                            let (a, b) = if x >= x1 { (x1, x) } else { (x, x1) };
                            root.draw(&Rectangle::new(
                                [(a, by), (b.max(a + 1), by + BAR_H)],
                                color.filled(),
                            ))?;
                            let value = font(VALUE_PX, FontStyle::Normal);
                            if v >= 1.0 {
                                label(root, &ratio_text(v), (b + 5, cy), &value, HPos::Left)?;
                            } else {
                                label(root, &ratio_text(v), (a - 5, cy), &value, HPos::Right)?;
                            }
                        }
                        None => {
                            label(
                                root,
                                "not measured",
                                (x1 + 6, cy),
                                &font(VALUE_PX, FontStyle::Normal).color(&MUTED),
                                HPos::Left,
                            )?;
                        }
                    }
                    by += BAR_H + BAR_GAP;
                }
            }
            for (a, b) in spans {
                root.draw(&PathElement::new(
                    vec![(x1, a), (x1, b)],
                    BLACK.stroke_width(2),
                ))?;
            }
            y += self.ratio_height();
        }

        for p in &self.value_panels {
            root.draw(&Rectangle::new(
                [(MARGIN, y + 4), (w - MARGIN, y + HEADING_H - 2)],
                BAND.filled(),
            ))?;
            label(
                root,
                &p.heading,
                (MARGIN + 8, y + HEADING_H / 2 + 1),
                &font(HEADING_PX, FontStyle::Bold),
                HPos::Left,
            )?;
            // Legend, right-aligned in the band: swatch, gap, name, gap to the next.
            let cy = y + HEADING_H / 2 + 1;
            let mut x =
                w - MARGIN - 8 - p.legend.iter().map(|(_, tw)| 16 + 6 + tw + 18).sum::<i32>();
            for (i, (name, tw)) in p.legend.iter().enumerate() {
                root.draw(&Rectangle::new(
                    [(x, cy - 7), (x + 16, cy + 7)],
                    p.color(i).filled(),
                ))?;
                label(root, name, (x + 22, cy), &text, HPos::Left)?;
                x += 16 + 6 + tw + 18;
            }
            y += HEADING_H;
            let x0 = self.plot_left - VALUE_ROOM;
            let span = f64::from(self.plot_right - x0);
            for r in &p.rows {
                label(
                    root,
                    &r.label,
                    (self.label_right, y + r.height() / 2),
                    &text,
                    HPos::Right,
                )?;
                let mut by = y + ROW_PAD;
                for &(c, v) in &r.bars {
                    let cy = by + BAR_H / 2;
                    match v {
                        Some(v) => {
                            let len = if p.max > 0.0 {
                                (v / p.max * span).round() as i32
                            } else {
                                0
                            };
                            root.draw(&Rectangle::new(
                                [(x0, by), (x0 + len.max(1), by + BAR_H)],
                                p.color(c).filled(),
                            ))?;
                            label(
                                root,
                                &value_text(v, p.unit),
                                (x0 + len.max(1) + 5, cy),
                                &font(VALUE_PX, FontStyle::Normal),
                                HPos::Left,
                            )?;
                        }
                        None => label(
                            root,
                            "not measured",
                            (x0 + 6, cy),
                            &font(VALUE_PX, FontStyle::Normal).color(&MUTED),
                            HPos::Left,
                        )?,
                    }
                    by += BAR_H + BAR_GAP;
                }
                y += r.height();
            }
            root.draw(&PathElement::new(
                vec![
                    (x0, y - p.rows.iter().map(BarRow::height).sum::<i32>()),
                    (x0, y),
                ],
                BLACK.stroke_width(1),
            ))?;
            y += 12;
        }

        if !self.notes.is_empty() {
            y += 8;
            let failed = text.color(&FAILED);
            for n in &self.notes {
                let style = if n.contains("FAILED") {
                    &failed
                } else {
                    &muted
                };
                label(root, n, (MARGIN, y + LINE_H / 2), style, HPos::Left)?;
                y += LINE_H;
            }
        }
        Ok(())
    }
}

/// Tick label: "1×", "2×", "0.5×", "1.5×", "0.67×", "1/8×".
fn ratio_tick(t: f64) -> String {
    if (t - t.round()).abs() < 1e-9 {
        format!("{t:.0}×")
    } else if t >= 0.25 {
        let s = format!("{t:.2}");
        format!("{}×", s.trim_end_matches('0'))
    } else {
        format!("1/{:.0}×", 1.0 / t)
    }
}

/// One value panel per metric of a section without ratios; a bar per contender that
/// measured the row.
fn value_panels_of(s: &Section) -> Result<Vec<ValuePanel>, ChartError> {
    let mut metrics: Vec<Metric> = Vec::new();
    for r in &s.rows {
        if !metrics.contains(&r.metric) {
            metrics.push(r.metric);
        }
    }
    metrics
        .into_iter()
        .map(|m| {
            let rows: Vec<&Row> = s.rows.iter().filter(|r| r.metric == m).collect();
            let max = rows
                .iter()
                .flat_map(|r| (0..s.contenders.len()).filter_map(|i| r.median(i)))
                .fold(0.0f64, f64::max);
            // A percentage is drawn against its whole (100), so that 0.02 % CPU does not
            // fill the panel the way the largest of a few tiny values otherwise would.
            let max = if m.unit == "%" { max.max(100.0) } else { max };
            ValuePanel {
                heading: format!("{} — {}: {}", s.name, s.title, metric_label(&m)),
                unit: m.unit,
                max,
                legend: Vec::new(),
                rows: rows
                    .iter()
                    .map(|r| BarRow {
                        label: format!("{}: {} {}", s.name, r.case, r.metric.name),
                        bars: (0..s.contenders.len()).map(|i| (i, r.median(i))).collect(),
                        empty: "not measured".into(),
                    })
                    .collect(),
            }
        })
        .map(|mut p| {
            if s.contenders.len() > 1 {
                let style = font(TEXT_PX, FontStyle::Normal);
                for c in &s.contenders {
                    p.legend.push((c.clone(), text_width(&style, c)? as i32));
                }
            }
            Ok(p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::report::{CPU_PCT, IOPS, P50_US, RSS_MIB};

    /// Width, height and colour type of a PNG, decoding every pixel (so a truncated or
    /// corrupt file fails).
    fn png_info(path: &Path) -> (u32, u32, png::ColorType) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        (info.width, info.height, info.color_type)
    }

    fn ratio_section(name: &str, rows: usize) -> Section {
        Section {
            name: name.into(),
            title: format!("{name} title"),
            description: "d".into(),
            contenders: vec!["ours".into(), "peer A".into(), "peer B".into()],
            ratios: true,
            rows: (0..rows)
                .map(|i| Row {
                    case: format!("case {i}"),
                    metric: if i % 2 == 0 { IOPS } else { P50_US },
                    samples: vec![
                        vec![100.0 + i as f64 * 10.0],
                        vec![80.0, 90.0],
                        if i == 1 { vec![] } else { vec![300.0] },
                    ],
                })
                .collect(),
            notes: vec![],
        }
    }

    fn idle_section() -> Section {
        Section {
            name: "idle".into(),
            title: "Idle".into(),
            description: "d".into(),
            contenders: vec!["idle".into()],
            ratios: false,
            rows: vec![
                Row {
                    case: "vhost-blk-backend".into(),
                    metric: RSS_MIB,
                    samples: vec![vec![3.2]],
                },
                Row {
                    case: "vhost-blk-backend".into(),
                    metric: CPU_PCT,
                    samples: vec![vec![0.0]],
                },
                Row {
                    case: "serial-backend".into(),
                    metric: RSS_MIB,
                    samples: vec![vec![2.9]],
                },
            ],
            notes: vec![],
        }
    }

    #[test]
    fn chart_is_a_png_of_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one.png");
        write_chart(&[ratio_section("blk", 4)], &one).unwrap();
        let (w, h1, color) = png_info(&one);
        assert_eq!(w, WIDTH);
        assert_eq!(color, png::ColorType::Rgb);
        assert!(h1 > 200, "{h1}");

        // More rows, more sections, a section without ratios and notes: taller, same width.
        let all = dir.path().join("all.png");
        write_chart_with_notes(
            &[
                ratio_section("blk", 4),
                ratio_section("net", 6),
                idle_section(),
            ],
            &["migrate: skipped".into()],
            &all,
        )
        .unwrap();
        let (w, h2, _) = png_info(&all);
        assert_eq!(w, WIDTH);
        assert!(h2 > h1 + 6 * 30, "{h1} {h2}");
    }

    #[test]
    fn height_follows_rows() {
        load_font().unwrap();
        let h = |s: &[Section]| Layout::new(s, &[]).unwrap().height();
        let base = h(&[ratio_section("blk", 1)]);
        // Row 1 has one peer measured (one bar), row 2 both (two bars and their gap).
        let one = (BAR_H + 2 * ROW_PAD) as u32;
        let two = (2 * BAR_H + BAR_GAP + 2 * ROW_PAD) as u32;
        assert_eq!(h(&[ratio_section("blk", 3)]), base + one + two);
        let l = Layout::new(&[ratio_section("blk", 2)], &[]).unwrap();
        let bars: Vec<usize> = l.ratio_sections[0].1.iter().map(|r| r.bars.len()).collect();
        assert_eq!(bars, [2, 1]);
        assert!(h(&[ratio_section("blk", 1), idle_section()]) > base);
    }

    #[test]
    fn axis_covers_the_data() {
        load_font().unwrap();
        let l = Layout::new(&[ratio_section("blk", 2)], &[]).unwrap();
        // Ratios: 100/85 = 1.18, 300/100 -> 0.33 (peer B better), p50 85/110 = 0.77.
        assert_eq!((l.lo, l.hi), (-2.0, 1.0));
        assert_eq!(l.x_of(0.25), l.plot_left);
        assert_eq!(l.x_of(2.0), l.plot_right);
        assert_eq!(l.x_of(1000.0), l.plot_right);
        let t = l.ticks();
        assert!(
            t.contains(&1.0) && t.contains(&0.25) && t.contains(&2.0),
            "{t:?}"
        );
        assert_eq!(ratio_tick(0.5), "0.5×");
        assert_eq!(ratio_tick(1.5), "1.5×");
        assert_eq!(ratio_tick(4.0), "4×");
        assert_eq!(ratio_tick(0.125), "1/8×");
        assert_eq!(ratio_tick(1.0 / 64.0), "1/64×");
    }

    #[test]
    fn a_row_without_peers_shows_ours_or_not_measured() {
        load_font().unwrap();
        let mut s = ratio_section("migrate", 1);
        s.rows.push(Row {
            case: "stall".into(),
            metric: P50_US,
            samples: vec![vec![1.5, 1.7, 9.0], vec![], vec![]],
        });
        s.rows.push(Row {
            case: "not run".into(),
            metric: P50_US,
            samples: vec![vec![], vec![], vec![]],
        });
        let l = Layout::new(&[s], &[]).unwrap();
        let rows = &l.ratio_sections[0].1;
        assert_eq!(rows[0].bars.len(), 2);
        assert!(rows[1].bars.is_empty() && rows[2].bars.is_empty());
        assert_eq!(rows[1].empty, "ours only: 1.70 µs");
        assert_eq!(rows[2].empty, "not measured");
    }

    #[test]
    fn empty_and_value_only_charts_render() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("idle.png");
        write_chart(&[idle_section()], &p).unwrap();
        assert_eq!(png_info(&p).0, WIDTH);
        let p = dir.path().join("empty.png");
        write_chart(&[ratio_section("blk", 0)], &p).unwrap();
        assert_eq!(png_info(&p).0, WIDTH);
        let p = dir.path().join("nothing.png");
        write_chart(&[], &p).unwrap();
        assert_eq!(png_info(&p).1, 200);
    }

    #[test]
    fn missing_font_names_the_package() {
        let e = read_font("/nonexistent/DejaVuSans.ttf").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/nonexistent/DejaVuSans.ttf")
                && msg.contains("apt-get install fonts-dejavu-core"),
            "{msg}"
        );
    }

    #[test]
    fn long_labels_are_cut() {
        load_font().unwrap();
        let style = font(TEXT_PX, FontStyle::Normal);
        let long = "x".repeat(400);
        let cut = fit(&style, &long, 300).unwrap();
        assert!(cut.ends_with('…'));
        assert!(text_width(&style, &cut).unwrap() <= 300);
        assert_eq!(fit(&style, "short", 300).unwrap(), "short");
    }
}
