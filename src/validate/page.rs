//! The site report as a page a clinician reads (`site-report.md`), and its plots.

use std::fmt::Write as _;

use super::svg::{Chart, Mark};
use super::{AtThreshold, ModelReport, SiteReport};
use crate::eval::site::Interval;

const BLUE: &str = "#1f77b4";
const ORANGE: &str = "#ff7f0e";
const RED: &str = "#d62728";
const GREEN: &str = "#2ca02c";
const GREY: &str = "#7f7f7f";

fn pct(i: &Option<Interval>) -> String {
    match i {
        Some(i) => format!(
            "{:.1} % ({:.1}–{:.1})",
            i.value * 100.0,
            i.low * 100.0,
            i.high * 100.0
        ),
        None => "–".into(),
    }
}

fn num(i: &Option<Interval>) -> String {
    match i {
        Some(i) => format!("{:.3} ({:.3}–{:.3})", i.value, i.low, i.high),
        None => "–".into(),
    }
}

fn opt_pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.1} %", v * 100.0))
}

/// Bars of a histogram of `v` in `bins` equal bins over `[lo, hi]`, as shares.
fn histogram(v: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<(f64, f64, f64)> {
    let mut n = vec![0u64; bins];
    for &x in v {
        let b = (((x - lo) / (hi - lo) * bins as f64).floor().max(0.0) as usize).min(bins - 1);
        n[b] += 1;
    }
    let total = v.len().max(1) as f64;
    let w = (hi - lo) / bins as f64;
    (0..bins)
        .map(|b| {
            (
                lo + w * b as f64,
                lo + w * (b + 1) as f64,
                n[b] as f64 / total,
            )
        })
        .collect()
}

/// Each plot of a model: (file name, SVG).
pub(super) fn plots(m: &ModelReport) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let title = |what: &str| format!("{} {}: {what}", m.name, m.version);
    if let Some(l) = &m.labelled {
        let roc: Vec<(f64, f64)> = l.roc.iter().map(|p| (p.fpr, p.tpr)).collect();
        let card = &l.at_card_threshold;
        let point = |a: &AtThreshold| {
            a.sensitivity
                .zip(a.specificity)
                .map(|(se, sp)| (1.0 - sp.value, se.value))
        };
        let mut marks = vec![
            Mark::Line("ROC on the site's films", BLUE, roc),
            Mark::Line("chance", GREY, vec![(0.0, 0.0), (1.0, 1.0)]),
        ];
        if let Some(p) = point(card) {
            marks.push(Mark::Points("the card's threshold", RED, vec![p]));
        }
        if let Some(p) = l.chosen.as_ref().and_then(point) {
            marks.push(Mark::Points("the site's operating point", GREEN, vec![p]));
        }
        out.push((
            format!("{}-roc.svg", m.name),
            Chart {
                title: &title(&format!("ROC, AUC {}", num(&l.auc))),
                x_label: "1 − specificity (false-positive rate)",
                y_label: "sensitivity",
                x: (0.0, 1.0),
                y: (0.0, 1.0),
                marks,
                legend: (0.45, 0.62),
            }
            .svg(),
        ));
        let rel: Vec<(f64, f64)> = l
            .reliability
            .iter()
            .map(|b| (b.predicted, b.observed))
            .collect();
        out.push((
            format!("{}-calibration.svg", m.name),
            Chart {
                title: &title(&format!("calibration, ECE {}", num(&l.ece))),
                x_label: "predicted P(PNEUMONIA), mean of the bin",
                y_label: "share labelled PNEUMONIA",
                x: (0.0, 1.0),
                y: (0.0, 1.0),
                marks: vec![
                    Mark::Line("perfect calibration", GREY, vec![(0.0, 0.0), (1.0, 1.0)]),
                    Mark::Line("the site's films (10 bins)", BLUE, rel.clone()),
                    Mark::Points("", BLUE, rel),
                ],
                legend: (0.45, 0.7),
            }
            .svg(),
        ));
    }
    let p: Vec<f64> = m.films.iter().filter_map(|f| f.p_pneumonia).collect();
    if !p.is_empty() {
        let by = |want: Option<u8>| -> Vec<f64> {
            m.films
                .iter()
                .filter(|f| want.is_none() || f.label == want)
                .filter_map(|f| f.p_pneumonia)
                .collect()
        };
        let mut marks = Vec::new();
        if m.labelled.is_some() {
            marks.push(Mark::Bars(
                "labelled NORMAL",
                BLUE,
                histogram(&by(Some(0)), 0.0, 1.0, 20),
            ));
            marks.push(Mark::Bars(
                "labelled PNEUMONIA",
                ORANGE,
                histogram(&by(Some(1)), 0.0, 1.0, 20),
            ));
        } else {
            marks.push(Mark::Bars("every film", BLUE, histogram(&p, 0.0, 1.0, 20)));
        }
        marks.push(Mark::VLine("the card's threshold", RED, m.card_threshold));
        if let Some(c) = m.labelled.as_ref().and_then(|l| l.chosen.as_ref()) {
            marks.push(Mark::VLine("the site's threshold", GREEN, c.threshold));
        }
        let top = marks
            .iter()
            .filter_map(|k| match k {
                Mark::Bars(_, _, b) => b.iter().map(|x| x.2).reduce(f64::max),
                _ => None,
            })
            .fold(0.05, f64::max);
        out.push((
            format!("{}-scores.svg", m.name),
            Chart {
                title: &title("P(PNEUMONIA) as served"),
                x_label: "P(PNEUMONIA)",
                y_label: "share of films",
                x: (0.0, 1.0),
                y: (0.0, top * 1.1),
                marks,
                legend: (0.3, 0.0),
            }
            .svg(),
        ));
    }
    if let Some(o) = &m.ood {
        let s: Vec<f64> = m.films.iter().filter_map(|f| f.ood_score).collect();
        let hi = (o
            .quantiles
            .max
            .max(o.card_threshold)
            .max(o.card_refuse_threshold.unwrap_or(0.0))
            * 1.1)
            .max(1.0);
        let bars = histogram(&s, 0.0, hi, 30);
        let top = bars.iter().map(|b| b.2).fold(0.05, f64::max);
        let mut marks = vec![
            Mark::Bars("the site's films", BLUE, bars),
            Mark::VLine("the card's OOD threshold", RED, o.card_threshold),
        ];
        if let Some(t) = o.card_refuse_threshold {
            marks.push(Mark::VLine("the card's refusal threshold", ORANGE, t));
        }
        if let Some(t) = o.site_threshold {
            marks.push(Mark::VLine("the site's OOD threshold", GREEN, t));
        }
        out.push((
            format!("{}-ood.svg", m.name),
            Chart {
                title: &title("out-of-distribution score"),
                x_label: "OOD score (higher: less like the training films)",
                y_label: "share of films",
                x: (0.0, hi),
                y: (0.0, top * 1.1),
                marks,
                legend: (0.45, 0.0),
            }
            .svg(),
        ));
    }
    out
}

fn row(s: &mut String, a: &AtThreshold) {
    let _ = writeln!(
        s,
        "| {} | {:.3} | {} | {} | {} | {} {} {} {} |",
        a.rule,
        a.threshold,
        pct(&a.sensitivity),
        pct(&a.specificity),
        pct(&a.accuracy),
        a.confusion.tp,
        a.confusion.fp,
        a.confusion.tn,
        a.confusion.fn_
    );
}

/// The Markdown page.
pub(super) fn markdown(r: &SiteReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Site validation: {}, {}\n", r.site, r.date);
    let _ = writeln!(
        s,
        "{} image files from `{}` ({} other files skipped); labels: {}. Every film went through the same decoding, gates, model, calibration and out-of-distribution (OOD) score as the server's answers. {}. Written by {}.\n",
        r.images, r.films, r.skipped, r.labels, r.intervals, r.generated_by
    );
    let _ = writeln!(
        s,
        "How to read it: **sensitivity** is the share of films labelled PNEUMONIA that the model called PNEUMONIA; **specificity** the share of films labelled NORMAL it called NORMAL. The range after each figure is its 95 % confidence interval: with few films it is wide, and a figure whose interval overlaps the model card's is not shown to differ from it.\n"
    );
    for m in &r.models {
        let _ = writeln!(
            s,
            "## {} {} (`{}`…, {})\n",
            m.name,
            m.version,
            &m.onnx_sha256[..m.onnx_sha256.len().min(12)],
            m.execution_provider
        );
        let refused: u64 = m.refused.values().sum();
        let _ = writeln!(
            s,
            "- Answered: {} films; refused before the model: {refused}{}.",
            m.answered,
            if m.refused.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    m.refused
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        if let Some(o) = &m.ood {
            let _ = writeln!(
                s,
                "- OOD score: median {:.2} (5–95 %: {:.2}–{:.2}, max {:.2}); the card's threshold {:.2}{} would refuse {} of these films{}{}.",
                o.quantiles.p50,
                o.quantiles.p05,
                o.quantiles.p95,
                o.quantiles.max,
                o.card_threshold,
                o.card_refuse_threshold
                    .map_or(String::new(), |r| format!(" (refusing above {r:.2})")),
                pct(&Some(o.refused_at_card)),
                o.shift_at_card.map_or(String::new(), |i| format!(
                    " and answer {} as a distribution shift",
                    pct(&Some(i))
                )),
                match (o.site_threshold, o.refused_at_site) {
                    (Some(t), Some(r)) => format!(
                        "; the threshold fitted on this site, {t:.2}, refuses {} (the metrics below are on the films it lets through)",
                        pct(&Some(r))
                    ),
                    _ => " (the metrics below are on the films it lets through)".into(),
                }
            );
        }
        if let Some(q) = &m.p_pneumonia {
            let _ = writeln!(
                s,
                "- P(PNEUMONIA): median {:.3} (quartiles {:.3}–{:.3}).",
                q.p50, q.p25, q.p75
            );
        }
        match &m.labelled {
            Some(l) => {
                let _ = writeln!(
                    s,
                    "\n{} labelled films ({} PNEUMONIA, {} NORMAL). AUC {}, ECE {} (the card's test split: AUC {}, sensitivity {}, specificity {}).\n",
                    l.n,
                    l.pneumonia,
                    l.normal,
                    num(&l.auc),
                    num(&l.ece),
                    l.card_test.auc.map_or("–".into(), |a| format!("{a:.3}")),
                    opt_pct(l.card_test.sensitivity),
                    opt_pct(l.card_test.specificity)
                );
                let _ = writeln!(
                    s,
                    "| threshold | P(PNEUMONIA) ≥ | sensitivity | specificity | accuracy | tp fp tn fn |\n|---|---|---|---|---|---|"
                );
                row(&mut s, &l.at_card_threshold);
                for t in &l.targets {
                    row(&mut s, t);
                }
                if let Some(c) = &l.chosen {
                    let _ = write!(s, "| **chosen by the site:** ");
                    let mut r2 = String::new();
                    row(&mut r2, c);
                    s.push_str(r2.trim_start_matches("| "));
                }
                s.push('\n');
            }
            None => {
                let _ = writeln!(
                    s,
                    "\nUnlabelled: no sensitivity or specificity; the distributions above and below say whether these films resemble the training films.\n"
                );
            }
        }
        for p in &m.plots {
            let _ = writeln!(s, "![{p}]({p})");
        }
        s.push('\n');
    }
    s
}
