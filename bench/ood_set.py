#!/usr/bin/env python3
"""Assembles the out-of-distribution set that bench/ood.py sends to the service: images
that were not made for this project and are not pediatric frontal chest radiographs.

Sources (all shipped inside packages from PyPI; nothing is downloaded):
  photos     scikit-image's sample photos (skimage/data: astronaut, camera, coffee, ...),
             scikit-learn's sample images (china, flower), matplotlib's grace_hopper;
             colour ones twice: as they are (colour) and converted to gray (gray), plus
             three seeded gray crops of each larger photo
  documents  scikit-image's scanned page and text, matplotlib charts of its sample
             data, and pages of real text (the licence files of installed packages)
             rendered with the system's fonts
  medical    other modalities and body parts: pydicom's test files (CT, MR, NM whole
             body bone scans, ultrasound, segmentation), matplotlib's MR brain slice
             (s1045.ima), scikit-image's Shepp-Logan phantom and retina photographs;
             each rendered to 8-bit PNG from its pixels (full range or its window),
             and the DICOM files themselves (dicom/)
  synthetic  blank, saturated, noise, gradient, checkerboard, a 4,000,000 x 1 strip

    target/ood-venv/bin/python bench/ood_set.py --out target/ood-set

Needs scikit-image, scikit-learn, matplotlib, pydicom, pylibjpeg(-openjpeg,-libjpeg)
(bench/ood.sh installs them into target/ood-venv).
"""
import argparse, glob, gzip, io, os, random, shutil, textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="target/ood-set")
a = ap.parse_args()
rng = random.Random(20261126)
if os.path.isdir(a.out):
    shutil.rmtree(a.out)
for d in ("photos", "documents", "medical", "synthetic", "dicom"):
    os.makedirs(os.path.join(a.out, d))
count = {}


def save(kind, name, img):
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    img.save(os.path.join(a.out, kind, name + ".png"))
    count[kind] = count.get(kind, 0) + 1


def to8(arr):
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = np.percentile(arr, 0.5), np.percentile(arr, 99.5)
    if hi <= lo:
        lo, hi = arr.min(), arr.max() + 1e-9
    return Image.fromarray((np.clip((arr - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))


# -- photos -------------------------------------------------------------------------
import skimage, sklearn, matplotlib

sk = os.path.join(os.path.dirname(skimage.__file__), "data")
photo_files = [os.path.join(sk, f) for f in (
    "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "horse.png",
    "moon.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "grass.png",
    "gravel.png", "brick.png", "clock_motion.png", "cell.png", "ihc.png", "color.png")]
photo_files += glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "*.jpg"))
mpl = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data")
photo_files.append(os.path.join(mpl, "grace_hopper.jpg"))
for f in photo_files:
    name = os.path.splitext(os.path.basename(f))[0]
    img = Image.open(f)
    img = img.convert("RGB") if img.mode not in ("L", "1") else img.convert("L")
    if img.mode == "RGB":
        save("photos", name + "-colour", img)
    g = img.convert("L")
    save("photos", name + "-gray", g)
    w, h = g.size
    if min(w, h) >= 300:
        for k in range(3):
            s = rng.randint(min(w, h) // 2, min(w, h))
            x, y = rng.randint(0, w - s), rng.randint(0, h - s)
            save("photos", f"{name}-crop{k}", g.crop((x, y, x + s, y + s)))
# Faces (LFW subset, 25 x 25 gray): ten, upscaled as a user's thumbnail would be.
faces = np.load(os.path.join(sk, "lfw_subset.npy"))
for k in range(10):
    save("photos", f"lfw-face{k}", to8(faces[k * 17]).resize((200, 200), Image.BILINEAR))

# -- documents ----------------------------------------------------------------------
save("documents", "skimage-page", Image.open(os.path.join(sk, "page.png")).convert("L"))
save("documents", "skimage-text", Image.open(os.path.join(sk, "text.png")).convert("L"))
import matplotlib.pyplot as plt

matplotlib.use("Agg")
for k, (fname, col) in enumerate((("msft.csv", 4), ("Stocks.csv", 1))):
    rows = [l.split(",") for l in open(os.path.join(mpl, fname)).read().splitlines()[1:]]
    vals = []
    for r in rows:
        try:
            vals.append(float(r[col]))
        except (ValueError, IndexError):
            pass
    fig = plt.figure(figsize=(6, 4), dpi=100)
    plt.plot(vals)
    plt.title(fname)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    save("documents", f"chart{k}", Image.open(buf).convert("L"))
licences = []
import site

for sp in site.getsitepackages():
    licences += sorted(glob.glob(os.path.join(sp, "*.dist-info", "LICEN[CS]E*")))
    licences += sorted(glob.glob(os.path.join(sp, "*.dist-info", "licenses", "LICEN[CS]E*")))
fonts = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf")) or [None]
n_docs = 0
for f in licences:
    text = open(f, errors="replace").read().strip()
    if len(text) < 800:
        continue
    font_path = fonts[n_docs % len(fonts)]
    size = rng.choice((14, 16, 18, 22))
    font = ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default()
    page = Image.new("L", (850, 1100), 255)
    d = ImageDraw.Draw(page)
    y = 60
    for para in text.splitlines():
        for line in textwrap.wrap(para, 70) or [""]:
            d.text((60, y), line, fill=rng.randint(0, 60), font=font)
            y += int(size * 1.3)
            if y > 1040:
                break
        if y > 1040:
            break
    save("documents", f"licence{n_docs:02d}", page)
    n_docs += 1
    if n_docs >= 20:
        break

# -- medical: other modalities and body parts ---------------------------------------
import pydicom
from pydicom.data import get_testdata_file

for f in ("693_J2KI.dcm", "CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "JPEG2000.dcm",
          "JPGExtended.dcm", "MR_small.dcm", "examples_overlay.dcm", "image_dfl.dcm",
          "liver_1frame.dcm", "examples_jpeg2k.dcm", "examples_rgb_color.dcm",
          "examples_palette.dcm"):
    path = get_testdata_file(f)
    ds = pydicom.dcmread(path)
    shutil.copy(path, os.path.join(a.out, "dicom", f))
    count["dicom"] = count.get("dicom", 0) + 1
    arr = ds.pixel_array
    if ds.get("NumberOfFrames", 1) not in (None, 1) and arr.ndim >= 3 and ds.SamplesPerPixel == 1:
        arr = arr[0]
    name = os.path.splitext(f)[0]
    if ds.SamplesPerPixel == 3 or ds.PhotometricInterpretation == "PALETTE COLOR":
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            arr = pydicom.pixels.apply_color_lut(arr, ds)
            arr = (arr / 256).astype(np.uint8) if arr.max() > 255 else arr.astype(np.uint8)
        elif ds.PhotometricInterpretation in ("YBR_FULL", "YBR_FULL_422"):
            arr = pydicom.pixels.convert_color_space(arr, ds.PhotometricInterpretation, "RGB")
        save("medical", name + "-gray", Image.fromarray(arr.astype(np.uint8)).convert("L"))
        continue
    img = to8(arr)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        img = Image.fromarray(255 - np.asarray(img))
    save("medical", name, img)
raw = np.frombuffer(gzip.open(os.path.join(mpl, "s1045.ima.gz")).read(), np.uint16).reshape(256, 256)
save("medical", "mpl-mr-brain", to8(raw))
save("medical", "skimage-phantom", Image.open(os.path.join(sk, "phantom.png")).convert("L"))
save("medical", "skimage-retina-gray", Image.open(os.path.join(sk, "retina.jpg")).convert("L"))
save("medical", "skimage-microaneurysms", Image.open(os.path.join(sk, "microaneurysms.png")).convert("L"))

# -- synthetic ----------------------------------------------------------------------
nr = np.random.default_rng(20261126)
save("synthetic", "blank-black", Image.new("L", (512, 512), 0))
save("synthetic", "blank-white", Image.new("L", (512, 512), 255))
save("synthetic", "blank-gray", Image.new("L", (512, 512), 128))
save("synthetic", "noise-uniform", Image.fromarray(nr.integers(0, 256, (512, 512), dtype=np.uint8)))
save("synthetic", "noise-gaussian", Image.fromarray(np.clip(nr.normal(128, 40, (512, 512)), 0, 255).astype(np.uint8)))
save("synthetic", "gradient", Image.fromarray(np.tile(np.linspace(0, 255, 512), (512, 1)).astype(np.uint8)))
save("synthetic", "checkerboard", Image.fromarray(((np.indices((512, 512)) // 32).sum(0) % 2 * 255).astype(np.uint8)))
save("synthetic", "strip-4000000x1", Image.fromarray(nr.integers(100, 140, (1, 4_000_000), dtype=np.uint8)))
print(" ".join(f"{k}={v}" for k, v in sorted(count.items())), "->", a.out)
