//! What the demos' timelines (colo-demo, arbiter-demo) share, drawn with plotters on its SVG
//! backend: text styles in CSS pixels, a chart over the demo's seconds, ticks that are thinned to
//! one per pixel, vertical markers, and a legend laid out in rows under the charts.
//!
//! Plotters writes plain SVG elements; it has no `<title>`, so nothing on a timeline shows
//! details on hover: the demos' JSON summaries carry them.

use std::ops::Range;

use plotters::chart::MeshStyle;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// A drawing area of an SVG being written.
pub type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A chart with time (seconds since the demo started) along x.
pub type TimeChart<'a, 'b, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, Y>>;

/// A drawing error of the SVG backend (it writes to a string, so in practice none).
pub type DrawError = DrawingAreaErrorKind<std::io::Error>;

/// A colour from its hex code (0xRRGGBB).
pub const fn rgb(hex: u32) -> RGBColor {
    RGBColor((hex >> 16) as u8, (hex >> 8) as u8, hex as u8)
}

/// Dark grey, for axis labels and notes.
pub const GREY: RGBColor = rgb(0x444444);
/// The frame around a panel.
pub const FRAME: RGBColor = rgb(0x999999);
/// Red, for what went wrong or was done to the pair: a kill, the client's gaps, miscompares,
/// the survivor's announcements.
pub const ALARM: RGBColor = rgb(0xd62728);
/// Green, for traffic: a counter reply, a frame from the VM's MAC.
pub const TRAFFIC: RGBColor = rgb(0x2ca02c);

/// Plotters' SVG backend writes a font size of `size / 1.24`; this gives `px` CSS pixels.
fn pixels(px: f64) -> f64 {
    px * 1.24
}

/// Sans-serif text of `px` pixels in `colour`, anchored at its left end and baseline.
pub fn text(px: f64, colour: RGBColor) -> TextStyle<'static> {
    ("sans-serif", pixels(px)).into_font().color(&colour).pos(Pos::new(HPos::Left, VPos::Bottom))
}

/// The same, bold.
pub fn bold(px: f64, colour: RGBColor) -> TextStyle<'static> {
    ("sans-serif", pixels(px), FontStyle::Bold).into_font().color(&colour).pos(Pos::new(HPos::Left, VPos::Bottom))
}

/// `style` anchored horizontally at `h` (left, centre, right) and vertically at `v`.
pub fn anchored(style: TextStyle<'static>, h: HPos, v: VPos) -> TextStyle<'static> {
    style.pos(Pos::new(h, v))
}

/// The title and the lines under it, from the top left of `area` (x = `left`).
pub fn header(area: &Area, left: i32, title: &str, lines: &[String]) -> Result<(), DrawError> {
    area.draw(&Text::new(title, (left, 24), bold(16.0, BLACK)))?;
    for (i, line) in lines.iter().enumerate() {
        area.draw(&Text::new(line.as_str(), (left, 42 + 16 * i as i32), text(12.0, GREY)))?;
    }
    Ok(())
}

/// A chart on `area` over `time` seconds and `y`, its plotting area `left` pixels from the
/// left edge and `right` from the right one, with the time axis under it if `time_axis`. The
/// demos' panels that share a time line use the same `left` and `right`, so one second is
/// the same pixels in each.
pub fn time_chart<'a, 'b, Y: AsRangedCoord>(
    area: &'a Area<'b>,
    time: Range<f64>,
    y: Y,
    (left, right): (u32, u32),
    (top, bottom): (u32, u32),
    time_axis: bool,
) -> Result<TimeChart<'a, 'b, Y::CoordDescType>, DrawError> {
    ChartBuilder::on(area)
        .margin_right(right)
        .margin_top(top)
        .margin_bottom(bottom)
        .y_label_area_size(left)
        .x_label_area_size(if time_axis { 26 } else { 0 })
        .build_cartesian_2d(time, y)
}

/// The mesh as the demos draw it, to be finished by the caller (labels, description): no
/// vertical grid lines, horizontal ones in `lines` (if any) at the y labels only, grey labels
/// with short ticks, whole seconds on the time axis.
pub fn mesh<'a, 'b, 'c, Y: Ranged + ValueFormatter<Y::ValueType>>(
    chart: &'c mut TimeChart<'a, 'b, Y>,
    lines: Option<RGBColor>,
) -> MeshStyle<'a, 'c, RangedCoordf64, Y, SVGBackend<'b>> {
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .set_all_tick_mark_size(4)
        .axis_style(FRAME)
        .x_labels(20)
        .x_label_formatter(&seconds)
        .label_style(text(12.0, GREY))
        .axis_desc_style(text(12.0, GREY));
    match lines {
        Some(colour) => mesh.bold_line_style(colour),
        None => mesh.disable_y_mesh(),
    };
    mesh
}

/// The time axis's labels: whole seconds.
fn seconds(t: &f64) -> String {
    format!("{:.0} s", t + 0.0)
}

/// `label` in the label area left of `chart`, level with `y`, ending 8 pixels before it.
pub fn label_left<Y: Ranged<ValueType = f64>>(
    chart: &TimeChart<'_, '_, Y>,
    y: f64,
    label: &str,
    style: TextStyle<'static>,
) -> Result<(), DrawError> {
    let text = Text::new(label.to_string(), (-8, 0), anchored(style, HPos::Right, VPos::Center));
    chart.plotting_area().draw(&(EmptyElement::at((chart.x_range().start, y)) + text))
}

/// A thin frame around the plotting area of `chart`.
pub fn frame<Y: Ranged>(chart: &TimeChart<'_, '_, Y>) -> Result<(), DrawError> {
    let area = chart.plotting_area().strip_coord_spec();
    let (w, h) = area.dim_in_pixel();
    area.draw(&Rectangle::new([(0, 0), (w as i32 - 1, h as i32 - 1)], FRAME))
}

/// A vertical line across `chart` at time `t`, dashed (a phase) or solid (a death).
pub fn vline<Y: Ranged<ValueType = f64>>(
    chart: &TimeChart<'_, '_, Y>,
    t: f64,
    style: ShapeStyle,
    dashed: bool,
) -> Result<(), DrawError> {
    vline_between(chart, t, chart.y_range(), style, dashed)
}

/// A vertical line at time `t` from `ys.start` to `ys.end` in `chart`'s y.
pub fn vline_between<Y: Ranged<ValueType = f64>>(
    chart: &TimeChart<'_, '_, Y>,
    t: f64,
    ys: Range<f64>,
    style: ShapeStyle,
    dashed: bool,
) -> Result<(), DrawError> {
    let points = [(t, ys.start), (t, ys.end)];
    if dashed {
        chart.plotting_area().draw(&DashedPathElement::new(points, 4, 3, style))
    } else {
        chart.plotting_area().draw(&PathElement::new(points, style))
    }
}

/// A tick from `ys.start` to `ys.end` at each of `times`, thinned to one per pixel column
/// (thousands of replies would otherwise draw the same column over and over).
pub fn ticks<Y: Ranged<ValueType = f64>>(
    chart: &mut TimeChart<'_, '_, Y>,
    times: impl IntoIterator<Item = f64>,
    ys: Range<f64>,
    style: ShapeStyle,
) -> Result<(), DrawError> {
    let mut last_x = i32::MIN;
    let mut kept = vec![];
    for t in times {
        let x = chart.backend_coord(&(t, ys.start)).0;
        if x != last_x {
            kept.push(t);
            last_x = x;
        }
    }
    chart.draw_series(kept.into_iter().map(|t| PathElement::new([(t, ys.start), (t, ys.end)], style)))?;
    Ok(())
}

/// Whether text starting at pixel `x` (of the whole drawing) and `width` wide would run past
/// the plotting area of `chart`: then it goes on the other side of its anchor.
pub fn runs_off<Y: Ranged>(chart: &TimeChart<'_, '_, Y>, x: i32, width: u32) -> bool {
    x + width as i32 > chart.plotting_area().get_pixel_range().0.end
}

/// Names over a chart, each at its time (a phase's start, a death): bold in `colour`, their
/// baseline at `bottom` in `area`; a name that would run into the previous one goes a row
/// higher, one that would run off the right edge goes left of its time.
pub fn labels_at<Y: Ranged<ValueType = f64>>(
    area: &Area,
    chart: &TimeChart<'_, '_, Y>,
    labels: impl IntoIterator<Item = (f64, String)>,
    bottom: i32,
    colour: RGBColor,
) -> Result<(), DrawError> {
    let style = bold(12.0, colour);
    let y0 = chart.y_range().start;
    let mut label_end = i32::MIN;
    for (t, name) in labels {
        let at = chart.backend_coord(&(t, y0)).0;
        let w = area.estimate_text_size(&name, &style)?.0;
        let flip = runs_off(chart, at + 3, w);
        let (x, h, left) = if flip { (at - 3, HPos::Right, at - 3 - w as i32) } else { (at + 3, HPos::Left, at + 3) };
        let y = if left < label_end + 8 {
            bottom - 14
        } else {
            label_end = left + w as i32;
            bottom
        };
        area.draw(&Text::new(name, (x, y), anchored(style.clone(), h, VPos::Bottom)))?;
    }
    Ok(())
}

/// The mark in front of a legend entry.
#[derive(Debug, Clone, Copy)]
pub enum Key {
    /// A filled square: a bar's or a band's colour.
    Swatch(RGBAColor),
    /// A dot: a marker.
    Dot(RGBAColor),
    /// A short horizontal line: a series.
    Line(RGBAColor),
    /// A short vertical line: a tick.
    Tick(RGBAColor),
    /// A dashed vertical line: a phase.
    Dashed(RGBAColor),
}

/// A legend in rows on `area`: each entry its key and its label, starting at (`left`, `top`),
/// wrapping before `right`. Returns the y below the last row.
pub fn legend(area: &Area, entries: &[(Key, &str)], left: i32, right: i32, top: i32) -> Result<i32, DrawError> {
    const ROW: i32 = 18;
    let label = text(12.0, BLACK);
    let (mut x, mut y) = (left, top + 12);
    for (key, name) in entries {
        let w = 20 + area.estimate_text_size(name, &label)?.0 as i32 + 24;
        if x + w > right && x > left {
            x = left;
            y += ROW;
        }
        let outline = FRAME.stroke_width(1);
        match *key {
            Key::Swatch(c) => {
                area.draw(&Rectangle::new([(x, y - 11), (x + 14, y + 1)], c.filled()))?;
                area.draw(&Rectangle::new([(x, y - 11), (x + 14, y + 1)], outline))?;
            }
            Key::Dot(c) => area.draw(&Circle::new((x + 7, y - 4), 4, c.filled()))?,
            Key::Line(c) => area.draw(&PathElement::new([(x, y - 4), (x + 14, y - 4)], c.stroke_width(2)))?,
            Key::Tick(c) => area.draw(&PathElement::new([(x + 7, y - 11), (x + 7, y + 1)], c.stroke_width(2)))?,
            Key::Dashed(c) => area.draw(&DashedPathElement::new([(x + 7, y - 12), (x + 7, y + 2)], 4, 3, c))?,
        }
        area.draw(&Text::new(*name, (x + 20, y), label.clone()))?;
        x += w;
    }
    Ok(y + ROW)
}

/// How many shapes of `svg` (an SVG these helpers drew) are filled with `colour`: what the
/// demos' drawing tests count bars, lanes and legend swatches by.
pub fn fills(svg: &str, colour: RGBColor) -> usize {
    svg.matches(&format!("fill=\"#{:02X}{:02X}{:02X}\"", colour.0, colour.1, colour.2)).count()
}
