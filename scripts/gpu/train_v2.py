#!/usr/bin/env python3
"""Models v2 on a GPU: trains both cxr variants (weighted, augmented) as torchvision
DenseNet-161s at 224 px, with the acquisition-shift recipe of issue 13, and writes
each one's best-epoch weights (torchvision parameter names, safetensors) and its
history. `cxr-train --import-weights` then exports and measures them on this CPU
(our ONNX writer, ONNX Runtime, the card): nothing here touches the test split.

It mirrors cxr-train exactly where the result depends on it:
  * the patient-level validation split (SplitMix64, same seed, same walk), so the
    validation images cxr-train measures were never trained on;
  * the preprocessing (8-bit gray, 224 x 224, replicated to 3 channels, ImageNet
    mean/std);
  * the two strategies: `weighted` = cross-entropy with class weight
    1 - n_class / n_total; `augmented` = NORMAL topped up with transformed copies
    (made once, seeded) until the classes are equal, plain cross-entropy.

The recipe (both variants): from scratch, AdamW, one warm-up epoch then cosine,
label smoothing 0.1, random resized crops and small rotations (no flips: the heart's
side matters), photometric augmentation that mimics other exposures and processing
(gamma, contrast, brightness, blur, sharpening, local contrast, noise) for both
classes. The epoch is chosen on validation only: the mean of the clean and the
stressed (fixed, seeded, stronger photometric perturbations) validation losses.
The number of epochs is set by a wall-time budget, measured on the first epoch.

    python3 scripts/gpu/train_v2.py --data DIR --out DIR [--epochs 31] [--resume] [--tiny]

Each epoch ends with a checkpoint (`<out>/<strategy>.ckpt.pt`: weights, optimizer,
generator states, history, best epoch); `--resume` continues a stopped run from it,
bit for bit on the same device (`--stop-after-epochs N` stops one on purpose).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
CLASSES = ["NORMAL", "PNEUMONIA"]
M64 = (1 << 64) - 1


class SplitMix64:
    """crate::arch::SplitMix64, bit for bit."""

    def __init__(self, seed):
        self.s = seed & M64

    def next_u64(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & M64
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def uniform(self):
        return (self.next_u64() >> 11) / float(1 << 53)

    def below(self, n):
        return int(self.uniform() * n)


def patient_id(name):
    """crate::train::data::patient_id."""
    stem = name.rsplit(".", 1)[0] if "." in name else name
    if stem.startswith("person"):
        rest = stem[len("person"):]
        d = ""
        for ch in rest:
            if not ch.isdigit():
                break
            d += ch
        if d:
            return "person" + d
    pos = stem.find("IM-")
    if pos >= 0:
        after = stem[pos + 3:]
        d = ""
        for ch in after:
            if not ch.isdigit():
                break
            d += ch
        if d:
            return stem[:pos] + "IM-" + d
    return stem


def scan(root, split):
    out = []
    for label, cls in enumerate(CLASSES):
        d = os.path.join(root, split, cls)
        names = sorted(n for n in os.listdir(d)
                       if n.rsplit(".", 1)[-1].lower() in ("jpeg", "jpg", "png") and "." in n)
        out += [(os.path.join(d, n), label, patient_id(n)) for n in names]
    return out


def split_by_patient(samples, fraction, seed):
    """crate::train::data::split_by_patient."""
    by_patient = {}
    for s in samples:
        by_patient.setdefault(s[2], []).append(s)
    rng = SplitMix64(seed ^ 0x5EED5A17)
    val = set()
    for label in range(len(CLASSES)):
        patients = [p for p in sorted(by_patient) if by_patient[p][0][1] == label]
        for i in range(len(patients) - 1, 0, -1):
            j = rng.below(i + 1)
            patients[i], patients[j] = patients[j], patients[i]
        total = sum(1 for s in samples if s[1] == label)
        target = int(math.floor(total * fraction + 0.5))
        taken = 0
        for p in patients:
            if taken >= target:
                break
            taken += len(by_patient[p])
            val.add(p)
    train = [s for s in samples if s[2] not in val]
    va = [s for s in samples if s[2] in val]
    return train, va


def load(paths, size):
    def one(p):
        im = Image.open(p).convert("L")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)

    with ThreadPoolExecutor(max(4, os.cpu_count() or 4)) as ex:
        return np.stack(list(ex.map(one, paths)))


# ---------------------------------------------------------------- augmentation (GPU)

def gauss_blur(x, sigma):
    """Per-sample Gaussian blur of x [B,1,H,W]; sigma [B] (0 = identity)."""
    b = x.shape[0]
    k = 9
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    s = sigma.clamp(min=1e-3).view(b, 1)
    w = torch.exp(-(r.view(1, k) ** 2) / (2 * s * s))
    w = w / w.sum(1, keepdim=True)
    xx = x.view(1, b, *x.shape[2:])
    xx = F.pad(xx, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    xx = F.conv2d(xx, w.view(b, 1, 1, k), groups=b)
    xx = F.conv2d(xx, w.view(b, 1, k, 1), groups=b)
    out = xx.view_as(x)
    keep = (sigma <= 1e-3).view(b, 1, 1, 1)
    return torch.where(keep, x, out)


def local_mean(x, k=31):
    return F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="reflect"), k, stride=1)


def u(g, n, lo, hi, dev):
    return lo + (hi - lo) * torch.rand(n, generator=g, device=dev)


def photometric(x, g, strength, p_scale=1.0):
    """x [B,1,H,W] in [0,1]. strength scales the ranges (1 = training, >1 = stress)."""
    b, dev = x.shape[0], x.device
    s = strength

    def on(p):
        return (torch.rand(b, generator=g, device=dev) < min(1.0, p * p_scale)).view(b, 1, 1, 1)

    gamma = torch.exp(u(g, b, -0.45 * s, 0.45 * s, dev)).view(b, 1, 1, 1)
    x = torch.where(on(0.8), x.clamp(min=1e-4) ** gamma, x)
    c = u(g, b, 1 - 0.3 * s, 1 + 0.3 * s, dev).clamp(min=0.2).view(b, 1, 1, 1)
    br = u(g, b, 1 - 0.2 * s, 1 + 0.2 * s, dev).clamp(min=0.3).view(b, 1, 1, 1)
    m = x.mean(dim=(2, 3), keepdim=True)
    x = torch.where(on(0.8), ((x - m) * c + m) * br, x)
    sig = u(g, b, 0.3, 1.0 + 0.5 * s, dev)
    x = torch.where(on(0.2), gauss_blur(x, sig), x)
    a = u(g, b, 0.3, 0.6 + 0.6 * s, dev).view(b, 1, 1, 1)
    x = torch.where(on(0.2), x + a * (x - gauss_blur(x, torch.ones(b, device=dev))), x)
    a = u(g, b, 0.2, 0.3 + 0.5 * s, dev).view(b, 1, 1, 1)
    x = torch.where(on(0.2), x + a * (x - local_mean(x)), x)
    ns = u(g, b, 0.0, 0.03 * s, dev).view(b, 1, 1, 1)
    x = torch.where(on(0.3), x + ns * torch.randn(x.shape, generator=g, device=dev), x)
    return x.clamp(0, 1)


def geometric(x, g, area=(0.6, 1.15), rot_deg=10.0, ratio=(3 / 4, 4 / 3)):
    """Random resized crop (or slight zoom-out) + small rotation, no flip."""
    b, dev = x.shape[0], x.device
    a = u(g, b, *area, dev)
    lr = torch.exp(u(g, b, math.log(ratio[0]), math.log(ratio[1]), dev))
    sw = torch.sqrt(a * lr).clamp(max=1.2)
    sh = torch.sqrt(a / lr).clamp(max=1.2)
    cx = u(g, b, -1, 1, dev) * (1 - sw).abs()
    cy = u(g, b, -1, 1, dev) * (1 - sh).abs()
    th = u(g, b, -rot_deg, rot_deg, dev) * math.pi / 180
    cos, sin = torch.cos(th), torch.sin(th)
    theta = torch.stack([
        torch.stack([sw * cos, -sh * sin, cx], 1),
        torch.stack([sw * sin, sh * cos, cy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def normalize(x):
    """[B,1,H,W] in [0,1] -> [B,3,H,W], the shared Preprocessor's normalisation."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return ((x.expand(-1, 3, -1, -1) - mean) / std).contiguous(memory_format=torch.channels_last)


def to_unit(u8):
    return u8.unsqueeze(1).float() / 255.0


# ---------------------------------------------------------------- metrics

def auc(scores, labels):
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    npos = labels.sum()
    nneg = len(labels) - npos
    if npos == 0 or nneg == 0:
        return float("nan")
    return float((r[labels == 1].sum() - npos * (npos + 1) / 2) / (npos * nneg))


@torch.no_grad()
def evaluate(model, xs_u8, labels, bs=256):
    model.eval()
    probs = []
    for i in range(0, len(xs_u8), bs):
        x = normalize(to_unit(xs_u8[i:i + bs]))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            lo = model(x)
        probs.append(torch.softmax(lo.float(), 1)[:, 1].cpu())
    p = torch.cat(probs).double().numpy()
    y = np.asarray(labels)
    eps = 1e-7
    nll = float(-np.mean(np.where(y == 1, np.log(np.maximum(p, eps)), np.log(np.maximum(1 - p, eps)))))
    acc = float(np.mean((p >= 0.5) == (y == 1)))
    return {"loss": nll, "accuracy": acc, "auc": auc(p, y)}


# ---------------------------------------------------------------- training

def make_model(tiny):
    if tiny:
        return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2),
                                           num_init_features=16, bn_size=2, num_classes=2)
    return torchvision.models.densenet161(weights=None, num_classes=2)


def train_variant(strategy, tr_u8, tr_y, va_u8, va_stress_u8, va_y, args, dev, t_deadline, log):
    g = torch.Generator(device=dev)
    g.manual_seed(args.seed)
    torch.manual_seed(args.seed)
    counts = [int((tr_y == 0).sum().item()), int((tr_y == 1).sum().item())]
    n = counts[0] + counts[1]
    x_all, y_all, generated = tr_u8, tr_y, 0
    weights = None
    if strategy == "weighted":
        weights = torch.tensor([1 - counts[0] / n, 1 - counts[1] / n], device=dev)
    else:
        need = counts[1] - counts[0]
        normals = torch.nonzero(tr_y == 0).flatten()
        pick = normals[torch.randint(len(normals), (need,), generator=g, device=dev)]
        copies = []
        for i in range(0, need, 256):
            x = to_unit(tr_u8[pick[i:i + 256]])
            x = geometric(x, g, area=(0.55, 1.2), rot_deg=15.0)
            x = photometric(x, g, 1.3)
            copies.append((x * 255).round().clamp(0, 255).to(torch.uint8).squeeze(1))
        x_all = torch.cat([tr_u8] + copies)
        y_all = torch.cat([tr_y, torch.zeros(need, dtype=tr_y.dtype, device=dev)])
        generated = need
    log(f"{strategy}: train {len(tr_y)} (NORMAL {counts[0]}, PNEUMONIA {counts[1]}), "
        f"generated {generated}, class weights {None if weights is None else weights.tolist()}")

    model = make_model(args.tiny).to(dev).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    crit = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)
    bs = args.batch_size
    steps_per_epoch = len(y_all) // bs
    total_epochs = None
    total_steps = None
    history = []
    best = None
    step = 0
    epoch = 0
    ckpt = os.path.join(args.out, f"{strategy}.ckpt.pt")
    wall0 = 0.0
    if args.resume and os.path.exists(ckpt):
        c = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(c["model"])
        opt.load_state_dict(c["opt"])
        g.set_state(c["g"])
        torch.set_rng_state(c["torch_rng"])
        epoch, step, history, best = c["epoch"], c["step"], c["history"], c["best"]
        total_epochs, total_steps, wall0 = c["total_epochs"], c["total_steps"], c["wall"]
        log(f"{strategy}: resumed from {ckpt} after epoch {epoch} (step {step})")
    t0 = time.time() - wall0
    while total_epochs is None or epoch < total_epochs:
        epoch += 1
        model.train()
        te = time.time()
        perm = torch.randperm(len(y_all), generator=g, device=dev)
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev)
        seen = 0
        for k in range(steps_per_epoch):
            if total_steps is None:
                lr = args.lr * min(1.0, 0.04 + 0.96 * step / steps_per_epoch)
            else:
                t = (step - steps_per_epoch) / max(1, total_steps - steps_per_epoch)
                lr = args.lr * (1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))
            for gr in opt.param_groups:
                gr["lr"] = lr
            idx = perm[k * bs:(k + 1) * bs]
            x = to_unit(x_all[idx])
            x = photometric(geometric(x, g), g, 1.0)
            x = normalize(x)
            y = y_all[idx]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
                out = model(x)
            loss = crit(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
            seen += len(y)
        train_s = time.time() - te
        clean = evaluate(model, va_u8, va_y.cpu().numpy())
        stress = evaluate(model, va_stress_u8, va_y.cpu().numpy())
        rec = {"epoch": epoch, "image_size": int(tr_u8.shape[-1]), "lr": lr,
               "train_loss": float(loss_sum) / seen, "train_accuracy": float(correct) / seen,
               "val_loss": clean["loss"], "val_accuracy": clean["accuracy"], "val_auc": clean["auc"],
               "stress_val_loss": stress["loss"], "stress_val_accuracy": stress["accuracy"],
               "stress_val_auc": stress["auc"], "seconds": time.time() - te,
               "images_per_s": seen / train_s}
        history.append(rec)
        score = (clean["loss"] + stress["loss"]) / 2
        if best is None or score <= best[0]:
            best = (score, epoch, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        log(f"{strategy} epoch {epoch}{'' if total_epochs is None else '/' + str(total_epochs)}: "
            f"loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.3f} | val {clean['loss']:.4f} "
            f"auc {clean['auc']:.4f} | stressed {stress['loss']:.4f} auc {stress['auc']:.4f} | "
            f"{rec['seconds']:.1f}s {rec['images_per_s']:.0f} img/s lr {lr:.2e}")
        if args.epochs and total_epochs is None:
            total_epochs = args.epochs
            total_steps = total_epochs * steps_per_epoch
        if total_epochs is None and epoch >= 2:
            # The budget sets the epoch count, measured on the second epoch: the first
            # pays cudnn's autotuning (40 s against 5 s on an H100).
            per = rec["seconds"] * 1.03
            left = min(args.budget_s - (time.time() - t0), t_deadline - time.time())
            total_epochs = max(2, min(args.max_epochs, 2 + int(left / per)))
            total_steps = total_epochs * steps_per_epoch
            log(f"{strategy}: {total_epochs} epochs in all ({per:.1f}s each, {left:.0f}s left)")
        # Checkpoint every epoch (atomically): --resume continues from here.
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "g": g.get_state(),
                    "torch_rng": torch.get_rng_state(), "epoch": epoch, "step": step,
                    "history": history, "best": best, "total_epochs": total_epochs,
                    "total_steps": total_steps, "wall": time.time() - t0}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
        if args.stop_after_epochs and epoch >= args.stop_after_epochs and epoch < (total_epochs or 1 << 30):
            log(f"{strategy}: stopped after epoch {epoch} (--stop-after-epochs); continue with --resume")
            return None
        if total_epochs is not None and epoch >= total_epochs:
            break
        if time.time() + rec["seconds"] > t_deadline:
            total_epochs = total_epochs or epoch
            log(f"{strategy}: deadline: stopping after epoch {epoch} of {total_epochs}")
            break
    recipe = {
        "strategy": strategy, "epochs": epoch, "planned_epochs": total_epochs,
        "image_size": int(tr_u8.shape[-1]), "batch_size": bs, "optimizer": "adamw",
        "lr": args.lr, "weight_decay": args.wd, "schedule": "1 warm-up epoch then cosine to lr/1e3",
        "label_smoothing": args.label_smoothing, "seed": args.seed,
        "precision": "bf16 autocast", "best_epoch": best[1],
        "best_rule": "min mean(clean, stressed) validation loss",
        "augmentation": "random resized crop (area 0.6-1.15, ratio 3/4-4/3) + rotation +-10 deg, no flip; "
                        "gamma exp(U(-0.45,0.45)) p0.8; contrast 0.7-1.3 and brightness 0.8-1.2 p0.8; "
                        "Gaussian blur sigma 0.3-1.5 p0.2; unsharp mask 0.3-1.2 p0.2; "
                        "local contrast (31 px) 0.2-0.8 p0.2; Gaussian noise sd <= 0.03 p0.3",
        "stress": f"validation images under fixed seeded perturbations at strength {args.stress_strength}",
        "train_images": len(y_all), "train_class_counts": [int((y_all == 0).sum()), int((y_all == 1).sum())],
        "class_weights": [] if weights is None else weights.tolist(), "generated_images": generated,
        "wall_time_s": time.time() - t0,
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "torchvision": torchvision.__version__,
    }
    return best[2], history, recipe


def save(state, history, recipe, val_names, out, name):
    from safetensors.torch import save_file
    tensors = {k: v.to(torch.float16).contiguous() if v.is_floating_point() else v
               for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = os.path.join(out, f"{name}.safetensors")
    save_file(tensors, path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(out, f"{name}.history.json"), "w") as f:
        json.dump({"recipe": recipe, "history": history, "sha256": digest,
                   "validation_files": val_names}, f, indent=1)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategies", default="weighted,augmented")
    ap.add_argument("--budget-s", type=float, default=240, help="training seconds per variant")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="whole script")
    ap.add_argument("--epochs", type=int, default=31,
                    help="epoch count (the shipped 2.0.0 recipe: 31); 0 = as many as --budget-s allows")
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--stress-strength", type=float, default=1.6)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=0, help="images per class (smoke)")
    ap.add_argument("--tiny", action="store_true", help="a tiny DenseNet (smoke)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/<strategy>.ckpt.pt")
    ap.add_argument("--stop-after-epochs", type=int, default=0, help="checkpoint and stop after this epoch")
    args = ap.parse_args()
    t_start = time.time()
    t_deadline = t_start + args.deadline_s

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    samples = scan(args.data, "train")
    train, val = split_by_patient(samples, args.val_fraction, args.seed)
    if args.limit:
        train = [s for c in (0, 1) for s in [t for t in train if t[1] == c][:args.limit // (2 - c)]]
        val = [s for c in (0, 1) for s in [t for t in val if t[1] == c][:args.limit // 4 + 2]]
    log(f"device {dev} ({torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}), torch {torch.__version__}; "
        f"train {len(train)}, validation {len(val)} ({len({s[2] for s in val})} patients)")
    tr_u8 = torch.from_numpy(load([s[0] for s in train], args.size)).to(dev)
    va_u8 = torch.from_numpy(load([s[0] for s in val], args.size)).to(dev)
    tr_y = torch.tensor([s[1] for s in train], dtype=torch.long, device=dev)
    va_y = torch.tensor([s[1] for s in val], dtype=torch.long, device=dev)
    gs = torch.Generator(device=dev)
    gs.manual_seed(20261126)
    va_stress = (photometric(to_unit(va_u8), gs, args.stress_strength, p_scale=1.5) * 255).round().to(torch.uint8).squeeze(1)
    val_names = [os.path.basename(s[0]) for s in val]
    log(f"loaded in {time.time() - t_start:.1f}s")
    for strategy in args.strategies.split(","):
        out = train_variant(strategy, tr_u8, tr_y, va_u8, va_stress, va_y, args, dev, t_deadline, log)
        if out is None:
            continue
        state, history, recipe = out
        path = save(state, history, recipe, val_names, args.out, strategy)
        log(f"{strategy}: wrote {path} (best epoch {recipe['best_epoch']} of {recipe['epochs']})")
    log("done")


if __name__ == "__main__":
    sys.exit(main())
