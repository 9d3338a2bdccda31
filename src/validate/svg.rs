//! Small SVG charts for the site report (self-contained files a browser, a Markdown
//! viewer or a PDF printer shows as they are): lines, points, bars and vertical
//! marks on linear axes.

use std::fmt::Write as _;

/// What a chart draws.
pub enum Mark<'a> {
    /// A polyline through the points, with its legend.
    Line(&'a str, &'a str, Vec<(f64, f64)>),
    /// Dots, with their legend.
    Points(&'a str, &'a str, Vec<(f64, f64)>),
    /// Bars `(x0, x1, height)`, with their legend.
    Bars(&'a str, &'a str, Vec<(f64, f64, f64)>),
    /// A vertical line at x, with its legend.
    VLine(&'a str, &'a str, f64),
}

/// A chart: title, axis labels and ranges, and what it draws.
pub struct Chart<'a> {
    /// Title.
    pub title: &'a str,
    /// x axis label.
    pub x_label: &'a str,
    /// y axis label.
    pub y_label: &'a str,
    /// x range.
    pub x: (f64, f64),
    /// y range.
    pub y: (f64, f64),
    /// What to draw.
    pub marks: Vec<Mark<'a>>,
    /// Where the legend's top left corner is, as shares of the plot's width and
    /// height from its top left (away from what the chart draws).
    pub legend: (f64, f64),
}

const W: f64 = 520.0;
const H: f64 = 400.0;
const L: f64 = 60.0;
const R: f64 = 20.0;
const T: f64 = 40.0;
const B: f64 = 50.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart<'_> {
    fn px(&self, x: f64) -> f64 {
        let (a, b) = self.x;
        L + (x.clamp(a, b) - a) / (b - a).max(f64::MIN_POSITIVE) * (W - L - R)
    }

    fn py(&self, y: f64) -> f64 {
        let (a, b) = self.y;
        H - B - (y.clamp(a, b) - a) / (b - a).max(f64::MIN_POSITIVE) * (H - T - B)
    }

    /// The chart as an SVG document.
    pub fn svg(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">"#
        );
        let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = write!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
            W / 2.0,
            esc(self.title)
        );
        // Axes, ticks and grid.
        for i in 0..=5 {
            let f = f64::from(i) / 5.0;
            let (xv, yv) = (
                self.x.0 + f * (self.x.1 - self.x.0),
                self.y.0 + f * (self.y.1 - self.y.0),
            );
            let (x, y) = (self.px(xv), self.py(yv));
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{:.1}" stroke="#e4e4e4"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                H - B,
                H - B + 16.0,
                tick(xv)
            );
            let _ = write!(
                s,
                r##"<line x1="{L}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - R,
                L - 6.0,
                y + 4.0,
                tick(yv)
            );
        }
        let _ = write!(
            s,
            r##"<rect x="{L}" y="{T}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/>"##,
            W - L - R,
            H - T - B
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            L + (W - L - R) / 2.0,
            H - 12.0,
            esc(self.x_label)
        );
        let _ = write!(
            s,
            r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
            T + (H - T - B) / 2.0,
            T + (H - T - B) / 2.0,
            esc(self.y_label)
        );
        let mut legend = Vec::new();
        for m in &self.marks {
            match m {
                Mark::Line(name, colour, pts) => {
                    let d: Vec<String> = pts
                        .iter()
                        .map(|&(x, y)| format!("{:.1},{:.1}", self.px(x), self.py(y)))
                        .collect();
                    let _ = write!(
                        s,
                        r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                        d.join(" ")
                    );
                    legend.push((*name, *colour));
                }
                Mark::Points(name, colour, pts) => {
                    for &(x, y) in pts {
                        let _ = write!(
                            s,
                            r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{colour}"/>"#,
                            self.px(x),
                            self.py(y)
                        );
                    }
                    legend.push((*name, *colour));
                }
                Mark::Bars(name, colour, bars) => {
                    for &(x0, x1, h) in bars {
                        let (a, b, top) = (self.px(x0), self.px(x1), self.py(h));
                        let _ = write!(
                            s,
                            r#"<rect x="{a:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{colour}" fill-opacity="0.55"/>"#,
                            (b - a).max(0.5),
                            (self.py(self.y.0) - top).max(0.0)
                        );
                    }
                    legend.push((*name, *colour));
                }
                Mark::VLine(name, colour, x) => {
                    let px = self.px(*x);
                    let _ = write!(
                        s,
                        r#"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{:.1}" stroke="{colour}" stroke-width="2" stroke-dasharray="6 4"/>"#,
                        H - B
                    );
                    legend.push((*name, *colour));
                }
            }
        }
        legend.retain(|(name, _)| !name.is_empty());
        let (x0, y0) = (
            L + self.legend.0 * (W - L - R),
            T + 4.0 + self.legend.1 * (H - T - B),
        );
        for (i, (name, colour)) in legend.iter().enumerate() {
            let y = y0 + 14.0 + 16.0 * i as f64;
            let _ = write!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                x0,
                y - 9.0,
                x0 + 16.0,
                y,
                esc(name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_one_svg_with_its_marks_inside_the_frame() {
        let c = Chart {
            title: "ROC <site>",
            x_label: "1 - specificity",
            y_label: "sensitivity",
            x: (0.0, 1.0),
            y: (0.0, 1.0),
            marks: vec![
                Mark::Line("site", "#1f77b4", vec![(0.0, 0.0), (0.5, 1.0), (2.0, 1.0)]),
                Mark::VLine("threshold", "#d62728", 0.25),
            ],
            legend: (0.5, 0.6),
        };
        let s = c.svg();
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("ROC &lt;site&gt;"));
        // (2, 1) is clamped to the frame's right edge.
        assert!(s.contains(&format!("{:.1},{:.1}", W - R, T)), "{s}");
    }
}
