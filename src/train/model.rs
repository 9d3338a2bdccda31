//! DenseNet in tch with torchvision's module tree, parameter names and
//! initialisation, so that torchvision weight files load one to one and our export
//! maps each variable to the ONNX initializer of the same name.
//!
//! (`tch::vision::densenet` is not used: its transition pooling sums instead of
//! averaging.)

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::model::arch::{BN_EPS, DenseNetConfig, Weights};
use crate::train::error::TrainError;

struct DenseLayer {
    norm1: nn::BatchNorm,
    conv1: nn::Conv2D,
    norm2: nn::BatchNorm,
    conv2: nn::Conv2D,
}

struct Transition {
    norm: nn::BatchNorm,
    conv: nn::Conv2D,
}

/// torchvision's `DenseNet`, forward in `forward_t`.
pub struct DenseNet {
    conv0: nn::Conv2D,
    norm0: nn::BatchNorm,
    blocks: Vec<Vec<DenseLayer>>,
    transitions: Vec<Transition>,
    norm_final: nn::BatchNorm,
    classifier: nn::Linear,
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ws_init: nn::init::DEFAULT_KAIMING_NORMAL,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, cfg)
}

fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(
        p,
        c,
        nn::BatchNormConfig {
            eps: f64::from(BN_EPS),
            ..Default::default()
        },
    )
}

impl DenseNet {
    /// Creates the variables under `p` (normally the var store's root).
    pub fn new(p: &nn::Path, c: &DenseNetConfig) -> Self {
        let f = p / "features";
        let g = c.growth_rate as i64;
        let mut ch = c.num_init_features as i64;
        let conv0 = conv(&f / "conv0", 3, ch, 7, 2, 3);
        let norm0 = bn(&f / "norm0", ch);
        let mut blocks = Vec::new();
        let mut transitions = Vec::new();
        for (b, &layers) in c.block_config.iter().enumerate() {
            let bp = &f / format!("denseblock{}", b + 1);
            let mut block = Vec::new();
            for l in 0..layers as i64 {
                let lp = &bp / format!("denselayer{}", l + 1);
                let cin = ch + l * g;
                let inner = (c.bn_size as i64) * g;
                block.push(DenseLayer {
                    norm1: bn(&lp / "norm1", cin),
                    conv1: conv(&lp / "conv1", cin, inner, 1, 1, 0),
                    norm2: bn(&lp / "norm2", inner),
                    conv2: conv(&lp / "conv2", inner, g, 3, 1, 1),
                });
            }
            blocks.push(block);
            ch += layers as i64 * g;
            if b + 1 != c.block_config.len() {
                let tp = &f / format!("transition{}", b + 1);
                transitions.push(Transition {
                    norm: bn(&tp / "norm", ch),
                    conv: conv(&tp / "conv", ch, ch / 2, 1, 1, 0),
                });
                ch /= 2;
            }
        }
        let norm_final = bn(&f / format!("norm{}", c.block_config.len() + 1), ch);
        let bound = 1.0 / (ch as f64).sqrt();
        let classifier = nn::linear(
            p / "classifier",
            ch,
            c.num_classes as i64,
            nn::LinearConfig {
                ws_init: Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
                bs_init: Some(Init::Const(0.0)),
                bias: true,
            },
        );
        Self {
            conv0,
            norm0,
            blocks,
            transitions,
            norm_final,
            classifier,
        }
    }

    /// Logits `[N, classes]` for a `[N, 3, H, W]` batch.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = x.apply(&self.conv0).apply_t(&self.norm0, train).relu();
        x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for (b, block) in self.blocks.iter().enumerate() {
            let mut feats = vec![x];
            for l in block {
                let cat = if feats.len() == 1 {
                    feats[0].shallow_clone()
                } else {
                    Tensor::cat(&feats, 1)
                };
                let y = cat.apply_t(&l.norm1, train).relu().apply(&l.conv1);
                let y = y.apply_t(&l.norm2, train).relu().apply(&l.conv2);
                feats.push(y);
            }
            x = Tensor::cat(&feats, 1);
            if let Some(t) = self.transitions.get(b) {
                x = x.apply_t(&t.norm, train).relu().apply(&t.conv);
                x = x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>);
            }
        }
        x = x.apply_t(&self.norm_final, train).relu();
        x.adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
            .apply(&self.classifier)
    }
}

/// Copies every variable of the store out as [`Weights`] (f32, CPU).
pub fn export_weights(vs: &nn::VarStore) -> Weights {
    vs.variables()
        .into_iter()
        .map(|(name, t)| {
            let t = t
                .detach()
                .to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous();
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            let data = Vec::<f32>::try_from(t.flatten(0, -1))
                .expect("a float tensor converts to Vec<f32>");
            (name, crate::model::arch::Tensor::new(shape, data))
        })
        .collect()
}

/// torchvision's pre-0.x checkpoints name dense-layer parts `norm.1`, `conv.2`;
/// its loader renames them, and so do we.
pub fn torchvision_key(key: &str) -> String {
    let mut k = key.to_string();
    for (old, new) in [
        (".norm.1.", ".norm1."),
        (".relu.1.", ".relu1."),
        (".conv.1.", ".conv1."),
        (".norm.2.", ".norm2."),
        (".relu.2.", ".relu2."),
        (".conv.2.", ".conv2."),
    ] {
        k = k.replace(old, new);
    }
    k
}

/// Loads a torchvision-layout safetensors file into `vs`, all but the classifier
/// (which is replaced by the freshly initialised 2-class one). Says which variable is
/// missing or misshapen otherwise.
pub fn load_torchvision(
    vs: &mut nn::VarStore,
    path: &std::path::Path,
) -> Result<usize, super::TrainError> {
    load_torchvision_file(vs, path, false)
}

/// Loads a torchvision-layout safetensors file of a finished 2-class run into `vs`,
/// classifier included (`--import-weights`). torchvision's `num_batches_tracked`
/// counters have no variable here and are skipped; any other name the network lacks
/// is an error (another network).
pub fn load_torchvision_full(
    vs: &mut nn::VarStore,
    path: &std::path::Path,
) -> Result<usize, super::TrainError> {
    load_torchvision_file(vs, path, true)
}

fn load_torchvision_file(
    vs: &mut nn::VarStore,
    path: &std::path::Path,
    with_classifier: bool,
) -> Result<usize, TrainError> {
    let named = Tensor::read_safetensors(path)
        .map_err(|e| TrainError::Weights(format!("cannot read {}: {e}", path.display())))?;
    let file: std::collections::HashMap<String, Tensor> = named
        .into_iter()
        .map(|(k, t)| (torchvision_key(&k), t))
        .collect();
    let vars = vs.variables();
    if with_classifier
        && let Some(extra) = file
            .keys()
            .find(|k| !k.ends_with("num_batches_tracked") && !vars.contains_key(*k))
    {
        return Err(TrainError::Weights(format!(
            "{} holds `{extra}`, which this network lacks",
            path.display()
        )));
    }
    let mut loaded = 0;
    tch::no_grad(|| {
        for (name, mut var) in vars {
            if !with_classifier && name.starts_with("classifier.") {
                continue;
            }
            let src = file.get(&name).ok_or_else(|| {
                TrainError::Weights({
                    format!(
                        "{} has no `{name}`: not a torchvision DenseNet of this configuration",
                        path.display()
                    )
                })
            })?;
            if src.size() != var.size() {
                return Err(TrainError::Weights(format!(
                    "`{name}` is {:?} in {}, the architecture needs {:?}",
                    src.size(),
                    path.display(),
                    var.size()
                )));
            }
            var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
            loaded += 1;
        }
        Ok(loaded)
    })
}

/// Loads every variable of `vs` (classifier included) from `weights`, e.g. those read
/// back from an exported ONNX file by [`crate::model::onnx::read_weights`]. Says which
/// variable is missing or misshapen; extra entries are an error too (another network).
pub fn load_weights(vs: &mut nn::VarStore, weights: &Weights) -> Result<usize, TrainError> {
    let vars = vs.variables();
    if let Some(extra) = weights.keys().find(|k| !vars.contains_key(*k)) {
        return Err(TrainError::Weights(format!(
            "`{extra}` is not a variable of this network"
        )));
    }
    tch::no_grad(|| {
        for (name, mut var) in vars {
            let src = weights
                .get(&name)
                .ok_or_else(|| TrainError::Weights(format!("no `{name}` among the weights")))?;
            let shape: Vec<i64> = src.shape.iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                return Err(TrainError::Weights(format!(
                    "`{name}` is {shape:?}, the network needs {:?}",
                    var.size()
                )));
            }
            let t = Tensor::from_slice(&src.data).reshape(&shape);
            var.copy_(&t.to_kind(var.kind()).to_device(var.device()));
        }
        Ok(weights.len())
    })
}
