// The UI end to end in a real headless Chromium (Debian's, driven by playwright-core; nothing downloaded),
// against a running queen, worker and nats-server: tests/ui.rs starts them and this script. Every step
// takes a screenshot into OUT_DIR. Exits non-zero on the first failed step.
//
//   QUEEN_URL=http://127.0.0.1:8080 TOKEN=... OUT_DIR=/tmp/shots node e2e/run.mjs
import assert from "node:assert/strict";
import { mkdirSync, readFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

import { testPng } from "./png.mjs";

const axeSource = readFileSync(fileURLToPath(new URL("../node_modules/axe-core/axe.min.js", import.meta.url)), "utf8");

const queen = new URL(process.env.QUEEN_URL ?? "http://127.0.0.1:8080");
const token = process.env.TOKEN;
const out = process.env.OUT_DIR ?? "target/ui-e2e";
assert.ok(token, "set TOKEN");
// A tenant's token (tenant acme), optional: its step checks what such a token is shown.
const tenantToken = process.env.TENANT_TOKEN;
mkdirSync(out, { recursive: true });

// The browser talks to the queen through this TCP relay, so a step can cut its connections for real.
const relayed = new Set();
const relay = net.createServer((client) => {
  const upstream = net.connect(Number(queen.port), queen.hostname);
  const pair = { client, upstream };
  relayed.add(pair);
  const close = () => {
    client.destroy();
    upstream.destroy();
    relayed.delete(pair);
  };
  client.pipe(upstream).on("error", close);
  upstream.pipe(client).on("error", close);
  client.on("close", close).on("error", close);
  upstream.on("close", close).on("error", close);
});
await new Promise((resolve) => relay.listen(0, "127.0.0.1", resolve));
const base = `http://127.0.0.1:${relay.address().port}`;
function dropConnections() {
  for (const { client, upstream } of relayed) {
    client.destroy();
    upstream.destroy();
  }
  relayed.clear();
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  // Headless, and quiet: without the background-networking flags Chromium calls Google's hosts, which this
  // network refuses.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
const page = await context.newPage();
page.setDefaultTimeout(20_000);
const foreign = [];
const pageErrors = [];
page.on("request", (r) => {
  const url = new URL(r.url());
  if ((url.protocol === "http:" || url.protocol === "https:") && url.origin !== new URL(base).origin) foreign.push(r.url());
});
page.on("pageerror", (e) => pageErrors.push(String(e)));
// The browser logs every failed request as a console error; the steps provoke some (a wrong token, a refused
// job, a dropped stream), and the UI shows those itself. Any other console error is the page's.
page.on("console", (m) => m.type() === "error" && !m.text().startsWith("Failed to load resource") && pageErrors.push(`console: ${m.text()}`));

let failed = false;
async function step(name, body) {
  const started = Date.now();
  try {
    await body();
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    failed = true;
    console.log(`FAIL ${name}: ${e.stack ?? e}`);
    await page.screenshot({ path: join(out, `FAILED-${name.replace(/\W+/g, "-")}.png`), fullPage: true }).catch(() => {});
    throw e;
  }
}
/** A screenshot of the screen, after axe-core found no serious or critical accessibility problem on it
 * (labels, contrast, roles, keyboard reachability). */
async function shot(name) {
  // Evaluated through the DevTools protocol: the page's Content-Security-Policy (rightly) refuses a script tag.
  if (!(await page.evaluate(() => typeof window.axe === "object"))) await page.evaluate(axeSource);
  const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  const bad = result.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  assert.deepEqual(
    bad.map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(" ")).slice(0, 3).join("; ")})`),
    [],
    `accessibility problems on ${name}`,
  );
  await page.screenshot({ path: join(out, `${name}.png`), fullPage: true });
}
const state = () => page.getByTestId("job-state").first().textContent();

async function waitForState(text, timeout = 60_000) {
  await page.getByTestId("job-state").first().filter({ hasText: text }).waitFor({ timeout });
}

/** Clicks Generate and follows the progress bar to the end, returning the values it showed. */
/** Clicks Generate and waits until the result panel shows the new job. */
async function submitForm() {
  const previous = await currentJob();
  await page.getByRole("button", { name: /^Generate/ }).click();
  await page.waitForFunction((prev) => {
    const link = document.querySelector(".live a[href^='#/jobs/']");
    return link && link.textContent !== prev;
  }, previous);
}

async function generateAndWatch() {
  await submitForm();
  const seen = new Set();
  const deadline = Date.now() + 90_000;
  for (;;) {
    const bar = page.getByRole("progressbar");
    if (await bar.count()) {
      const v = await bar.first().getAttribute("aria-valuenow").catch(() => null);
      if (v !== null) seen.add(Number(v));
    }
    const s = (await state()) ?? "";
    if (/Completed|Failed|Cancelled/.test(s)) {
      assert.match(s, /Completed/, `the job ended as ${s}: ${await page.locator(".live .error").allTextContents()}`);
      break;
    }
    assert.ok(Date.now() < deadline, `no end in 90 s; state ${s}`);
    await page.waitForTimeout(40);
  }
  const image = page.getByTestId("result-image").first();
  await image.waitFor();
  await page.waitForFunction((img) => img.complete && img.naturalWidth > 0, await image.elementHandle());
  return [...seen];
}

/** The API itself, with the token (for jobs the steps need beside the UI's). */
const api = (method, path, body) =>
  fetch(`${base}${path}`, { method, headers: { authorization: `Bearer ${token}`, "content-type": "application/json" }, body: body && JSON.stringify(body) }).then((r) => r.json());

/** Waits until job `id` is in `state` (20 s at most). */
async function waitForJob(id, state) {
  for (let i = 0; (await api("GET", `/v1/jobs/${id}`)).state !== state; i++) {
    assert.ok(i < 400, `job ${id} never became ${state}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The job the result panel shows, if any. */
async function currentJob() {
  return page.evaluate(() => document.querySelector(".live a[href^='#/jobs/']")?.textContent ?? null);
}

async function chooseMode(label) {
  await page.getByRole("radio", { name: label }).check();
}

async function fillCommon(prompt, steps) {
  await page.getByLabel("Prompt", { exact: true }).fill(prompt);
  await page.getByLabel("Width").fill("64");
  await page.getByLabel("Height").fill("64");
  await page.getByLabel("Steps").fill(String(steps));
}

try {
  await step("a wrong token is refused with a clear message", async () => {
    await page.goto(base);
    await page.getByLabel("API token").fill("not-the-token-at-all");
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("alert").filter({ hasText: "not one of this queen's" }).waitFor();
    await shot("signin-wrong-token");
  });

  await step("sign in with the token, by keyboard alone", async () => {
    await page.getByLabel("API token").fill("");
    await page.getByLabel("API token").focus();
    await page.keyboard.type(token);
    await page.keyboard.press("Enter");
    await page.getByRole("navigation", { name: "Pages" }).waitFor();
    await page.getByLabel("Model").locator("option", { hasText: "tiny" }).first().waitFor({ state: "attached" });
    assert.equal(await page.evaluate(() => localStorage.getItem("sd-rbee.token")), token);
  });

  await step("every form control has a name a screen reader reads", async () => {
    const unnamed = await page.evaluate(() =>
      [...document.querySelectorAll("input, select, textarea, button")]
        .filter((el) => !(el.labels?.length || el.getAttribute("aria-label") || el.getAttribute("aria-labelledby") || el.textContent?.trim()))
        .map((el) => el.outerHTML.slice(0, 80)),
    );
    assert.deepEqual(unnamed, []);
  });

  let txtSeed;
  await step("text to image with a LoRA: the progress bar moves and the image appears", async () => {
    await fillCommon("a lighthouse at dusk", 12);
    await page.getByRole("radio", { name: "Fixed" }).check();
    await page.getByLabel("Seed").fill("4242");
    await page.getByLabel("Add a LoRA").selectOption("style");
    await page.getByLabel("style scale").fill("0.5");
    const values = await generateAndWatch();
    assert.ok(values.some((v) => v > 0 && v < 100), `the bar showed only ${JSON.stringify(values)}`);
    const caption = await page.locator(".result figcaption").first().textContent();
    assert.match(caption, /64 × 64 · seed 4242/);
    txtSeed = 4242;
    await shot("txt2img");
  });

  await step("the queen's refusal shows beside the field it names, and the form outlives a visit to another page", async () => {
    // The page believes the queen allows 1000 steps (as if its limits changed since the page loaded them).
    await page.route("**/v1/limits", async (route) => {
      const response = await route.fetch();
      await route.fulfill({ response, json: { ...(await response.json()), max_steps: 1000 } });
    });
    await page.getByLabel("Steps").fill("500");
    await page.getByRole("link", { name: "Fleet" }).click();
    await page.getByRole("link", { name: "Generate" }).click();
    assert.equal(await page.getByLabel("Steps").inputValue(), "500", "the form was kept");
    await page.getByRole("button", { name: /^Generate/ }).click();
    const error = page.locator("#f-steps-error");
    await error.waitFor();
    assert.match(await error.textContent(), /150/);
    assert.equal(await page.getByLabel("Steps").getAttribute("aria-invalid"), "true");
    await shot("refused");
    await page.unroute("**/v1/limits");
  });

  await step("a connection dropped mid-job is resumed with Last-Event-ID", async () => {
    const streams = [];
    const onRequest = (r) => r.url().endsWith("/events") && streams.push(r.headers()["last-event-id"] ?? "");
    page.on("request", onRequest);
    await fillCommon("a lighthouse through the fog", 40);
    await submitForm();
    await page.waitForFunction(() => Number(document.querySelector("[role=progressbar]")?.getAttribute("aria-valuenow")) >= 10);
    dropConnections();
    await waitForState("Completed");
    page.off("request", onRequest);
    assert.ok(streams.length >= 2, `the events were read ${streams.length} time(s)`);
    assert.match(streams[streams.length - 1], /^\d+(\.\d+)?$/, `resumed after event ${streams[streams.length - 1]}`);
    await page.getByTestId("result-image").first().waitFor();
  });

  const png = testPng(64, 64);
  await step("image to image from an uploaded picture", async () => {
    await chooseMode("Image to image");
    await page.locator("#f-init_image").setInputFiles({ name: "start.png", mimeType: "image/png", buffer: png });
    await page.getByAltText("The picture to start from").waitFor();
    await fillCommon("a lighthouse in a storm", 8);
    await page.getByLabel("Strength").fill("0.6");
    await generateAndWatch();
    await shot("img2img");
  });

  await step("inpainting with a mask drawn on the canvas with a mouse, a pen and a finger", async () => {
    await chooseMode("Inpaint");
    const canvas = page.getByTestId("mask-canvas");
    await canvas.waitFor();
    await canvas.scrollIntoViewIfNeeded();
    const box = await canvas.boundingBox();
    await page.mouse.move(box.x + box.width * 0.3, box.y + box.height * 0.3);
    await page.mouse.down();
    for (let i = 1; i <= 10; i++) await page.mouse.move(box.x + box.width * (0.3 + i * 0.04), box.y + box.height * (0.3 + i * 0.03));
    await page.mouse.up();
    const paintedShare = () =>
      canvas.evaluate((c) => {
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n / (c.width * c.height);
      });
    const painted = await paintedShare();
    assert.ok(painted > 0.03 && painted < 0.9, `painted ${painted} of the mask`);
    // Undo, then paint again: the undo button works.
    await page.getByRole("button", { name: "Undo" }).click();
    const afterUndo = await canvas.evaluate((c) => c.getContext("2d").getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0));
    assert.equal(afterUndo, false, "undo removed the stroke");
    // A pen, then a finger: pointer events of each type paint.
    await canvas.evaluate((c) => {
      window.__pointerTypes = [];
      c.addEventListener("pointerdown", (e) => window.__pointerTypes.push(e.pointerType));
    });
    await canvas.scrollIntoViewIfNeeded();
    const at = await canvas.boundingBox();
    const cdp = await context.newCDPSession(page);
    const point = (fx, fy) => ({ x: at.x + at.width * fx, y: at.y + at.height * fy });
    const pen = { button: "left", pointerType: "pen", force: 0.7 };
    await cdp.send("Input.dispatchMouseEvent", { type: "mousePressed", ...point(0.2, 0.2), ...pen, buttons: 1, clickCount: 1 });
    for (let i = 1; i <= 6; i++) await cdp.send("Input.dispatchMouseEvent", { type: "mouseMoved", ...point(0.2 + i * 0.05, 0.2), ...pen, buttons: 1 });
    await cdp.send("Input.dispatchMouseEvent", { type: "mouseReleased", ...point(0.5, 0.2), ...pen, buttons: 0, clickCount: 1 });
    const byPen = await paintedShare();
    assert.ok(byPen > 0.01, `the pen painted ${byPen}`);
    await cdp.send("Emulation.setTouchEmulationEnabled", { enabled: true, maxTouchPoints: 1 });
    await cdp.send("Input.dispatchTouchEvent", { type: "touchStart", touchPoints: [point(0.6, 0.6)] });
    for (let i = 1; i <= 6; i++) await cdp.send("Input.dispatchTouchEvent", { type: "touchMove", touchPoints: [point(0.6 + i * 0.04, 0.6 + i * 0.03)] });
    await cdp.send("Input.dispatchTouchEvent", { type: "touchEnd", touchPoints: [] });
    await cdp.send("Emulation.setTouchEmulationEnabled", { enabled: false });
    const byTouch = await paintedShare();
    assert.ok(byTouch > byPen + 0.01, `a finger painted ${byTouch - byPen} more`);
    assert.deepEqual(await page.evaluate(() => window.__pointerTypes), ["pen", "touch"]);
    await page.getByLabel("Mask blur (px)").fill("2");
    await fillCommon("a lighthouse with a red roof", 8);
    await page.getByLabel("Strength").fill("");
    await generateAndWatch();
    await shot("inpaint");
  });

  await step("cancel a long job while it runs", async () => {
    await chooseMode("Text to image");
    await fillCommon("a very long night", 150);
    await submitForm();
    await waitForState("Running");
    await page.waitForFunction(() => Number(document.querySelector("[role=progressbar]")?.getAttribute("aria-valuenow")) > 2);
    await page.getByRole("button", { name: "Cancel" }).click();
    await waitForState("Cancelled");
    assert.match(await state(), /Cancelled at step \d+/);
    await shot("cancelled");
  });

  await step("a job waiting behind another shows its place in the queue, and can be cancelled there", async () => {
    const ahead = await api("POST", "/v1/jobs", { model: "tiny", prompt: "a job in the way", width: 64, height: 64, steps: 150, seed: 1 });
    await waitForJob(ahead.job_id, "running");
    await fillCommon("a job that waits", 4);
    await submitForm();
    await waitForState(/Queued · next in line/);
    await shot("queued");
    await page.getByRole("button", { name: "Cancel" }).click();
    await waitForState("Cancelled");
    assert.doesNotMatch(await state(), /at step/, "it never started");
    await api("DELETE", `/v1/jobs/${ahead.job_id}`);
    // A running job stops within a step: wait for it, so the gallery sees it cancelled.
    await waitForJob(ahead.job_id, "cancelled");
  });

  await step("the gallery shows every job, filters by state, and reopens one's settings", async () => {
    await page.getByRole("link", { name: "Gallery" }).click();
    const cards = page.getByTestId("job-card");
    await page.waitForFunction(() => document.querySelectorAll("[data-testid=job-card]").length >= 7);
    const states = await cards.evaluateAll((els) => els.map((e) => e.dataset.state));
    assert.deepEqual(states, ["cancelled", "cancelled", "cancelled", "completed", "completed", "completed", "completed"]);
    await page.waitForFunction(() => [...document.querySelectorAll("[data-testid=job-card] img")].filter((i) => i.complete && i.naturalWidth > 0).length >= 3);
    await shot("gallery");
    await page.getByLabel("State").selectOption("cancelled");
    await page.waitForFunction(() => [...document.querySelectorAll("[data-testid=job-card]")].every((e) => e.dataset.state === "cancelled"));
    assert.equal(await cards.count(), 3);
    await page.getByLabel("State").selectOption("");
    await page.waitForFunction(() => document.querySelectorAll("[data-testid=job-card]").length >= 7);
    await cards.filter({ hasText: "a lighthouse at dusk" }).click();
    await page.getByRole("heading", { name: /^Job / }).waitFor();
    await page.getByText("4242").first().waitFor();
    await page.getByText("style × 0.5").waitFor();
    await page.getByTestId("result-image").first().waitFor();
    await shot("job");
    const [download] = await Promise.all([page.waitForEvent("download"), page.getByRole("button", { name: "Download" }).first().click()]);
    assert.match(download.suggestedFilename(), /^[0-9a-f-]{36}-0\.png$/);
    const saved = join(out, download.suggestedFilename());
    await download.saveAs(saved);
    assert.deepEqual([...readFileSync(saved).subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47], "a PNG");
    // The image as the start of an image-to-image job, then back to this job.
    await page.getByRole("button", { name: "Use as init image" }).first().click();
    await page.getByRole("heading", { name: "Generate" }).waitFor();
    assert.ok(await page.getByRole("radio", { name: "Image to image" }).isChecked());
    await page.getByText("Remove picture (64 × 64)").waitFor();
    await page.goBack();
    await page.getByRole("heading", { name: /^Job / }).waitFor();
    await page.getByRole("button", { name: "Use these settings again" }).click();
    await page.getByRole("heading", { name: "Generate" }).waitFor();
    assert.equal(await page.getByLabel("Prompt", { exact: true }).inputValue(), "a lighthouse at dusk");
    assert.equal(await page.getByLabel("Steps").inputValue(), "12");
    assert.equal(await page.getByLabel("Seed").inputValue(), String(txtSeed));
    assert.equal(await page.getByLabel("style scale").inputValue(), "0.5");
    assert.ok(await page.getByRole("radio", { name: "Text to image" }).isChecked());
    await shot("settings-again");
  });

  await step("the gallery pages through more jobs than fit one page", async () => {
    const ids = [];
    for (let i = 0; i < 20; i++) ids.push((await api("POST", "/v1/jobs", { model: "tiny", prompt: `page filler ${i}`, width: 64, height: 64, steps: 1, seed: i })).job_id);
    await waitForJob(ids[ids.length - 1], "completed");
    await page.getByRole("link", { name: "Gallery" }).click();
    const cards = page.getByTestId("job-card");
    await page.getByText("27 jobs").waitFor();
    assert.equal(await cards.count(), 24);
    assert.match(await cards.first().textContent(), /page filler 19/);
    await page.getByRole("button", { name: "Older" }).click();
    await page.waitForFunction(() => document.querySelectorAll("[data-testid=job-card]").length === 3);
    assert.match(await cards.last().textContent(), /a lighthouse at dusk/, "the oldest job ends the last page");
    assert.ok(await page.getByRole("button", { name: "Older" }).isDisabled());
    await page.getByRole("button", { name: "Newer" }).click();
    await page.waitForFunction(() => document.querySelectorAll("[data-testid=job-card]").length === 24);
  });

  await step("the fleet view shows the worker and the model", async () => {
    await page.getByRole("link", { name: "Fleet" }).click();
    await page.getByTestId("worker-row").filter({ hasText: "ui-w1" }).waitFor();
    await page.getByRole("rowheader", { name: "tiny" }).waitFor();
    await shot("fleet");
  });

  await step("a tenant's token sees its tenant, none of the operator's jobs, and no workers", async () => {
    if (!tenantToken) return;
    await page.getByRole("button", { name: "Sign out" }).click();
    await page.getByLabel("API token").fill(tenantToken);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByTestId("tenant").filter({ hasText: "acme" }).waitFor();
    await page.getByRole("link", { name: "Gallery" }).click();
    await page.getByText("No jobs yet.").waitFor();
    await page.getByRole("link", { name: "Fleet" }).click();
    await page.getByText("this token is tenant acme's").waitFor();
    assert.equal(await page.getByTestId("worker-row").count(), 0);
    await shot("fleet-tenant");
  });

  await step("a phone-sized screen needs no sideways scrolling", async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    await page.getByRole("link", { name: "Generate" }).click();
    await page.getByRole("heading", { name: "Generate" }).waitFor();
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the page is ${overflow}px wider than the screen`);
    await shot("phone");
  });

  await step("nothing was fetched from another host, and the page raised no error", async () => {
    assert.deepEqual(foreign, []);
    assert.deepEqual(pageErrors, []);
  });
} catch {
  // reported by step()
} finally {
  await browser.close();
  relay.close();
  dropConnections();
}
process.exit(failed ? 1 : 0);
