// The WebAssembly module built from crates/wasm (npm run build:wasm), loaded as a browser would load it.
import { existsSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { beforeAll, describe, expect, it } from "vitest";

import { loadContract, type Contract } from "../src/index.js";

const wasm = fileURLToPath(new URL("../dist/sd_rbee_wasm.wasm", import.meta.url));
let contract: Contract;

beforeAll(async () => {
  if (!existsSync(wasm)) throw new Error(`${wasm} is missing: run \`npm run build:wasm -w packages/wasm\` in ui/`);
  contract = await loadContract(readFileSync(wasm));
});

describe("the contract in WebAssembly", () => {
  it("accepts a good submission and says what job it makes", () => {
    const answer = contract.checkSubmission({ model: "tiny", prompt: "a kite", width: 64, height: 48, steps: 4, loras: [{ name: "ink", scale: 0.5 }] });
    expect(answer).toMatchObject({ ok: true, job: { kind: "txt2img", model: "tiny", width: 64, height: 48, steps: 4, num_images: 1, loras: [{ name: "ink", scale: 0.5 }] } });
  });

  it("refuses as the queen does: code, status, field and message", () => {
    const cases: [unknown, string, number, string | undefined, RegExp][] = [
      [{ model: "tiny", prompt: "x", width: 63 }, "INVALID_REQUEST", 422, "width", /multiple of 8, got 63/],
      [{ model: "tiny", prompt: "x", steps: 151 }, "INVALID_REQUEST", 422, "steps", /150/],
      [{ model: "tiny", prompt: "x", strength: 0.5 }, "INVALID_REQUEST", 422, "strength", /only allowed for img2img and inpaint/],
      [{ model: "tiny", prompt: "x", loras: [{ name: "a", scale: "big" }] }, "INVALID_REQUEST", 422, "loras[0].scale", /invalid type/],
      [{ model: "tiny", prompt: "x", colour: "red" }, "INVALID_REQUEST", 422, "colour", /unknown field `colour`/],
      ['{"model": "tiny", "prompt": ', "MALFORMED_REQUEST", 400, "prompt", /EOF/],
      [{ model: "tiny", prompt: "x", init_image: "%%%" }, "INVALID_REQUEST", 422, "init_image", /base64/],
    ];
    for (const [body, code, status, field, message] of cases) {
      const answer = contract.checkSubmission(body);
      if (answer.ok) throw new Error(`accepted ${JSON.stringify(body)}`);
      expect({ code: answer.error.code, status: answer.status, field: answer.error.field }).toEqual({ code, status, field });
      expect(answer.error.message).toMatch(message);
    }
  });

  it("checks against the queen's limits as GET /v1/limits gives them, or the bare limits", () => {
    const view = { ...contract.defaultLimits(), max_steps: 10 };
    const answer = contract.checkSubmission({ model: "tiny", prompt: "x", steps: 20 }, view);
    expect(answer.ok).toBe(false);
    expect(contract.checkSubmission({ model: "tiny", prompt: "x", steps: 20 }, { max_steps: 30 }).ok).toBe(true);
    const tight = contract.checkSubmission({ model: "tiny", prompt: "x", init_image: "AAAAAAAA" }, { max_inline_image_bytes: 2 });
    expect(tight).toMatchObject({ ok: false, status: 413, error: { code: "PAYLOAD_TOO_LARGE", field: "init_image" } });
  });

  it("knows the queen's defaults and its error-code table", () => {
    expect(contract.defaultLimits()).toMatchObject({ max_steps: 150, max_side: 4096, size_multiple: 8 });
    const codes = contract.errorCodes();
    expect(codes).toMatchObject({ INVALID_REQUEST: 422, NOT_FOUND: 404, FORBIDDEN: 403, EXPIRED: 410, UNAVAILABLE: 503, MALFORMED_REQUEST: 400, WAIT_TIMEOUT: 504, TOO_MANY_STREAMS: 429, RATE_LIMITED: 429, JOB_FAILED: 502 });
    expect(Object.keys(codes)).toHaveLength(18);
  });

  it("frees what it allocates: a thousand checks leave the memory as it was", () => {
    contract.checkSubmission({ model: "tiny", prompt: "warm up" });
    const before = (contract as unknown as { exports: { memory: WebAssembly.Memory } }).exports.memory.buffer.byteLength;
    for (let i = 0; i < 1000; i++) contract.checkSubmission({ model: "tiny", prompt: "x".repeat(2000), width: 63 });
    expect((contract as unknown as { exports: { memory: WebAssembly.Memory } }).exports.memory.buffer.byteLength).toBe(before);
  });
});
