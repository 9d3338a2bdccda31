//! The DenseNet architecture description shared by the ONNX writer and the trainer.
//!
//! It owns the configuration (growth rate, block sizes, initial features, bottleneck
//! size, classes) and the canonical list of parameters with torchvision's names and
//! shapes, so that a torchvision weight file, our tch module and our ONNX files all
//! agree name for name. DenseNet-161 and the tiny networks used by the tests come out
//! of the same code path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a configuration or a set of weights is not a buildable network.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArchError {
    /// The configuration describes no network.
    #[error("{0}")]
    Config(String),
    /// The weights do not fit the configuration.
    #[error("{0}")]
    Weights(String),
}

/// Epsilon of every BatchNorm layer (torchvision's default).
pub const BN_EPS: f32 = 1e-5;

/// A DenseNet configuration, as in torchvision's `DenseNet(growth_rate, block_config,
/// num_init_features, bn_size, num_classes)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenseNetConfig {
    /// Channels each dense layer adds (48 for DenseNet-161).
    pub growth_rate: usize,
    /// Dense layers in each block ((6, 12, 36, 24) for DenseNet-161).
    pub block_config: Vec<usize>,
    /// Channels of the stem convolution (96 for DenseNet-161).
    pub num_init_features: usize,
    /// Bottleneck width multiplier (4 in torchvision).
    pub bn_size: usize,
    /// Output classes (2 here: NORMAL, PNEUMONIA).
    pub num_classes: usize,
}

impl DenseNetConfig {
    /// torchvision's `densenet161` with a 2-class classifier.
    pub fn densenet161() -> Self {
        Self {
            growth_rate: 48,
            block_config: vec![6, 12, 36, 24],
            num_init_features: 96,
            bn_size: 4,
            num_classes: 2,
        }
    }

    /// A very small DenseNet for tests: same structure, a few thousand parameters.
    pub fn tiny() -> Self {
        Self {
            growth_rate: 4,
            block_config: vec![2, 2],
            num_init_features: 8,
            bn_size: 2,
            num_classes: 2,
        }
    }

    /// Checks that the configuration describes a buildable network.
    pub fn validate(&self) -> Result<(), ArchError> {
        if self.growth_rate == 0 || self.num_init_features == 0 || self.bn_size == 0 {
            return Err(ArchError::Config(
                "growth_rate, num_init_features and bn_size must be > 0".into(),
            ));
        }
        if self.block_config.is_empty() || self.block_config.contains(&0) {
            return Err(ArchError::Config(
                "block_config needs at least one block, each with >= 1 layer".into(),
            ));
        }
        if self.num_classes < 2 {
            return Err(ArchError::Config("num_classes must be >= 2".into()));
        }
        Ok(())
    }

    /// Channels entering the classifier.
    pub fn num_features(&self) -> usize {
        let mut c = self.num_init_features;
        for (i, &n) in self.block_config.iter().enumerate() {
            c += n * self.growth_rate;
            if i + 1 != self.block_config.len() {
                c /= 2;
            }
        }
        c
    }

    /// Every parameter and buffer with torchvision's name and shape, in module order.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        let mut out = Vec::new();
        let conv = |out: &mut Vec<ParamSpec>, name: String, o: usize, i: usize, k: usize| {
            out.push(ParamSpec::new(
                format!("{name}.weight"),
                vec![o, i, k, k],
                Init::Kaiming,
            ));
        };
        let bn = |out: &mut Vec<ParamSpec>, name: String, c: usize| {
            out.push(ParamSpec::new(format!("{name}.weight"), vec![c], Init::One));
            out.push(ParamSpec::new(format!("{name}.bias"), vec![c], Init::Zero));
            out.push(ParamSpec::new(
                format!("{name}.running_mean"),
                vec![c],
                Init::Zero,
            ));
            out.push(ParamSpec::new(
                format!("{name}.running_var"),
                vec![c],
                Init::One,
            ));
        };
        conv(
            &mut out,
            "features.conv0".into(),
            self.num_init_features,
            3,
            7,
        );
        bn(&mut out, "features.norm0".into(), self.num_init_features);
        let mut c = self.num_init_features;
        let inner = self.bn_size * self.growth_rate;
        for (b, &layers) in self.block_config.iter().enumerate() {
            for l in 0..layers {
                let p = format!("features.denseblock{}.denselayer{}", b + 1, l + 1);
                let cin = c + l * self.growth_rate;
                bn(&mut out, format!("{p}.norm1"), cin);
                conv(&mut out, format!("{p}.conv1"), inner, cin, 1);
                bn(&mut out, format!("{p}.norm2"), inner);
                conv(&mut out, format!("{p}.conv2"), self.growth_rate, inner, 3);
            }
            c += layers * self.growth_rate;
            if b + 1 != self.block_config.len() {
                let p = format!("features.transition{}", b + 1);
                bn(&mut out, format!("{p}.norm"), c);
                conv(&mut out, format!("{p}.conv"), c / 2, c, 1);
                c /= 2;
            }
        }
        bn(
            &mut out,
            format!("features.norm{}", self.block_config.len() + 1),
            c,
        );
        out.push(ParamSpec::new(
            "classifier.weight".into(),
            vec![self.num_classes, c],
            Init::Linear,
        ));
        out.push(ParamSpec::new(
            "classifier.bias".into(),
            vec![self.num_classes],
            Init::Zero,
        ));
        out
    }

    /// Number of trainable parameters (BatchNorm running statistics excluded), as
    /// torchvision counts them.
    pub fn trainable_parameter_count(&self) -> usize {
        self.parameters()
            .iter()
            .filter(|p| !p.name.ends_with("running_mean") && !p.name.ends_with("running_var"))
            .map(|p| p.numel())
            .sum()
    }

    /// Deterministic random weights (Kaiming-normal fan-in convolutions, unit BatchNorm,
    /// small classifier), for tests and benchmarks: the outputs are finite and vary
    /// with the input.
    pub fn random_weights(&self, seed: u64) -> Weights {
        let mut rng = SplitMix64(seed);
        let mut w = Weights::new();
        for p in self.parameters() {
            let n = p.numel();
            let data = match p.init {
                Init::Zero => vec![0.0; n],
                Init::One => vec![1.0; n],
                Init::Kaiming => {
                    // torchvision's `kaiming_normal_` (fan-in): std = sqrt(2 / (in * k * k)).
                    let fan_in = p.shape[1] * p.shape[2] * p.shape[3];
                    let std = (2.0 / fan_in as f64).sqrt();
                    (0..n).map(|_| (rng.normal() * std) as f32).collect()
                }
                Init::Linear => {
                    let bound = 1.0 / (p.shape[1] as f64).sqrt();
                    (0..n)
                        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                        .collect()
                }
            };
            w.insert(p.name.clone(), Tensor::new(p.shape.clone(), data));
        }
        w
    }

    /// Checks that `weights` holds exactly this configuration's parameters with the
    /// right shapes, and says which one is missing, extra or misshapen.
    pub fn check_weights(&self, weights: &Weights) -> Result<(), ArchError> {
        let specs = self.parameters();
        for p in &specs {
            match weights.get(&p.name) {
                None => {
                    return Err(ArchError::Weights(format!(
                        "missing parameter `{}` {:?}",
                        p.name, p.shape
                    )));
                }
                Some(t) if t.shape != p.shape => {
                    return Err(ArchError::Weights(format!(
                        "parameter `{}` has shape {:?}, the architecture needs {:?}",
                        p.name, t.shape, p.shape
                    )));
                }
                Some(t) if t.data.len() != p.numel() => {
                    return Err(ArchError::Weights(format!(
                        "parameter `{}` holds {} values for shape {:?}",
                        p.name,
                        t.data.len(),
                        p.shape
                    )));
                }
                Some(_) => {}
            }
        }
        if weights.len() != specs.len() {
            let known: std::collections::HashSet<&str> =
                specs.iter().map(|p| p.name.as_str()).collect();
            let extra: Vec<&String> = weights
                .keys()
                .filter(|k| !known.contains(k.as_str()))
                .take(3)
                .collect();
            return Err(ArchError::Weights(format!(
                "unexpected parameters {extra:?}"
            )));
        }
        Ok(())
    }
}

/// How a parameter is initialised (torchvision's scheme).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Kaiming normal, fan-in, ReLU gain.
    Kaiming,
    /// PyTorch's Linear default bound 1/sqrt(fan_in) (uniform).
    Linear,
    /// Zeros (biases, running means).
    Zero,
    /// Ones (BatchNorm scale, running variances).
    One,
}

/// One named parameter or buffer.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// torchvision's state-dict key.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// How it starts.
    pub init: Init,
}

impl ParamSpec {
    fn new(name: String, shape: Vec<usize>, init: Init) -> Self {
        Self { name, shape, init }
    }

    /// Element count.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A dense f32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

impl Tensor {
    /// Builds a tensor; the caller guarantees `data.len() == shape.product()`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor data length must match its shape"
        );
        Self { shape, data }
    }
}

/// Named weights, keyed by torchvision's state-dict names.
pub type Weights = BTreeMap<String, Tensor>;

/// A tiny deterministic generator (SplitMix64) so that weights and test images do
/// not depend on a random crate's version.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn densenet161_has_torchvision_parameter_count() {
        // torchvision densenet161: 28,681,000 parameters with 1000 classes.
        let mut c = DenseNetConfig::densenet161();
        c.num_classes = 1000;
        assert_eq!(c.trainable_parameter_count(), 28_681_000);
        assert_eq!(c.num_features(), 2208);
        let c2 = DenseNetConfig::densenet161();
        assert_eq!(
            c2.trainable_parameter_count(),
            28_681_000 - 2208 * 998 - 998
        );
    }

    #[test]
    fn parameter_names_follow_torchvision() {
        let names: Vec<String> = DenseNetConfig::densenet161()
            .parameters()
            .into_iter()
            .map(|p| p.name)
            .collect();
        for n in [
            "features.conv0.weight",
            "features.norm0.running_var",
            "features.denseblock1.denselayer1.norm1.running_mean",
            "features.denseblock3.denselayer36.conv2.weight",
            "features.transition3.conv.weight",
            "features.norm5.bias",
            "classifier.weight",
        ] {
            assert!(names.iter().any(|x| x == n), "missing {n}");
        }
    }

    #[test]
    fn check_weights_names_the_problem() {
        let c = DenseNetConfig::tiny();
        let mut w = c.random_weights(1);
        assert!(c.check_weights(&w).is_ok());
        w.remove("classifier.bias");
        assert!(
            c.check_weights(&w)
                .unwrap_err()
                .to_string()
                .contains("classifier.bias")
        );
    }
}
