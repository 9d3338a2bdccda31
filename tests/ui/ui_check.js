// Drives Debian's chromium (headless, through puppeteer-core: no browser download)
// against a running cxr-serve and checks the page shows what the API answers.
//
//   node tests/ui/ui_check.js --url http://127.0.0.1:PORT --shots DIR \
//        --file a.png --file b.dcm [--junk junk.png] [--key KEY] [--shot-only NAME]
//
// For every --file: uploads it through the page's file input, waits for every
// variant's answer and checks each label and confidence shown equal the API's own
// answer to the same bytes (fetched here, not by the page); toggles the heatmap and
// its opacity. Then opens the models tab and checks each metric and confusion cell
// shown equals /models. With --junk: uploads it and checks the API's error message is
// shown. With --key: first checks that without the key the page shows the API's 401.
// For every --file, when the API's answers disagree on the label or on the verdict
// (in distribution, distribution shift, refused as out of distribution), the film's
// row must open with a sentence naming what each variant said, and have none when they
// agree; with --expect-disagreement the answers must disagree. The models tab must open
// with the side-by-side table of the variants, every cell equal to /models.
// Screenshots of each state go to --shots. Exit 0 when every check holds.
"use strict";
const fs = require("fs");
const path = require("path");
const puppeteer = require("puppeteer-core");

const args = { file: [] };
for (let i = 2; i < process.argv.length; i += 2) {
  const k = process.argv[i].replace(/^--/, "");
  const v = process.argv[i + 1];
  if (k === "file") args.file.push(v); else args[k] = v;
}
const url = args.url;
const shots = args.shots || "target/ui-shots";
fs.mkdirSync(shots, { recursive: true });
const auth = args.key ? { Authorization: "Bearer " + args.key } : {};
const fail = (msg) => { console.error("UI CHECK FAILED: " + msg); process.exit(1); };
const check = (cond, msg) => { if (!cond) fail(msg); };
const ctype = (f) => f.endsWith(".dcm") ? "application/dicom" : f.endsWith(".png") ? "image/png" : "image/jpeg";
const pct = (x) => (100 * x).toFixed(1) + " %";

async function apiAnswer(file, model) {
  const r = await fetch(`${url}/predict?model=${model}`, { method: "POST", body: fs.readFileSync(file), headers: { "Content-Type": ctype(file), ...auth } });
  return { status: r.status, body: await r.json() };
}

(async () => {
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"],
  });
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 900 });
  const consoleErrors = [];
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(url + "/", { waitUntil: "networkidle0" });
  const list = await (await fetch(`${url}/models`, { headers: auth })).json();
  const names = list.models.map((m) => m.card.name);
  const input = await page.$("#files");

  if (args.key) {
    // Without the key: the page shows the API's 401 message.
    await input.uploadFile(path.resolve(args.file[0]));
    await page.waitForSelector(`#results [data-field="error"]`, { timeout: 60000 });
    const shown = await page.$eval(`#results [data-field="error"]`, (e) => e.textContent);
    const api = await (await fetch(`${url}/models`)).json();
    check(shown.startsWith(api.error) && /unauthorized/.test(shown), `without a key the page shows: "${shown}", the API says "${api.error}"`);
    await page.screenshot({ path: path.join(shots, "unauthorized.png"), fullPage: true });
    await page.evaluate(() => { document.querySelector("#results").replaceChildren(); });
    await page.type("#key", args.key);
    await page.$eval("#key", (e) => e.dispatchEvent(new Event("change")));
  }

  for (const file of args.file) {
    const base = path.basename(file);
    await input.uploadFile(path.resolve(file));
    const sel = `section.file[data-file="${base}"][aria-busy="false"]`;
    await page.waitForSelector(sel, { timeout: 120000 });
    for (const name of names) {
      const api = await apiAnswer(file, name);
      const card = `${sel} article[data-query="model=${name}"]`;
      if (api.status !== 200) {
        const shown = await page.$eval(`${card} [data-field="error"]`, (e) => e.textContent);
        check(shown === api.body.error, `${base} ${name}: page shows "${shown}", API says "${api.body.error}"`);
        continue;
      }
      const label = await page.$eval(`${card} [data-field="label"]`, (e) => e.textContent);
      const conf = await page.$eval(`${card} [data-field="confidence"]`, (e) => e.textContent);
      check(label === api.body.label, `${base} ${name}: label ${label} vs API ${api.body.label}`);
      check(conf === pct(api.body.confidence), `${base} ${name}: confidence ${conf} vs API ${pct(api.body.confidence)}`);
      // The suspected-finding flag: shown exactly when the API's answer is positive at
      // or above the version's urgency threshold in /models.
      const info = list.models.find((m) => m.card.name === name);
      const urgent = api.body.label === "PNEUMONIA" && api.body.probabilities.PNEUMONIA >= info.urgent_threshold;
      const flagged = await page.$(`${card} [data-field="suspected-finding"]`);
      check(Boolean(flagged) === urgent, `${base} ${name}: suspected-finding flag ${Boolean(flagged)}, expected ${urgent} (P ${api.body.probabilities.PNEUMONIA}, urgency threshold ${info.urgent_threshold})`);
      if (api.body.dicom) {
        const uid = await page.$eval(`${card} [data-field="sop-uid"]`, (e) => e.textContent);
        check(uid === api.body.dicom.sop_instance_uid, `${base} ${name}: SOP UID ${uid}`);
      }
    }
    // The variants' stories of this film, from the API's own answers.
    const stories = [];
    for (const name of names) {
      const api = await apiAnswer(file, name);
      const b = api.body;
      if (api.status === 200) {
        const shift = (b.warnings || []).some((w) => w.startsWith("distribution_shift"));
        const verdict = b.in_distribution === true ? "in" : b.in_distribution === false ? (shift ? "shift" : "out") : null;
        stories.push({ name, label: b.label, verdict });
      } else {
        stories.push({ name, label: null, verdict: b.error_type === "out_of_distribution" ? "refused" : null });
      }
    }
    const distinct = (k) => new Set(stories.map((x) => x[k]).filter((v) => v != null)).size;
    const disagree = distinct("label") > 1 || distinct("verdict") > 1;
    if (args["expect-disagreement"]) check(disagree, `${base}: the variants were expected to disagree: ${JSON.stringify(stories)}`);
    const line = await page.$(`${sel} > [data-field="disagreement"]`);
    if (!disagree) {
      check(!line, `${base}: the variants agree (${JSON.stringify(stories)}) but the page says they disagree`);
    } else {
      check(line, `${base}: the variants disagree (${JSON.stringify(stories)}) and the page does not say so`);
      // At the top of the row: right under the file name, before the answers.
      const place = await page.$eval(`${sel} > [data-field="disagreement"]`, (e) => [e.previousElementSibling && e.previousElementSibling.tagName, e.nextElementSibling && e.nextElementSibling.className]);
      check(place[0] === "H2" && place[1] === "row", `${base}: the disagreement is not at the top of the row: ${place}`);
      const text = await page.$eval(`${sel} > [data-field="disagreement"]`, (e) => e.textContent);
      check(text.startsWith("The variants disagree: "), `${base}: "${text}"`);
      for (const x of stories) {
        if (x.label) {
          const said = `${x.name} says ${x.label}`;
          check(text.includes(said + (x.verdict === "shift" ? " but warns the film is unlike its training films" : "")), `${base}: "${text}" lacks "${said}" (${x.verdict})`);
        } else if (x.verdict === "refused") {
          check(text.includes(`${x.name} refused it as unlike its training films`), `${base}: "${text}" lacks ${x.name}'s refusal`);
        }
      }
    }
    // The heatmap overlay: shown, hidden by the toggle, its opacity from the slider.
    const cam = `${sel} img.cam`;
    check(await page.$(cam), `${base}: no heatmap overlay`);
    const visible = () => page.$eval(cam, (e) => !e.hidden && getComputedStyle(e).display !== "none");
    check(await visible(), `${base}: overlay not shown`);
    await page.click("#show-cam");
    check(!(await visible()), `${base}: overlay still shown after the toggle`);
    await page.click("#show-cam");
    check(await visible(), `${base}: overlay not back`);
    await page.$eval("#opacity", (e) => { e.value = "0.4"; e.dispatchEvent(new Event("input")); });
    const op = await page.$eval(cam, (e) => e.style.opacity);
    check(op === "0.4", `${base}: overlay opacity ${op}`);
    await page.$eval("#opacity", (e) => { e.value = "1"; e.dispatchEvent(new Event("input")); });
  }
  await page.screenshot({ path: path.join(shots, "predict.png"), fullPage: true });
  // A tablet's width: nothing wider than the viewport (the answers wrap under the image).
  await page.setViewport({ width: 768, height: 1024 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `at 768 px the page is ${overflow} px wider than the screen`);
  await page.screenshot({ path: path.join(shots, "predict-tablet.png"), fullPage: true });
  await page.setViewport({ width: 1280, height: 900 });
  if (args["shot-only"] === "predict") { await browser.close(); return; }

  // The models tab equals /models.
  await page.click("#tab-models");
  await page.waitForSelector(`#models section.model[data-model="${names[names.length - 1]}"]`, { timeout: 60000 });
  // It opens with the variants side by side: one column per variant, in /models' order.
  const first = await page.$eval("#models", (e) => { const t = e.firstElementChild; return t && (t.matches("table") ? t : t.querySelector("table")); });
  check(first, "the models tab does not open with a table");
  const opens = await page.$eval("#models", (e) => { const f = e.firstElementChild; return f && (f.matches('table[data-table="variants"]') || !!f.querySelector(':scope > table[data-table="variants"]')); });
  check(opens, "the models tab does not open with the variants table");
  const cols = await page.$$eval('#models table[data-table="variants"] tr:first-of-type th[data-model]', (es) => es.map((e) => e.textContent));
  check(JSON.stringify(cols) === JSON.stringify(names), `variants table columns ${cols} vs ${names}`);
  const f3 = (x) => x.toFixed(3), f4 = (x) => x.toFixed(4);
  for (const m of list.models) {
    const c = m.card;
    const want = {
      version: c.version + (m.default ? " (default)" : ""),
      accuracy: f4(c.metrics.test.accuracy), sensitivity: f4(c.metrics.test.sensitivity),
      specificity: f4(c.metrics.test.specificity), auc: f4(c.metrics.test.auc),
      threshold: f3(c.threshold),
      "ood-threshold": c.ood ? f3(c.ood.threshold) : "no OOD model",
      "ood-refuse": !c.ood ? "no OOD model" : c.ood.refuse_threshold != null ? f3(c.ood.refuse_threshold) : f3(c.ood.threshold) + " (one threshold)",
      size: (c.onnx.bytes / 1e6).toFixed(1) + " MB",
    };
    want.precision = (c.precision || "fp32").toUpperCase() + (c.quantization ? " (copy of " + c.quantization.source_model + ")" : "");
    want.calibration = c.calibration ? "T " + f3(c.calibration.temperature) + ", test ECE " + f3(c.calibration.test_ece_after) : "none";
    for (const [row, v] of Object.entries(want)) {
      const shown = await page.$eval(`#models table[data-table="variants"] tr[data-row="${row}"] td[data-model="${c.name}"] [data-field="value"]`, (e) => e.textContent);
      check(shown === v, `variants table ${c.name} ${row}: ${shown} vs ${v}`);
    }
    if (c.threshold_rule) {
      const rule = await page.$eval(`#models table[data-table="variants"] tr[data-row="threshold"] td[data-model="${c.name}"] .rule`, (e) => e.textContent);
      check(rule === c.threshold_rule, `variants table ${c.name} threshold rule: ${rule}`);
    }
  }
  for (const m of list.models) {
    const sec = `#models section.model[data-model="${m.card.name}"]`;
    for (const [split, key] of [["test", "test"], ["validation", "validation"]]) {
      const metrics = m.card.metrics[key];
      if (!metrics) continue;
      for (const metric of ["accuracy", "sensitivity", "specificity", "auc"]) {
        if (metrics[metric] == null) continue;
        const shown = await page.$eval(`${sec} tr[data-metric="${metric}"] td[data-split="${split}"]`, (e) => e.textContent);
        check(shown === metrics[metric].toFixed(4), `${m.card.name} ${split} ${metric}: ${shown} vs ${metrics[metric]}`);
      }
    }
    const c = m.card.metrics.test.confusion;
    for (const cell of ["tp", "fp", "tn", "fn"]) {
      const shown = await page.$eval(`${sec} td[data-cell="${cell}"]`, (e) => e.textContent);
      check(shown === String(c[cell]), `${m.card.name} confusion ${cell}: ${shown} vs ${c[cell]}`);
    }
  }
  await page.screenshot({ path: path.join(shots, "models.png"), fullPage: true });

  if (args.junk) {
    await page.click("#tab-predict");
    await input.uploadFile(path.resolve(args.junk));
    const base = path.basename(args.junk);
    const sel = `section.file[data-file="${base}"][aria-busy="false"]`;
    await page.waitForSelector(sel, { timeout: 60000 });
    const api = await apiAnswer(args.junk, names[0]);
    check(api.status >= 400, `junk answered ${api.status}`);
    const shown = await page.$eval(`${sel} article[data-query="model=${names[0]}"] [data-field="error"]`, (e) => e.textContent);
    check(shown === api.body.error, `junk: page shows "${shown}", API says "${api.body.error}"`);
    await page.screenshot({ path: path.join(shots, "error.png"), fullPage: true });
  }
  check(consoleErrors.length === 0, "page errors: " + consoleErrors.join("; "));
  await browser.close();
  console.log(JSON.stringify({ ok: true, files: args.file.length, models: names, shots }));
})().catch((e) => fail(e && e.stack ? e.stack : String(e)));
