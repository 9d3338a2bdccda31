//! PNG plots of a run (plotters, bitmap backend, bundled DejaVu Sans font):
//! loss and accuracy curves, ROC curves, the test confusion matrix.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::eval::{Metrics, roc_curve};
use crate::train::checkpoint::EpochRecord;
use crate::train::error::TrainError;

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

type R = Result<(), TrainError>;

fn err<E: std::fmt::Display>(e: E) -> TrainError {
    TrainError::Plot(e.to_string())
}

/// What a run's plots are drawn from.
pub struct PlotData<'a> {
    /// The epochs' history (loss and accuracy curves).
    pub history: &'a [EpochRecord],
    /// Validation scores and labels (its ROC curve).
    pub val_scores: &'a [f64],
    /// Validation labels.
    pub val_labels: &'a [u8],
    /// Test scores (its ROC curve).
    pub test_scores: &'a [f64],
    /// Test labels.
    pub test_labels: &'a [u8],
    /// The test metrics (the confusion matrix).
    pub test: &'a Metrics,
}

/// Writes `curves.png`, `roc.png` and `confusion.png` into `dir`.
pub fn write_all(dir: &Path, d: &PlotData<'_>) -> R {
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    curves(&dir.join("curves.png"), d.history)?;
    roc(
        &dir.join("roc.png"),
        d.val_scores,
        d.val_labels,
        d.test_scores,
        d.test_labels,
    )?;
    confusion(&dir.join("confusion.png"), d.test)
}

fn curves(path: &Path, h: &[EpochRecord]) -> R {
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(500);
    let n = h.len().max(2) as f64;
    let max_loss = h
        .iter()
        .flat_map(|r| [r.train_loss, r.val_loss])
        .filter(|v| v.is_finite())
        .fold(0.1, f64::max);
    let mut c = ChartBuilder::on(&left)
        .caption("Loss", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(1f64..n, 0f64..max_loss * 1.05)
        .map_err(err)?;
    c.configure_mesh().x_desc("epoch").draw().map_err(err)?;
    c.draw_series(LineSeries::new(
        h.iter().map(|r| (f64::from(r.epoch), r.train_loss)),
        &BLUE,
    ))
    .map_err(err)?
    .label("train")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], BLUE));
    c.draw_series(LineSeries::new(
        h.iter().map(|r| (f64::from(r.epoch), r.val_loss)),
        &RED,
    ))
    .map_err(err)?
    .label("validation")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], RED));
    c.configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    let mut c = ChartBuilder::on(&right)
        .caption("Accuracy / validation AUC", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(1f64..n, 0.5f64..1.0)
        .map_err(err)?;
    c.configure_mesh().x_desc("epoch").draw().map_err(err)?;
    for (label, color, f) in [
        (
            "train acc",
            BLUE,
            (|r: &EpochRecord| r.train_accuracy) as fn(&EpochRecord) -> f64,
        ),
        ("val acc", RED, |r: &EpochRecord| r.val_accuracy),
        ("val AUC", GREEN, |r: &EpochRecord| r.val_auc),
    ] {
        c.draw_series(LineSeries::new(
            h.iter().map(|r| (f64::from(r.epoch), f(r))),
            &color,
        ))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], color));
    }
    c.configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn roc(path: &Path, vs: &[f64], vl: &[u8], ts: &[f64], tl: &[u8]) -> R {
    let root = BitMapBackend::new(path, (520, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut c = ChartBuilder::on(&root)
        .caption("ROC", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..1.0, 0f64..1.0)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("1 - specificity")
        .y_desc("sensitivity")
        .draw()
        .map_err(err)?;
    for (label, color, s, l) in [("validation", BLUE, vs, vl), ("test", RED, ts, tl)] {
        let auc = crate::eval::auc(s, l).unwrap_or(f64::NAN);
        c.draw_series(LineSeries::new(
            roc_curve(s, l).into_iter().map(|p| (p.fpr, p.tpr)),
            &color,
        ))
        .map_err(err)?
        .label(format!("{label} AUC {auc:.3}"))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], color));
    }
    c.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], &BLACK.mix(0.3)))
        .map_err(err)?;
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn confusion(path: &Path, m: &Metrics) -> R {
    let root = BitMapBackend::new(path, (460, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "Test confusion (acc {:.1} %, threshold {:.2})",
        m.accuracy * 100.0,
        m.threshold
    );
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 17))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..2.0, 0f64..2.0)
        .map_err(err)?;
    c.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .disable_y_axis()
        .x_desc("predicted:  NORMAL (left)  |  PNEUMONIA (right)")
        .y_desc("actual:  NORMAL (bottom)  |  PNEUMONIA (top)")
        .draw()
        .map_err(err)?;
    let cm = &m.confusion;
    // (actual, predicted, count)
    let cells = [
        (0, 0, cm.tn, "TN"),
        (0, 1, cm.fp, "FP"),
        (1, 0, cm.fn_, "FN"),
        (1, 1, cm.tp, "TP"),
    ];
    let max = cells.iter().map(|c| c.2).max().unwrap_or(1).max(1) as f64;
    for (a, p, n, tag) in cells {
        let shade = 1.0 - 0.7 * n as f64 / max;
        let color = RGBColor((255.0 * shade) as u8, (255.0 * shade) as u8, 255);
        let (x, y) = (f64::from(p), f64::from(a));
        c.draw_series([Rectangle::new([(x, y), (x + 1.0, y + 1.0)], color.filled())])
            .map_err(err)?;
        c.draw_series([Text::new(
            format!("{tag} {n}"),
            (x + 0.3, y + 0.55),
            ("sans-serif", 24),
        )])
        .map_err(err)?;
    }
    root.present().map_err(err)
}
