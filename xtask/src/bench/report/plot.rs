//! Bar and line charts drawn with plotters' SVG backend. Text goes out as
//! SVG `<text>` in the viewer's sans-serif font (GitHub renders them), so
//! no font files are read and nothing links a C library.

use std::ops::Range;

use anyhow::Result;
use plotters::{
    coord::{
        Shift,
        ranged1d::{DefaultFormatting, KeyPointHint, Ranged},
        types::RangedCoordf64,
    },
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::short;

const SIZE: (u32, u32) = (720, 400);
/// The strip under the plot that holds the legend.
const LEGEND_HEIGHT: u32 = 28;
/// plotters' SVG backend writes a font size as size / 1.24: the sizes
/// below are pixels.
const PX: f64 = 1.24;
const TITLE_FONT: f64 = 16.0 * PX;
const LABEL_FONT: f64 = 12.0 * PX;
const VALUE_FONT: f64 = 11.0 * PX;
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0xb0, 0x7a, 0xa1),
];
const TARGET_COLOR: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const GRID_COLOR: RGBColor = RGBColor(0xe0, 0xe0, 0xe0);
const AXIS_COLOR: RGBColor = RGBColor(0x33, 0x33, 0x33);
const WHISKER_COLOR: RGBColor = RGBColor(0x22, 0x22, 0x22);

/// A horizontal reference line (a target), with its label.
#[derive(Debug, Clone)]
pub struct Target {
    pub value: f64,
    pub label: String,
}

/// One bar: its category, its value and an optional (min, max) whisker.
#[derive(Debug, Clone)]
pub struct Bar {
    pub label: String,
    pub value: Option<f64>,
    pub range: Option<(f64, f64)>,
}

/// One bar per category, y from zero.
#[derive(Debug, Clone)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub bars: Vec<Bar>,
    pub target: Option<Target>,
}

/// Lines over a numeric x axis.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    pub target: Option<Target>,
    /// Start the y axis at zero rather than near the data.
    pub y_from_zero: bool,
    /// Ticks at these x values with these labels (e.g. load levels drawn
    /// evenly by index); `None`: round ticks over the data.
    pub x_ticks: Option<Vec<(f64, String)>>,
}

/// A numeric x axis with ticks where the chart says (bar middles, load
/// levels). plotters' own `with_key_points` loses the label formatter of
/// an f64 axis, hence this.
struct XAxis {
    range: Range<f64>,
    ticks: Vec<f64>,
}

impl Ranged for XAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        RangedCoordf64::from(self.range.clone()).map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, _: H) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

type Coords = Cartesian2d<XAxis, RangedCoordf64>;
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Coords>;

/// What `frame` draws around the data.
struct Frame<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    x: Range<f64>,
    x_ticks: Vec<f64>,
    x_format: &'a dyn Fn(&f64) -> String,
    y: Range<f64>,
    target: Option<&'a Target>,
    legend: Vec<&'a str>,
}

/// The y range to draw: the data, the whiskers and the target, with room
/// above (and below, when not from zero).
fn y_range(
    values: impl Iterator<Item = f64>,
    target: Option<&Target>,
    from_zero: bool,
) -> Range<f64> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in values.chain(target.map(|t| t.value)) {
        if v.is_finite() {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    if from_zero {
        lo = lo.min(0.0);
    } else {
        let pad = (hi - lo).max(hi.abs() * 0.01) * 0.1;
        lo -= pad;
    }
    lo..hi + (hi - lo).max(1e-9) * 0.08
}

/// Draws the frame (title, axes, grid, target, legend), then `data` on it.
fn frame(f: &Frame<'_>, data: impl FnOnce(&mut Chart<'_, '_>) -> Result<()>) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let (plot, strip) = if f.legend.is_empty() {
            (root.clone(), None)
        } else {
            let (plot, strip) = root.split_vertically(SIZE.1 - LEGEND_HEIGHT);
            (plot, Some(strip))
        };
        let label_font = ("sans-serif", LABEL_FONT).into_font();
        let mut chart = ChartBuilder::on(&plot)
            .caption(
                f.title,
                ("sans-serif", TITLE_FONT)
                    .into_font()
                    .style(FontStyle::Bold),
            )
            .margin(12)
            .margin_right(24)
            .x_label_area_size(if f.x_label.is_empty() { 28 } else { 48 })
            .y_label_area_size(64)
            .build_cartesian_2d(
                XAxis {
                    range: f.x.clone(),
                    ticks: f.x_ticks.clone(),
                },
                f.y.clone(),
            )?;
        let mut mesh = chart.configure_mesh();
        mesh.disable_x_mesh()
            .bold_line_style(GRID_COLOR)
            .light_line_style(TRANSPARENT)
            .axis_style(AXIS_COLOR)
            .label_style(label_font.clone())
            .axis_desc_style(label_font)
            .x_label_formatter(f.x_format)
            .y_desc(f.y_label)
            .y_labels(8)
            .y_label_formatter(&|v| short(*v));
        if !f.x_label.is_empty() {
            mesh.x_desc(f.x_label);
        }
        mesh.draw()?;
        data(&mut chart)?;
        if let Some(t) = f.target {
            let style = TARGET_COLOR.stroke_width(2);
            chart.draw_series(DashedLineSeries::new(
                [(f.x.start, t.value), (f.x.end, t.value)],
                6,
                4,
                style,
            ))?;
            chart.draw_series([EmptyElement::at((f.x.end, t.value))
                + Text::new(
                    t.label.clone(),
                    (-4, -5),
                    ("sans-serif", LABEL_FONT)
                        .into_font()
                        .color(&TARGET_COLOR)
                        .pos(Pos::new(HPos::Right, VPos::Bottom)),
                )])?;
        }
        if let Some(strip) = strip {
            legend(&strip, &f.legend)?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// A swatch and a name per series, left to right under the plot.
fn legend(strip: &DrawingArea<SVGBackend<'_>, Shift>, names: &[&str]) -> Result<()> {
    let font = TextStyle::from(("sans-serif", LABEL_FONT).into_font());
    let mut x = 80;
    for (i, name) in names.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        strip.draw(&Rectangle::new([(x, 4), (x + 12, 16)], color.filled()))?;
        strip.draw(&Text::new(
            (*name).to_string(),
            (x + 16, 10),
            font.pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
        x += 40 + i32::try_from(strip.estimate_text_size(name, &font)?.0).unwrap_or(0);
    }
    Ok(())
}

impl BarChart {
    pub fn render(&self) -> Result<String> {
        let n = self.bars.len().max(1);
        let values = self
            .bars
            .iter()
            .flat_map(|b| b.value.into_iter().chain(b.range.map(|r| r.1)));
        let labels = |x: &f64| {
            let i = x.floor();
            (i >= 0.0)
                .then(|| self.bars.get(i as usize))
                .flatten()
                .map(|b| b.label.clone())
                .unwrap_or_default()
        };
        let f = Frame {
            title: &self.title,
            x_label: "",
            y_label: &self.y_label,
            x: 0.0..n as f64,
            // A tick (and its label) at the middle of each bar.
            x_ticks: (0..n).map(|i| i as f64 + 0.5).collect(),
            x_format: &labels,
            y: y_range(values, self.target.as_ref(), true),
            target: self.target.as_ref(),
            legend: Vec::new(),
        };
        frame(&f, |chart| {
            let group = f64::from(chart.plotting_area().dim_in_pixel().0) / n as f64;
            let bar = (group * 0.8).min(90.0) - 4.0;
            let side = ((group - bar) / 2.0).max(0.0) as u32;
            let whisker = WHISKER_COLOR.stroke_width(1);
            for (i, b) in self.bars.iter().enumerate() {
                let Some(v) = b.value else { continue };
                let (x, mid) = (i as f64, i as f64 + 0.5);
                let mut rect = Rectangle::new([(x, 0.0), (x + 1.0, v)], PALETTE[0].filled());
                rect.set_margin(0, 0, side, side);
                chart.draw_series([rect])?;
                let top = match b.range {
                    Some((lo, hi)) => {
                        let cap = |y| {
                            EmptyElement::at((mid, y))
                                + PathElement::new([(-4, 0), (4, 0)], whisker)
                        };
                        chart.draw_series([PathElement::new([(mid, lo), (mid, hi)], whisker)])?;
                        chart.draw_series([cap(lo), cap(hi)])?;
                        hi.max(v)
                    }
                    None => v,
                };
                chart.draw_series([EmptyElement::at((mid, top))
                    + Text::new(
                        short(v),
                        (0, -4),
                        TextStyle::from(("sans-serif", VALUE_FONT).into_font())
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )])?;
            }
            Ok(())
        })
    }
}

impl LineChart {
    pub fn render(&self) -> Result<String> {
        let points = || self.series.iter().flat_map(|s| s.1.iter());
        let given = self.x_ticks.as_ref().filter(|t| !t.is_empty());
        let (x, x_ticks) = if let Some(t) = given {
            // Given ticks get half a step of room on either side.
            let at = || t.iter().map(|t| t.0);
            let x = at().fold(f64::INFINITY, f64::min) - 0.5
                ..at().fold(f64::NEG_INFINITY, f64::max) + 0.5;
            (x, at().collect())
        } else {
            // From zero to a little past the data, plotters' round ticks.
            let lo = points().map(|p| p.0).fold(0.0, f64::min);
            let hi = points().map(|p| p.0).fold(lo + 1.0, f64::max);
            let x = lo..hi + (hi - lo) * 0.05;
            let ticks = RangedCoordf64::from(x.clone()).key_points(6);
            (x, ticks)
        };
        let format = |v: &f64| match given {
            Some(t) => t
                .iter()
                .find(|t| (t.0 - v).abs() < 1e-9)
                .map(|t| t.1.clone())
                .unwrap_or_default(),
            None => short(*v),
        };
        let f = Frame {
            title: &self.title,
            x_label: &self.x_label,
            y_label: &self.y_label,
            x,
            x_ticks,
            x_format: &format,
            y: y_range(
                points().map(|p| p.1),
                self.target.as_ref(),
                self.y_from_zero,
            ),
            target: self.target.as_ref(),
            legend: self.series.iter().map(|s| s.0.as_str()).collect(),
        };
        frame(&f, |chart| {
            for (i, (_, pts)) in self.series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of every `<text>` element.
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim()))
            .collect()
    }

    #[test]
    fn bar_chart_has_one_bar_per_value_a_target_and_escaped_text() {
        let chart = BarChart {
            title: "churn <loopback>".into(),
            y_label: "connections/s".into(),
            bars: vec![
                Bar {
                    label: "none".into(),
                    value: Some(50_000.0),
                    range: Some((48_000.0, 52_000.0)),
                },
                Bar {
                    label: "conn-tracer".into(),
                    value: Some(49_000.0),
                    range: None,
                },
                Bar {
                    label: "bpftrace".into(),
                    value: None,
                    range: None,
                },
            ],
            target: Some(Target {
                value: 49_000.0,
                label: "0.98 x limit".into(),
            }),
        };
        let svg = chart.render().unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // The background and two bars: no bar for the missing value.
        assert_eq!(svg.matches("<rect").count(), 3, "{svg}");
        let t = texts(&svg);
        for want in [
            "churn &lt;loopback&gt;",
            "connections/s",
            "50k",
            "49k",
            "0.98 x limit",
            "none",
            "bpftrace",
        ] {
            assert!(t.contains(&want), "{want}: {t:?}");
        }
        // The whisker's stem and two caps.
        assert_eq!(svg.matches("stroke=\"#222222\"").count(), 3, "{svg}");
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn line_chart_draws_every_point_and_the_given_ticks() {
        let chart = LineChart {
            title: "memory".into(),
            x_label: "tracked connections".into(),
            y_label: "MiB".into(),
            series: vec![
                ("RSS".into(), vec![(10_000.0, 20.0), (100_000.0, 50.0)]),
                ("kernel".into(), vec![(10_000.0, 5.0), (100_000.0, 40.0)]),
            ],
            target: None,
            y_from_zero: true,
            x_ticks: None,
        };
        let svg = chart.render().unwrap();
        assert_eq!(svg.matches("<circle").count(), 4);
        for color in ["#4E79A7", "#F28E2B"] {
            let line = format!("stroke=\"{color}\" stroke-width=\"2\"");
            assert_eq!(svg.matches(&line).count(), 1, "{color}: {svg}");
        }
        let t = texts(&svg);
        for want in [
            "memory",
            "RSS",
            "kernel",
            "tracked connections",
            "MiB",
            "100k",
        ] {
            assert!(t.contains(&want), "{want}: {t:?}");
        }
        assert!(!svg.contains("NaN"));
        let levels = LineChart {
            x_ticks: Some(vec![
                (0.0, "1".into()),
                (1.0, "4".into()),
                (2.0, "16".into()),
            ]),
            ..chart
        };
        let svg = levels.render().unwrap();
        assert_eq!(
            texts(&svg)
                .iter()
                .filter(|t| ["1", "4", "16"].contains(t))
                .count(),
            3
        );
        assert!(!svg.contains("NaN"));
    }
}
