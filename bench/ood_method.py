#!/usr/bin/env python3
"""The experiment behind the OOD method choice (bench/RESULTS.md): on the embeddings
cached by `cxr-train fit-ood --embed-only` (target/ood-cache/<sha16>-{fit,val,
val-stressed,test}) and the OOD set (bench/ood_set.py; its embeddings computed here
with onnxruntime and PIL resizing, an approximation of the served preprocessing),
compares Mahalanobis distance alone and with the residual term, over 16-256
components, shrinkage 0 and 0.1, and three thresholds. Needs numpy, onnxruntime,
pillow (target/ood-venv from bench/ood.sh).

    target/ood-venv/bin/python bench/ood_method.py weighted <sha16>
"""
import json, sys, glob, os, numpy as np
import onnxruntime as ort
from PIL import Image
model = sys.argv[1]; key = sys.argv[2]
C = "target/ood-cache/"
def load(tag):
    j = json.load(open(C+f"{key}-{tag}.json")); d = np.fromfile(C+f"{key}-{tag}.f32", np.float32).reshape(len(j["labels"]), j["dim"])
    return d.astype(np.float64), np.array(j["labels"])
fit, yf = load("fit"); val, yv = load("val"); vs, _ = load("val-stressed"); test, yt = load("test")
# OOD embeddings (approximate preprocessing)
cache = f"target/ood-exp-{key}.npz"
files = sorted(glob.glob("target/ood-set/*/*.png"))
if os.path.exists(cache) and list(np.load(cache)["files"]) == files:
    ood = np.load(cache)["e"]
else:
    s = ort.InferenceSession(f"models/{model}.onnx", providers=["CPUExecutionProvider"])
    mean = np.array([0.485,0.456,0.406])[:,None,None]; std=np.array([0.229,0.224,0.225])[:,None,None]
    es=[]
    for f in files:
        g = np.asarray(Image.open(f).convert("L").resize((224,224), Image.BILINEAR), np.float64)/255
        x = ((np.stack([g]*3)-mean)/std)[None].astype(np.float32)
        es.append(s.run(["embedding"], {"image": x})[0][0])
    ood = np.array(es, np.float64); np.savez(cache, e=ood, files=files)
kinds = np.array([f.split("/")[-2] for f in files])
colour = np.array(["-colour" in f for f in files])
print("fit", fit.shape, "ood", ood.shape)

def evaluate(name, score):
    sv, svs, st, so = score(val), score(vs), score(test), score(ood)
    for tname, pool in (("val99", sv), ("val+stress99", np.concatenate([sv, svs])), ("val99.5", None)):
        if pool is None: thr = np.quantile(sv, 0.995)
        else: thr = np.quantile(pool, 0.99)
        acc_t = (st <= thr).mean(); acc_vs = (svs <= thr).mean()
        ref = (so > thr)
        per = {k: f"{ref[(kinds==k)&~colour].mean():.2f}" for k in ("photos","documents","medical","synthetic")}
        print(f"{name:28s} {tname:13s} test_acc {acc_t:.3f} stress_acc {acc_vs:.3f} ood_refused(gray) {ref[~colour].mean():.3f} {per}")

mu = fit.mean(0)
for k in (16, 32, 64, 128, 256):
    X = fit - mu
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    P = Vt[:k]
    Z = X @ P.T
    for shrink in (0.0, 0.1):
        means = np.array([Z[yf==c].mean(0) for c in (0,1)])
        R = Z - means[yf]
        cov = R.T @ R / len(R)
        cov = (1-shrink)*cov + shrink*np.trace(cov)/k*np.eye(k)
        prec = np.linalg.inv(cov)
        resid_var = ((X - Z @ P)**2).sum(1).mean()
        def maha(E, P=P, means=means, prec=prec):
            z = (E - mu) @ P.T
            d = np.stack([np.einsum("ij,jk,ik->i", z-m, prec, z-m) for m in means], 1)
            return d.min(1)
        def maha_res(E, P=P, means=means, prec=prec, rv=resid_var):
            z = (E - mu) @ P.T
            d = np.stack([np.einsum("ij,jk,ik->i", z-m, prec, z-m) for m in means], 1).min(1)
            r = (((E-mu) - z @ P)**2).sum(1) / rv
            return d / k + r
        evaluate(f"maha k={k} s={shrink}", maha)
        evaluate(f"maha+res k={k} s={shrink}", maha_res)
