//! The optimizers, on tensors this crate owns, so that their state is saved with the
//! checkpoint and a resumed run ends where the uninterrupted one ends: tch does not
//! serialise libtorch's optimizer state, and a rebuilt `nn::Optimizer` restarts
//! AdamW's moments and its bias-correction step count.
//!
//! The update rules are PyTorch's (`torch.optim.AdamW`, `torch.optim.SGD` with
//! Nesterov momentum), the ones `tch::nn::AdamW` / `nn::Sgd` ran before:
//!
//! - AdamW (β₁ 0.9, β₂ 0.999, ε 1e-8): p ← p·(1 − lr·wd); m ← β₁m + (1 − β₁)g;
//!   v ← β₂v + (1 − β₂)g²; p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε).
//! - SGD (momentum 0.9, Nesterov, no dampening): d ← g + wd·p; b ← 0.9b + d;
//!   p ← p − lr·(d + 0.9b).
//!
//! Their state (`m`, `v` or `b` per parameter, and the step count) goes to
//! `checkpoint.optim.safetensors` beside the weights.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Tensor, nn};

use super::config::OptimizerArg;
use super::error::TrainError;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const MOMENTUM: f64 = 0.9;

/// An optimizer over a var store's trainable variables.
pub(super) struct Optim {
    kind: OptimizerArg,
    weight_decay: f64,
    lr: f64,
    /// Steps taken (AdamW's bias correction counts them).
    steps: u64,
    /// The trainable variables, by name.
    params: BTreeMap<String, Tensor>,
    /// Per parameter: AdamW's first and second moments, or SGD's momentum (first).
    state: BTreeMap<String, (Tensor, Option<Tensor>)>,
}

impl Optim {
    /// An optimizer with fresh state over `vs`'s trainable variables.
    pub(super) fn new(vs: &nn::VarStore, kind: OptimizerArg, lr: f64, weight_decay: f64) -> Self {
        let params: BTreeMap<String, Tensor> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        let state = params
            .iter()
            .map(|(name, p)| {
                let second = matches!(kind, OptimizerArg::Adamw).then(|| p.zeros_like());
                (name.clone(), (p.zeros_like(), second))
            })
            .collect();
        Self {
            kind,
            weight_decay,
            lr,
            steps: 0,
            params,
            state,
        }
    }

    /// The learning rate of the next steps.
    pub(super) fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Steps taken.
    pub(super) fn steps(&self) -> u64 {
        self.steps
    }

    /// Zeroes the gradients, back-propagates `loss` and takes one step.
    pub(super) fn backward_step(&mut self, loss: &Tensor) {
        for p in self.params.values_mut() {
            p.zero_grad();
        }
        loss.backward();
        self.step();
    }

    fn step(&mut self) {
        self.steps += 1;
        let (lr, wd, t) = (self.lr, self.weight_decay, self.steps as i32);
        tch::no_grad(|| {
            for (name, p) in &mut self.params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let Some((first, second)) = self.state.get_mut(name) else {
                    continue;
                };
                match (self.kind, second) {
                    (OptimizerArg::Adamw, Some(v)) => {
                        let m = first;
                        m.copy_(&(&*m * BETA1 + &g * (1.0 - BETA1)));
                        v.copy_(&(&*v * BETA2 + &g * &g * (1.0 - BETA2)));
                        let bc1 = 1.0 - BETA1.powi(t);
                        let bc2 = 1.0 - BETA2.powi(t);
                        let denom = v.sqrt() / bc2.sqrt() + EPS;
                        let update = &*m / denom * (lr / bc1);
                        p.copy_(&(&*p * (1.0 - lr * wd) - update));
                    }
                    _ => {
                        let b = first;
                        let d = &g + &*p * wd;
                        b.copy_(&(&*b * MOMENTUM + &d));
                        let nesterov = d + &*b * MOMENTUM;
                        p.copy_(&(&*p - nesterov * lr));
                    }
                }
            }
        });
    }

    /// Saves the state (moments and step count) to `path`, atomically.
    pub(super) fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut named: Vec<(String, &Tensor)> = Vec::new();
        for (name, (first, second)) in &self.state {
            named.push((format!("first.{name}"), first));
            if let Some(s) = second {
                named.push((format!("second.{name}"), s));
            }
        }
        let steps = Tensor::from_slice(&[self.steps as i64]);
        named.push(("steps".into(), &steps));
        let tmp = path.with_extension("tmp.safetensors");
        Tensor::write_safetensors(&named, &tmp)
            .map_err(|e| TrainError::Write(format!("{}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| TrainError::Write(format!("{}: {e}", path.display())))
    }

    /// Restores the state saved by [`Optim::save`]; refuses one that does not fit
    /// these parameters.
    pub(super) fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let saved: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?
            .into_iter()
            .collect();
        let steps = saved
            .get("steps")
            .ok_or_else(|| anyhow::anyhow!("{}: no step count", path.display()))?
            .int64_value(&[0]);
        for (name, (first, second)) in &mut self.state {
            let restore = |slot: &mut Tensor, key: String| -> anyhow::Result<()> {
                let t = saved
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("{}: no `{key}`", path.display()))?;
                if t.size() != slot.size() {
                    anyhow::bail!("{}: `{key}` has another shape", path.display());
                }
                tch::no_grad(|| slot.copy_(t));
                Ok(())
            };
            restore(first, format!("first.{name}"))?;
            if let Some(s) = second {
                restore(s, format!("second.{name}"))?;
            }
        }
        self.steps = u64::try_from(steps).unwrap_or(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Module, OptimizerConfig};
    use tch::{Device, Kind};

    /// A small two-layer net on `vs`, seeded.
    fn net(vs: &nn::VarStore) -> impl Module {
        tch::manual_seed(7);
        let root = vs.root();
        nn::seq()
            .add(nn::linear(&root / "a", 6, 5, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&root / "b", 5, 2, Default::default()))
    }

    fn weights(vs: &nn::VarStore) -> BTreeMap<String, Vec<f32>> {
        vs.variables()
            .into_iter()
            .map(|(k, t)| (k, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
            .collect()
    }

    /// Ours against libtorch's own optimizers (tch's `nn::AdamW`, `nn::Sgd`), an
    /// implementation we did not write, on the same net, data and learning rates.
    #[test]
    fn the_steps_are_libtorchs() {
        for kind in [OptimizerArg::Adamw, OptimizerArg::Sgd] {
            let (ours_vs, theirs_vs) = (
                nn::VarStore::new(Device::Cpu),
                nn::VarStore::new(Device::Cpu),
            );
            let (ours_net, theirs_net) = (net(&ours_vs), net(&theirs_vs));
            // The same starting weights (libtorch's RNG is shared with the tests
            // running beside this one, so a seed alone does not guarantee them).
            let src = ours_vs.variables();
            tch::no_grad(|| {
                for (name, mut t) in theirs_vs.variables() {
                    t.copy_(&src[&name]);
                }
            });
            assert_eq!(weights(&ours_vs), weights(&theirs_vs));
            let start = weights(&ours_vs);
            let wd = 0.05;
            let mut ours = Optim::new(&ours_vs, kind, 1e-2, wd);
            let mut theirs = match kind {
                OptimizerArg::Adamw => nn::AdamW {
                    wd,
                    ..Default::default()
                }
                .build(&theirs_vs, 1e-2),
                OptimizerArg::Sgd => nn::Sgd {
                    momentum: 0.9,
                    nesterov: true,
                    wd,
                    ..Default::default()
                }
                .build(&theirs_vs, 1e-2),
            }
            .unwrap();
            tch::manual_seed(11);
            for i in 0..8 {
                let lr = 1e-2 * (1.0 + f64::from(i)) / 4.0;
                let x = Tensor::randn([4, 6], (Kind::Float, Device::Cpu));
                let y = Tensor::from_slice(&[0i64, 1, 1, 0]);
                ours.set_lr(lr);
                theirs.set_lr(lr);
                ours.backward_step(&ours_net.forward(&x).cross_entropy_for_logits(&y));
                theirs.backward_step(&theirs_net.forward(&x).cross_entropy_for_logits(&y));
            }
            let (a, b) = (weights(&ours_vs), weights(&theirs_vs));
            for (name, w) in &a {
                for (x, y) in w.iter().zip(&b[name]) {
                    assert!((x - y).abs() < 1e-6, "{kind:?} {name}: {x} vs {y}");
                }
            }
            // And it moved: not a no-op on both sides.
            assert_ne!(a, start, "{kind:?}: the weights did not move");
        }
    }

    #[test]
    fn the_state_round_trips() {
        let vs = nn::VarStore::new(Device::Cpu);
        let n = net(&vs);
        let mut o = Optim::new(&vs, OptimizerArg::Adamw, 1e-2, 0.0);
        let x = Tensor::randn([4, 6], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 1, 0]);
        for _ in 0..3 {
            o.backward_step(&n.forward(&x).cross_entropy_for_logits(&y));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.safetensors");
        o.save(&path).unwrap();
        let mut back = Optim::new(&vs, OptimizerArg::Adamw, 1e-2, 0.0);
        back.load(&path).unwrap();
        assert_eq!(back.steps(), 3);
        for (name, (m, v)) in &o.state {
            let (m2, v2) = &back.state[name];
            assert!(
                m.equal(m2) && v.as_ref().unwrap().equal(v2.as_ref().unwrap()),
                "{name}"
            );
        }
        // SGD's state does not fit AdamW's.
        let mut sgd = Optim::new(&vs, OptimizerArg::Sgd, 1e-2, 0.0);
        sgd.load(&path).unwrap();
        let mut adam = Optim::new(&vs, OptimizerArg::Adamw, 1e-2, 0.0);
        let sgd_path = dir.path().join("s.safetensors");
        sgd.save(&sgd_path).unwrap();
        assert!(adam.load(&sgd_path).is_err());
    }
}
