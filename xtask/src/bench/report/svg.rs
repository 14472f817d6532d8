//! Small SVG charts (grouped bars and lines), written as text: no plotting
//! dependency, and the files diff and render anywhere (GitHub shows them).

use std::fmt::Write as _;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 72.0;
const PALETTE: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
];
const TARGET_COLOR: &str = "#d62728";

/// A horizontal reference line (a target), with its label.
#[derive(Debug, Clone)]
pub struct Target {
    pub value: f64,
    pub label: String,
}

/// Bars grouped by category: `values[s][c]` is series `s` in category `c`;
/// `ranges[s][c]` an optional (min, max) whisker.
#[derive(Debug, Clone)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    pub series: Vec<String>,
    pub values: Vec<Vec<Option<f64>>>,
    pub ranges: Vec<Vec<Option<(f64, f64)>>>,
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

/// Escapes text for XML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A short human form: 1234 -> "1.23k", 2500000 -> "2.5M", 0.981 -> "0.981".
pub fn short(v: f64) -> String {
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let digits = if scaled.abs() >= 100.0 || scaled.fract() == 0.0 {
        0
    } else if scaled.abs() >= 10.0 {
        1
    } else if scaled.abs() >= 1.0 {
        2
    } else {
        3
    };
    let text = format!("{scaled:.digits$}");
    // 2.50 -> 2.5, 3.00 -> 3
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    format!("{text}{suffix}")
}

/// Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of
/// ten, about `count` of them.
#[expect(
    clippy::cast_possible_truncation,
    reason = "tick counts are tiny and bounded below"
)]
pub fn nice_ticks(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else if (hi - lo).abs() < f64::EPSILON {
        (lo - 1.0, hi + 1.0)
    } else {
        (hi, lo)
    };
    let raw = (hi - lo) / count.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor() as i64;
    let last = (hi / step).ceil() as i64;
    // Round to the step's decimals: 0.6, not 0.6000000000000001.
    let scale = 10f64.powi((-step.log10().floor()).max(0.0) as i32);
    (first..=last.max(first + 1).min(first + 50))
        .map(|i| {
            let v = (i as f64 * step * scale).round() / scale;
            if v == 0.0 { 0.0 } else { v }
        })
        .collect()
}

/// Maps data values to pixels along one axis.
struct Scale {
    d0: f64,
    d1: f64,
    p0: f64,
    p1: f64,
}

impl Scale {
    fn at(&self, v: f64) -> f64 {
        self.p0 + (v - self.d0) / (self.d1 - self.d0) * (self.p1 - self.p0)
    }
}

fn header(out: &mut String, title: &str) {
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        WIDTH / 2.0,
        escape(title)
    );
}

/// Horizontal grid lines and labels of the y axis.
fn y_axis(out: &mut String, ticks: &[f64], y: &Scale, label: &str) {
    for &t in ticks {
        let py = y.at(t);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#e0e0e0\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            escape(&short(t))
        );
    }
    let mid = (TOP + HEIGHT - BOTTOM) / 2.0;
    let _ = writeln!(
        out,
        "<text transform=\"translate(18 {mid:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n\
         <line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{:.1}\" stroke=\"#333\"/>\n\
         <line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>",
        escape(label),
        HEIGHT - BOTTOM,
        WIDTH - RIGHT,
        HEIGHT - BOTTOM,
        HEIGHT - BOTTOM
    );
}

fn target_line(out: &mut String, target: Option<&Target>, y: &Scale) {
    if let Some(t) = target {
        let py = y.at(t.value);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"{TARGET_COLOR}\" \
             stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"{TARGET_COLOR}\">{}</text>",
            WIDTH - RIGHT,
            WIDTH - RIGHT - 4.0,
            py - 5.0,
            escape(&t.label)
        );
    }
}

fn legend(out: &mut String, names: &[String]) {
    let mut x = LEFT;
    let y = HEIGHT - 20.0;
    for (i, name) in names.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let _ = writeln!(
            out,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{y:.1}\">{}</text>",
            y - 10.0,
            x + 16.0,
            escape(name)
        );
        x += 28.0 + 7.0 * name.chars().count() as f64;
    }
}

/// The y range to draw: the data, the whiskers and the target, from zero.
fn y_range(
    values: impl Iterator<Item = f64>,
    target: Option<&Target>,
    from_zero: bool,
) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in values.chain(target.map(|t| t.value)) {
        if v.is_finite() {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    } else {
        let pad = (hi - lo).max(hi.abs() * 0.01) * 0.1;
        lo -= pad;
    }
    (lo, hi + (hi - lo).max(1e-9) * 0.08)
}

impl BarChart {
    pub fn render(&self) -> String {
        let mut out = String::new();
        header(&mut out, &self.title);
        let all = self
            .values
            .iter()
            .flatten()
            .flatten()
            .copied()
            .chain(self.ranges.iter().flatten().flatten().map(|r| r.1));
        let (lo, hi) = y_range(all, self.target.as_ref(), true);
        let ticks = nice_ticks(lo, hi, 5);
        let y = Scale {
            d0: ticks[0],
            d1: *ticks.last().expect("ticks"),
            p0: HEIGHT - BOTTOM,
            p1: TOP,
        };
        y_axis(&mut out, &ticks, &y, &self.y_label);
        let n_cat = self.categories.len().max(1) as f64;
        let n_ser = self.series.len().max(1) as f64;
        let group = (WIDTH - LEFT - RIGHT) / n_cat;
        let bar = (group * 0.8 / n_ser).min(90.0);
        for (c, cat) in self.categories.iter().enumerate() {
            let gx = LEFT + group * c as f64;
            let start = gx + (group - bar * n_ser) / 2.0;
            for s in 0..self.series.len() {
                let Some(v) = self.values.get(s).and_then(|r| r.get(c)).copied().flatten() else {
                    continue;
                };
                let x = start + bar * s as f64;
                let (top, base) = (y.at(v.max(y.d0)), y.at(y.d0.max(0.0).min(y.d1)));
                let color = PALETTE[s % PALETTE.len()];
                let _ = writeln!(
                    out,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\">\
                     <title>{}: {}</title></rect>",
                    x + 2.0,
                    top.min(base),
                    (bar - 4.0).max(1.0),
                    (base - top).abs(),
                    escape(&format!("{cat} / {}", self.series[s])),
                    escape(&short(v))
                );
                let label_y = if let Some((_, max)) =
                    self.ranges.get(s).and_then(|r| r.get(c)).copied().flatten()
                {
                    let (lo_px, hi_px) = (y.at(self.ranges[s][c].map_or(v, |r| r.0)), y.at(max));
                    let cx = x + bar / 2.0;
                    let _ = writeln!(
                        out,
                        "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{lo_px:.1}\" y2=\"{hi_px:.1}\" stroke=\"#222\"/>\
                         <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{hi_px:.1}\" y2=\"{hi_px:.1}\" stroke=\"#222\"/>\
                         <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{lo_px:.1}\" y2=\"{lo_px:.1}\" stroke=\"#222\"/>",
                        cx - 4.0,
                        cx + 4.0,
                        cx - 4.0,
                        cx + 4.0
                    );
                    hi_px.min(top)
                } else {
                    top
                };
                let _ = writeln!(
                    out,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
                    x + bar / 2.0,
                    label_y - 4.0,
                    escape(&short(v))
                );
            }
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                gx + group / 2.0,
                HEIGHT - BOTTOM + 18.0,
                escape(cat)
            );
        }
        target_line(&mut out, self.target.as_ref(), &y);
        if self.series.len() > 1 {
            legend(&mut out, &self.series);
        }
        out.push_str("</svg>\n");
        out
    }
}

impl LineChart {
    pub fn render(&self) -> String {
        let mut out = String::new();
        header(&mut out, &self.title);
        let points = || self.series.iter().flat_map(|s| s.1.iter());
        let (ylo, yhi) = y_range(
            points().map(|p| p.1),
            self.target.as_ref(),
            self.y_from_zero,
        );
        let yt = nice_ticks(ylo, yhi, 5);
        let y = Scale {
            d0: yt[0],
            d1: *yt.last().expect("ticks"),
            p0: HEIGHT - BOTTOM,
            p1: TOP,
        };
        let (mut xlo, mut xhi) = (f64::INFINITY, f64::NEG_INFINITY);
        for p in points() {
            xlo = xlo.min(p.0);
            xhi = xhi.max(p.0);
        }
        if !xlo.is_finite() {
            (xlo, xhi) = (0.0, 1.0);
        }
        let xt: Vec<(f64, String)> = match &self.x_ticks {
            Some(t) if !t.is_empty() => t.clone(),
            _ => nice_ticks(xlo.min(0.0), xhi, 6)
                .into_iter()
                .map(|t| (t, short(t)))
                .collect(),
        };
        // Given ticks get half a step of room on either side.
        let pad = if self.x_ticks.is_some() { 0.5 } else { 0.0 };
        let (x0, x1) = (
            xt.iter().map(|t| t.0).fold(f64::INFINITY, f64::min) - pad,
            xt.iter().map(|t| t.0).fold(f64::NEG_INFINITY, f64::max) + pad,
        );
        let x = Scale {
            d0: x0,
            d1: if x1 > x0 { x1 } else { x0 + 1.0 },
            p0: LEFT,
            p1: WIDTH - RIGHT,
        };
        y_axis(&mut out, &yt, &y, &self.y_label);
        for (t, label) in &xt {
            let px = x.at(*t);
            let _ = writeln!(
                out,
                "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\
                 <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                HEIGHT - BOTTOM,
                HEIGHT - BOTTOM + 5.0,
                HEIGHT - BOTTOM + 18.0,
                escape(label)
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            (LEFT + WIDTH - RIGHT) / 2.0,
            HEIGHT - BOTTOM + 36.0,
            escape(&self.x_label)
        );
        target_line(&mut out, self.target.as_ref(), &y);
        for (i, (name, pts)) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let path: Vec<String> = pts
                .iter()
                .map(|p| format!("{:.1},{:.1}", x.at(p.0), y.at(p.1)))
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                path.join(" ")
            );
            for p in pts {
                let _ = writeln!(
                    out,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\">\
                     <title>{}: ({}, {})</title></circle>",
                    x.at(p.0),
                    y.at(p.1),
                    escape(name),
                    escape(&short(p.0)),
                    escape(&short(p.1))
                );
            }
        }
        let names: Vec<String> = self.series.iter().map(|s| s.0.clone()).collect();
        legend(&mut out, &names);
        out.push_str("</svg>\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("a<b & \"c\" 'd'>"),
            "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;"
        );
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(0.0), "0");
        assert_eq!(short(0.981), "0.981");
        assert_eq!(short(2.5), "2.5");
        assert_eq!(short(64.0), "64");
        assert_eq!(short(1234.0), "1234");
        assert_eq!(short(45_000.0), "45k");
        assert_eq!(short(45_678.0), "45.7k");
        assert_eq!(short(2_500_000.0), "2.5M");
        assert_eq!(short(-12_000.0), "-12k");
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(nice_ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(
            nice_ticks(0.0, 48_000.0, 5),
            vec![0.0, 10_000.0, 20_000.0, 30_000.0, 40_000.0, 50_000.0]
        );
        let t = nice_ticks(0.83, 1.02, 5);
        assert!(t[0] <= 0.83 && *t.last().unwrap() >= 1.02, "{t:?}");
        assert!(t.len() >= 3 && t.len() <= 12, "{t:?}");
        // Degenerate and reversed ranges still give an axis.
        assert!(nice_ticks(5.0, 5.0, 5).len() >= 2);
        assert_eq!(nice_ticks(1.0, 0.0, 5), nice_ticks(0.0, 1.0, 5));
    }

    #[test]
    fn bar_chart_has_one_bar_per_value_a_target_and_valid_markup() {
        let chart = BarChart {
            title: "churn <loopback>".into(),
            y_label: "connections/s".into(),
            categories: vec!["none".into(), "conn-tracer".into()],
            series: vec!["median".into()],
            values: vec![vec![Some(50_000.0), Some(49_000.0)]],
            ranges: vec![vec![Some((48_000.0, 52_000.0)), None]],
            target: Some(Target {
                value: 49_000.0,
                label: "0.98 x limit".into(),
            }),
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect x=").count(), 2, "{svg}");
        assert!(svg.contains("churn &lt;loopback&gt;"));
        assert!(svg.contains("stroke-dasharray"), "target line");
        assert!(svg.contains(">50k<") && svg.contains(">49k<"));
        assert_eq!(svg.matches('<').count(), svg.matches('>').count());
    }

    #[test]
    fn line_chart_draws_every_point() {
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
        let svg = chart.render();
        assert_eq!(svg.matches("<circle").count(), 4);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(!svg.contains("NaN"));
        let levels = LineChart {
            x_ticks: Some(vec![
                (0.0, "1".into()),
                (1.0, "4".into()),
                (2.0, "16".into()),
            ]),
            ..chart
        };
        let svg = levels.render();
        assert!(svg.contains(">16</text>") && !svg.contains("NaN"));
    }
}
