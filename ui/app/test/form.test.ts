import { describe, expect, it } from "vitest";

import type { JobStatus, LimitsView } from "@sd-rbee/sdk";
import { attemptFor, EMPTY_FORM, fromJob, newKey, toSubmission, type FormState } from "../src/form";

const limits = {
  max_prompt_bytes: 4096,
  max_side: 2048,
  max_pixels: 2048 * 2048,
  max_steps: 150,
  max_guidance: 30,
  max_images: 8,
  max_inline_image_bytes: 8 << 20,
  max_mask_blur: 64,
  max_loras: 2,
  max_body_bytes: 16 << 20,
  size_multiple: 8,
  schedulers: ["euler"],
  timestep_spacings: [],
  output_formats: ["png", "jpeg", "webp"],
  resize_modes: ["fit"],
  default_img2img_strength: 0.8,
  default_inpaint_strength: 1,
  default_mask_blur: 4,
} as LimitsView;

const form = (f: Partial<FormState>): FormState => ({ ...EMPTY_FORM, model: "tiny", prompt: "a boat", ...f });

describe("toSubmission", () => {
  it("leaves out what is empty, so the model's defaults apply", () => {
    expect(toSubmission(form({}), limits)).toEqual({ submission: { model: "tiny", prompt: "a boat", num_images: 1 }, errors: [] });
  });

  it("names the field of each problem as the API does", () => {
    const { submission, errors } = toSubmission(form({ width: "63", height: "4096", steps: "0", seedMode: "fixed", seed: "", loras: [{ name: "a", scale: 1 }, { name: "b", scale: 1 }, { name: "c", scale: 1 }] }), limits);
    expect(submission).toBeUndefined();
    expect(errors.map((e) => e.field).sort()).toEqual(["height", "loras", "seed", "steps", "width"]);
    expect(toSubmission(form({ width: "2048", height: "2048", guidance: "31" }), { ...limits, max_pixels: 1 << 20 }).errors.map((e) => e.field)).toEqual(["width", "guidance"]);
  });

  it("builds img2img and inpainting with their images, strength and mask options", () => {
    const missing = toSubmission(form({ mode: "inpaint" }), limits);
    expect(missing.errors.map((e) => e.field)).toEqual(["init_image", "mask"]);
    const { submission } = toSubmission(form({ mode: "inpaint", strength: "0.7", maskBlur: "6", invertMask: true, pasteBack: false, seedMode: "reuse" }), limits, {
      initImage: { object_key: "uploads/i.png" },
      mask: { object_key: "uploads/m.png" },
      lastSeed: 99,
    });
    expect(submission).toMatchObject({ kind: "inpaint", init_image: { object_key: "uploads/i.png" }, mask: { object_key: "uploads/m.png" }, strength: 0.7, mask_blur: 6, invert_mask: true, paste_back: false, seed: 99 });
  });
});

describe("init picture size", () => {
  it("refuses a picture over max_side when the job would take its size, not when a size is given", () => {
    const big = { initImage: { object_key: "k" }, initSize: { width: 3000, height: 1000 } };
    const refused = toSubmission(form({ mode: "img2img" }), limits, big);
    expect(refused.errors).toHaveLength(1);
    expect(refused.errors[0]).toMatchObject({ field: "init_image" });
    expect(refused.errors[0]!.message).toContain("3000 × 1000");
    expect(toSubmission(form({ mode: "img2img", width: "1024", height: "512" }), limits, big).errors).toEqual([]);
    expect(toSubmission(form({ mode: "img2img" }), limits, { ...big, initSize: { width: 2048, height: 1024 } }).errors).toEqual([]);
    // Rounded down to a multiple of 8 as the worker takes it; and the area counts too.
    expect(toSubmission(form({ mode: "img2img" }), limits, { ...big, initSize: { width: 2055, height: 1024 } }).errors).toEqual([]);
    const square = toSubmission(form({ mode: "img2img" }), { ...limits, max_pixels: 1024 * 1024 }, { ...big, initSize: { width: 2000, height: 2000 } });
    expect(square.errors[0]!.message).toContain("over the 1048576 pixels");
  });
});

describe("attemptFor", () => {
  it("keeps the idempotency key while the form, picture and mask are the same, and makes a new one otherwise", () => {
    const f = form({});
    const first = attemptFor(null, [f, null, undefined]);
    expect(first.key).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(attemptFor(first, [f, null, undefined])).toBe(first);
    expect(attemptFor(first, [{ ...f }, null, undefined]).key).not.toBe(first.key);
    expect(attemptFor(first, [f, { url: "blob:x" }, undefined]).key).not.toBe(first.key);
    expect(attemptFor(null, [f, null, undefined]).key).not.toBe(first.key);
  });

  it("makes a UUID without crypto.randomUUID (a page served over plain http)", () => {
    const randomUUID = crypto.randomUUID;
    try {
      Object.defineProperty(crypto, "randomUUID", { value: undefined, configurable: true });
      expect(newKey()).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    } finally {
      Object.defineProperty(crypto, "randomUUID", { value: randomUUID, configurable: true });
    }
  });
});

describe("fromJob", () => {
  it("asks for the same job again, with its seed fixed", () => {
    const job = {
      job_id: "x",
      model: "tiny",
      kind: "img2img",
      state: "completed",
      created_at: 1,
      updated_at: 2,
      request: { prompt: "a boat", negative_prompt: "fog", width: 64, height: 48, steps: 5, guidance: 6.5, scheduler: "euler", num_images: 2, strength: 0.5, loras: [{ name: "ink", scale: 0.5 }], output_format: "webp" },
      images: [{ index: 0, key: "k", width: 64, height: 48, seed: 1234, bytes: 1, content_type: "image/webp" }],
    } as JobStatus;
    const f = fromJob(job);
    expect(f).toMatchObject({ mode: "img2img", prompt: "a boat", negativePrompt: "fog", width: "64", height: "48", steps: "5", guidance: "6.5", scheduler: "euler", seedMode: "fixed", seed: "1234", numImages: 2, strength: "0.5", outputFormat: "webp" });
    expect(toSubmission(f, limits, { initImage: { object_key: "k" } }).submission).toMatchObject({ seed: 1234, width: 64, height: 48, loras: [{ name: "ink", scale: 0.5 }], output_format: "webp" });
  });
});
