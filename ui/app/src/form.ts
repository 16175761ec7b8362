// The generate form's state and its conversions: to a job submission (checked against the queen's
// limits first, each problem naming its field as the API would), and back from a finished job's record.
import type { ImageInput, JobStatus, JobSubmission, LimitsView, LoraRef, ModelInfo } from "@sd-rbee/sdk";

export type Mode = "txt2img" | "img2img" | "inpaint";
export type SeedMode = "random" | "fixed" | "reuse";

export interface FormState {
  mode: Mode;
  model: string;
  prompt: string;
  negativePrompt: string;
  /** Empty: the model's default. */
  width: string;
  height: string;
  steps: string;
  guidance: string;
  scheduler: string;
  seedMode: SeedMode;
  seed: string;
  numImages: number;
  loras: LoraRef[];
  outputFormat: string;
  strength: string;
  maskBlur: string;
  invertMask: boolean;
  pasteBack: boolean;
}

export const EMPTY_FORM: FormState = {
  mode: "txt2img",
  model: "",
  prompt: "",
  negativePrompt: "",
  width: "",
  height: "",
  steps: "",
  guidance: "",
  scheduler: "",
  seedMode: "random",
  seed: "",
  numImages: 1,
  loras: [],
  outputFormat: "",
  strength: "",
  maskBlur: "",
  invertMask: false,
  pasteBack: true,
};

export const SIZE_PRESETS: readonly { label: string; width: number; height: number }[] = [
  { label: "512 × 512", width: 512, height: 512 },
  { label: "768 × 768", width: 768, height: 768 },
  { label: "1024 × 1024", width: 1024, height: 1024 },
  { label: "512 × 768 portrait", width: 512, height: 768 },
  { label: "768 × 512 landscape", width: 768, height: 512 },
  { label: "832 × 1216 portrait", width: 832, height: 1216 },
  { label: "1216 × 832 landscape", width: 1216, height: 832 },
];

/** A model's defaults (`defaults` of a built-in short name), as the form shows them for empty fields. */
export interface ModelDefaults {
  width?: number;
  height?: number;
  steps?: number;
  guidance?: number;
  scheduler?: string;
}

export function modelDefaults(model: ModelInfo | undefined): ModelDefaults {
  const d = (model?.defaults ?? {}) as Record<string, unknown>;
  const num = (v: unknown) => (typeof v === "number" ? v : undefined);
  return { width: num(d.width), height: num(d.height), steps: num(d.steps), guidance: num(d.guidance), scheduler: typeof d.scheduler === "string" ? d.scheduler : undefined };
}

/** A problem with the form, named by the submission's field (as the API names it). */
export interface FieldError {
  field: string;
  message: string;
}

export interface Inputs {
  initImage?: ImageInput;
  /** The init picture's size: without a width and height, the job's size is the picture's own. */
  initSize?: { width: number; height: number };
  mask?: ImageInput;
  /** The seed of the last result (for `reuse`). */
  lastSeed?: number;
}

const trimmed = (s: string) => s.trim();

function integer(field: string, text: string, min: number, max: number, errors: FieldError[]): number | undefined {
  if (trimmed(text) === "") return undefined;
  const v = Number(text);
  if (!Number.isInteger(v) || v < min || v > max) {
    errors.push({ field, message: `must be a whole number from ${min} to ${max}` });
    return undefined;
  }
  return v;
}

function decimal(field: string, text: string, min: number, max: number, errors: FieldError[]): number | undefined {
  if (trimmed(text) === "") return undefined;
  const v = Number(text);
  if (!Number.isFinite(v) || v < min || v > max) {
    errors.push({ field, message: `must be a number from ${min} to ${max}` });
    return undefined;
  }
  return v;
}

/** The submission the form describes, or what is wrong with it. */
export function toSubmission(form: FormState, limits: LimitsView | undefined, inputs: Inputs = {}): { submission?: JobSubmission; errors: FieldError[] } {
  const errors: FieldError[] = [];
  const maxSide = limits?.max_side ?? 4096;
  if (!form.model) errors.push({ field: "model", message: "choose a model" });
  if (!trimmed(form.prompt)) errors.push({ field: "prompt", message: "write what to generate" });
  const width = integer("width", form.width, 8, maxSide, errors);
  const height = integer("height", form.height, 8, maxSide, errors);
  for (const [field, v] of [["width", width], ["height", height]] as const) {
    if (v !== undefined && v % (limits?.size_multiple ?? 8) !== 0) errors.push({ field, message: `must be a multiple of ${limits?.size_multiple ?? 8}` });
  }
  if (width && height && limits && width * height > limits.max_pixels) {
    errors.push({ field: "width", message: `${width} × ${height} is more than the ${limits.max_pixels.toLocaleString("en")} pixels this queen allows` });
  }
  const steps = integer("steps", form.steps, 1, limits?.max_steps ?? 150, errors);
  const guidance = decimal("guidance", form.guidance, 0, limits?.max_guidance ?? 30, errors);
  const numImages = integer("num_images", String(form.numImages), 1, limits?.max_images ?? 8, errors) ?? 1;
  let seed: number | undefined;
  if (form.seedMode === "fixed") {
    seed = integer("seed", form.seed, 0, Number.MAX_SAFE_INTEGER, errors);
    if (seed === undefined && !errors.some((e) => e.field === "seed")) errors.push({ field: "seed", message: "give a seed, or choose random" });
  } else if (form.seedMode === "reuse") {
    if (inputs.lastSeed === undefined) errors.push({ field: "seed", message: "there is no earlier result to take the seed from" });
    seed = inputs.lastSeed;
  }
  const submission: JobSubmission = { model: form.model, prompt: form.prompt, num_images: numImages };
  if (trimmed(form.negativePrompt)) submission.negative_prompt = form.negativePrompt;
  if (width !== undefined) submission.width = width;
  if (height !== undefined) submission.height = height;
  if (steps !== undefined) submission.steps = steps;
  if (guidance !== undefined) submission.guidance = guidance;
  if (form.scheduler) submission.scheduler = form.scheduler;
  if (seed !== undefined) submission.seed = seed;
  if (form.outputFormat) submission.output_format = form.outputFormat as JobSubmission["output_format"];
  if (form.loras.length) {
    if (limits && form.loras.length > limits.max_loras) errors.push({ field: "loras", message: `at most ${limits.max_loras} LoRAs` });
    submission.loras = form.loras.map((l) => ({ name: l.name, scale: l.scale }));
  }
  if (form.mode !== "txt2img") {
    if (!inputs.initImage) errors.push({ field: "init_image", message: "choose a picture to start from" });
    else submission.init_image = inputs.initImage;
    // A side not given is the picture's, rounded down to a multiple of 8 as the worker takes it: the worker
    // would refuse it only once the job is its turn.
    const size = inputs.initSize;
    if (size) {
      const w = width ?? Math.floor(size.width / 8) * 8;
      const h = height ?? Math.floor(size.height / 8) * 8;
      const maxPixels = limits?.max_pixels;
      const overSide = (width === undefined && w > maxSide) || (height === undefined && h > maxSide);
      const overArea = (width === undefined || height === undefined) && maxPixels !== undefined && w * h > maxPixels;
      if (overSide || overArea) {
        const limit = overSide ? `the ${maxSide} pixels a side` : `the ${maxPixels} pixels`;
        errors.push({ field: "init_image", message: `the picture is ${size.width} × ${size.height}, over ${limit} this queen allows: give a width and height to resize it to, or scale it down` });
      }
    }
    const strength = decimal("strength", form.strength, 0, 1, errors);
    if (strength !== undefined) submission.strength = strength;
    submission.kind = form.mode;
  }
  if (form.mode === "inpaint") {
    if (!inputs.mask) errors.push({ field: "mask", message: "paint the area to change on the picture" });
    else submission.mask = inputs.mask;
    const blur = integer("mask_blur", form.maskBlur, 0, limits?.max_mask_blur ?? 64, errors);
    if (blur !== undefined) submission.mask_blur = blur;
    submission.invert_mask = form.invertMask;
    submission.paste_back = form.pasteBack;
  }
  return errors.length ? { errors } : { submission, errors };
}

/** One attempt at a submission: its idempotency key, and what it was made for. */
export interface Attempt {
  key: string;
  of: readonly unknown[];
}

/** The attempt to submit `of` (the form, the picture, the mask) under: `last` again while each of them is the
 * same (a retry after an answer that never came, which the queen maps to its first job by the key), else a new
 * one. */
export function attemptFor(last: Attempt | null, of: readonly unknown[]): Attempt {
  if (last && last.of.length === of.length && last.of.every((v, i) => Object.is(v, of[i]))) return last;
  return { key: newKey(), of };
}

/** A random (v4) UUID. `crypto.randomUUID` exists only in secure contexts, and a queen may serve the page over
 * plain http on its network. */
export function newKey(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

const text = (v: number | null | undefined) => (v === undefined || v === null ? "" : String(v));

/** The form that asks for `job` again: its parameters and (fixed) seed. Input images are not kept by the
 * queen, so img2img and inpainting need their picture again. */
export function fromJob(job: JobStatus): FormState {
  const r = job.request;
  const seed = r?.seed ?? job.images?.[0]?.seed;
  const mode: Mode = job.kind === "img2img" || job.kind === "inpaint" ? job.kind : "txt2img";
  return {
    ...EMPTY_FORM,
    mode,
    model: job.model ?? "",
    prompt: r?.prompt ?? "",
    negativePrompt: r?.negative_prompt ?? "",
    width: text(r?.width),
    height: text(r?.height),
    steps: text(r?.steps),
    guidance: text(r?.guidance),
    scheduler: r?.scheduler ?? "",
    seedMode: seed === undefined || seed === null ? "random" : "fixed",
    seed: text(seed),
    numImages: r?.num_images ?? 1,
    loras: (r?.loras ?? []).map((l) => ({ name: l.name, scale: l.scale ?? 1 })),
    outputFormat: r?.output_format ?? "",
    strength: text(r?.strength),
    maskBlur: text(r?.mask_blur),
    invertMask: r?.invert_mask ?? false,
    pasteBack: r?.paste_back ?? true,
  };
}
