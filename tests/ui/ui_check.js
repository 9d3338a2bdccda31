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
      if (api.body.dicom) {
        const uid = await page.$eval(`${card} [data-field="sop-uid"]`, (e) => e.textContent);
        check(uid === api.body.dicom.sop_instance_uid, `${base} ${name}: SOP UID ${uid}`);
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
