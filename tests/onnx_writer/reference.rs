//! An independent, deliberately naive forward pass of torchvision's DenseNet.

use super::*;

fn get<'a>(w: &'a Weights, n: &str) -> &'a Tensor {
    w.get(n).unwrap_or_else(|| panic!("missing {n}"))
}

fn conv(x: &Tensor, k: &Tensor, stride: usize, pad: usize) -> Tensor {
    let (c, h, wd) = (x.shape[0], x.shape[1], x.shape[2]);
    let (o, ci, kh, kw) = (k.shape[0], k.shape[1], k.shape[2], k.shape[3]);
    assert_eq!(c, ci);
    let oh = (h + 2 * pad - kh) / stride + 1;
    let ow = (wd + 2 * pad - kw) / stride + 1;
    let mut out = vec![0f32; o * oh * ow];
    for oc in 0..o {
        for y in 0..oh {
            for xx in 0..ow {
                let mut acc = 0f64;
                for ic in 0..c {
                    for i in 0..kh {
                        for j in 0..kw {
                            let yy = (y * stride + i) as isize - pad as isize;
                            let xj = (xx * stride + j) as isize - pad as isize;
                            if yy < 0 || xj < 0 || yy >= h as isize || xj >= wd as isize {
                                continue;
                            }
                            let xv = x.data[ic * h * wd + yy as usize * wd + xj as usize];
                            acc += f64::from(xv)
                                * f64::from(k.data[((oc * c + ic) * kh + i) * kw + j]);
                        }
                    }
                }
                out[oc * oh * ow + y * ow + xx] = acc as f32;
            }
        }
    }
    Tensor::new(vec![o, oh, ow], out)
}

fn bn_relu(x: &Tensor, w: &Weights, p: &str) -> Tensor {
    let (g, b, m, v) = (
        get(w, &format!("{p}.weight")),
        get(w, &format!("{p}.bias")),
        get(w, &format!("{p}.running_mean")),
        get(w, &format!("{p}.running_var")),
    );
    let hw = x.shape[1] * x.shape[2];
    let mut out = x.data.clone();
    for c in 0..x.shape[0] {
        for i in 0..hw {
            let y = (x.data[c * hw + i] - m.data[c]) / (v.data[c] + BN_EPS).sqrt() * g.data[c]
                + b.data[c];
            out[c * hw + i] = y.max(0.0);
        }
    }
    Tensor::new(x.shape.clone(), out)
}

fn pool(x: &Tensor, k: usize, stride: usize, pad: usize, max: bool) -> Tensor {
    let (c, h, wd) = (x.shape[0], x.shape[1], x.shape[2]);
    let oh = (h + 2 * pad - k) / stride + 1;
    let ow = (wd + 2 * pad - k) / stride + 1;
    let mut out = Vec::new();
    for ch in 0..c {
        for y in 0..oh {
            for xx in 0..ow {
                let mut acc = if max { f32::NEG_INFINITY } else { 0.0 };
                for i in 0..k {
                    for j in 0..k {
                        let yy = (y * stride + i) as isize - pad as isize;
                        let xj = (xx * stride + j) as isize - pad as isize;
                        if yy < 0 || xj < 0 || yy >= h as isize || xj >= wd as isize {
                            continue;
                        }
                        let v = x.data[ch * h * wd + yy as usize * wd + xj as usize];
                        if max { acc = acc.max(v) } else { acc += v }
                    }
                }
                out.push(if max { acc } else { acc / (k * k) as f32 });
            }
        }
    }
    Tensor::new(vec![c, oh, ow], out)
}

fn cat(xs: &[Tensor]) -> Tensor {
    let c = xs.iter().map(|t| t.shape[0]).sum();
    let data = xs.iter().flat_map(|t| t.data.iter().copied()).collect();
    Tensor::new(vec![c, xs[0].shape[1], xs[0].shape[2]], data)
}

pub fn densenet(cfg: &DenseNetConfig, w: &Weights, x: Tensor) -> Vec<f32> {
    let x = final_features(cfg, w, x);
    let hw = x.shape[1] * x.shape[2];
    let gap: Vec<f32> = (0..x.shape[0])
        .map(|c| x.data[c * hw..(c + 1) * hw].iter().sum::<f32>() / hw as f32)
        .collect();
    let (cw, cb) = (get(w, "classifier.weight"), get(w, "classifier.bias"));
    (0..cfg.num_classes)
        .map(|k| {
            cb.data[k]
                + gap
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v * cw.data[k * gap.len() + i])
                    .sum::<f32>()
        })
        .collect()
}

/// The ReLU'd output of the last block's norm: `[C, h, w]`.
pub fn final_features(cfg: &DenseNetConfig, w: &Weights, x: Tensor) -> Tensor {
    let mut x = conv(&x, get(w, "features.conv0.weight"), 2, 3);
    x = bn_relu(&x, w, "features.norm0");
    x = pool(&x, 3, 2, 1, true);
    for (b, &layers) in cfg.block_config.iter().enumerate() {
        let mut feats = vec![x.clone()];
        for l in 0..layers {
            let p = format!("features.denseblock{}.denselayer{}", b + 1, l + 1);
            let y = bn_relu(&cat(&feats), w, &format!("{p}.norm1"));
            let y = conv(&y, get(w, &format!("{p}.conv1.weight")), 1, 0);
            let y = bn_relu(&y, w, &format!("{p}.norm2"));
            feats.push(conv(&y, get(w, &format!("{p}.conv2.weight")), 1, 1));
        }
        x = cat(&feats);
        if b + 1 != cfg.block_config.len() {
            let p = format!("features.transition{}", b + 1);
            x = bn_relu(&x, w, &format!("{p}.norm"));
            x = conv(&x, get(w, &format!("{p}.conv.weight")), 1, 0);
            x = pool(&x, 2, 2, 0, false);
        }
    }
    bn_relu(
        &x,
        w,
        &format!("features.norm{}", cfg.block_config.len() + 1),
    )
}
