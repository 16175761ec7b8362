// Text to image, image to image and inpainting: the form, then the job live beside it.
import { useLimits, useModels, useQueen } from "@sd-rbee/react";
import { ApiError, type LimitsView, type ModelInfo } from "@sd-rbee/sdk";
import { cloneElement, useEffect, useMemo, useRef, useState, type FormEvent, type ReactElement } from "react";

import { picture, useWorkspace, type Picture } from "./workspace";
import { attemptFor, modelDefaults, SIZE_PRESETS, toSubmission, type FieldError, type FormState, type Mode } from "./form";
import { LivePanel } from "./LivePanel";
import { MaskEditor, type MaskHandle } from "./MaskEditor";

const MODES: { mode: Mode; label: string }[] = [
  { mode: "txt2img", label: "Text to image" },
  { mode: "img2img", label: "Image to image" },
  { mode: "inpaint", label: "Inpaint" },
];

export function GeneratePage() {
  const client = useQueen();
  const models = useModels({ refreshMs: 15000 });
  const limits = useLimits();
  const { form, setForm, init, setInit, job, mask: keptMask, attempt } = useWorkspace();
  const [errors, setErrors] = useState<FieldError[]>([]);
  const [uploading, setUploading] = useState(false);
  const uploads = useRef<AbortController | null>(null);
  const mask = useRef<MaskHandle>(null);
  // The first model by default; each model's defaults show in the empty fields.
  const list = models.data ?? [];
  useEffect(() => {
    if (!form.model && list[0]) setForm((f) => ({ ...f, model: list[0]!.name }));
  }, [list, form.model]);
  const model = list.find((m) => m.name === form.model);
  const defaults = modelDefaults(model);

  const set = <K extends keyof FormState>(key: K, value: FormState[K]) => setForm((f) => ({ ...f, [key]: value }));
  const lastSeed = job.images[0]?.seed;

  // What the queen said about the last try, as field errors.
  const answerErrors: FieldError[] = useMemo(() => {
    const e = job.error;
    if (e instanceof ApiError) return [{ field: e.field ?? "", message: e.message }];
    if (job.failure) return [{ field: job.failure.field ?? "", message: `${job.failure.message} (${job.failure.code})` }];
    return [];
  }, [job.error, job.failure]);
  const allErrors = [...errors, ...answerErrors];
  const errorOf = (field: string) => allErrors.find((e) => e.field === field)?.message;

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setErrors([]);
    const needsInit = form.mode !== "txt2img";
    const initSize = needsInit && init ? { width: init.width, height: init.height } : undefined;
    let check = toSubmission(form, limits.data, { lastSeed, initSize, initImage: needsInit && init ? { object_key: "pending" } : undefined, mask: form.mode === "inpaint" && mask.current && !mask.current.isEmpty() ? { object_key: "pending" } : undefined });
    if (check.errors.length) {
      setErrors(check.errors);
      document.getElementById(`f-${check.errors[0]!.field}`)?.focus();
      return;
    }
    // One idempotency key per attempt: trying the same form again after an answer that never came gets the
    // job the queen may have queued already, not a second one. A new key once the form, the picture or the
    // mask changed, or a job came back (the workspace forgets the attempt then).
    const key = (attempt.current = attemptFor(attempt.current, [form, init, keptMask.current?.data])).key;
    const controller = new AbortController();
    uploads.current = controller;
    try {
      setUploading(true);
      const initKey = needsInit && init ? (await client.upload(init.blob, { signal: controller.signal })).object_key : undefined;
      const maskKey = form.mode === "inpaint" && mask.current ? (await client.upload(await mask.current.toBlob(), { signal: controller.signal })).object_key : undefined;
      check = toSubmission(form, limits.data, { lastSeed, initSize, initImage: initKey ? { object_key: initKey } : undefined, mask: maskKey ? { object_key: maskKey } : undefined });
    } catch (e) {
      // Cancelled: nothing to say.
      if (controller.signal.aborted) return;
      setErrors([{ field: e instanceof ApiError && e.field ? e.field : "init_image", message: `Cannot upload the picture: ${(e as Error).message}` }]);
      return;
    } finally {
      if (uploads.current === controller) uploads.current = null;
      setUploading(false);
    }
    void job.submit(check.submission!, { idempotencyKey: key });
  };

  const choose = async (file: File | undefined | null) => {
    if (!file) return;
    try {
      setInit(await picture(file));
      setErrors((es) => es.filter((x) => x.field !== "init_image"));
    } catch (e) {
      setErrors([{ field: "init_image", message: (e as Error).message }]);
    }
  };

  const running = job.state === "submitting" || job.state === "queued" || job.state === "running";
  return (
    <div className="generate">
      <form className="panel form" onSubmit={submit} noValidate aria-labelledby="gen-title">
        <h1 id="gen-title">Generate</h1>
        {models.error && <p className="error" role="alert">Cannot list the models: {models.error.message}</p>}
        <fieldset className="modes">
          <legend>Mode</legend>
          {MODES.map(({ mode, label }) => (
            <label key={mode} className="mode">
              <input type="radio" name="mode" value={mode} checked={form.mode === mode} onChange={() => set("mode", mode)} />
              {label}
            </label>
          ))}
        </fieldset>

        <Field id="model" label="Model" error={errorOf("model")}>
          <select id="f-model" value={form.model} onChange={(e) => set("model", e.target.value)}>
            {list.length === 0 && <option value="">No models yet</option>}
            {list.map((m) => (
              <option key={m.name} value={m.name}>
                {m.name} {m.workers === 0 ? "(no worker now)" : ""}
              </option>
            ))}
          </select>
        </Field>

        <Field id="prompt" label="Prompt" error={errorOf("prompt")}>
          <textarea id="f-prompt" rows={3} value={form.prompt} onChange={(e) => set("prompt", e.target.value)} />
        </Field>
        <Field id="negative_prompt" label="Negative prompt" error={errorOf("negative_prompt")}>
          <textarea id="f-negative_prompt" rows={2} value={form.negativePrompt} onChange={(e) => set("negativePrompt", e.target.value)} />
        </Field>

        {form.mode !== "txt2img" && (
          <InitPicker init={init} error={errorOf("init_image")} onChoose={choose} onClear={() => setInit(null)} />
        )}
        {form.mode === "inpaint" && init && (
          <div className="field">
            <span className="label" id="mask-label">
              Mask
            </span>
            <MaskEditor ref={mask} src={init.url} width={init.width} height={init.height} keep={keptMask} />
            {errorOf("mask") && (
              <p className="error" id="f-mask" tabIndex={-1}>
                {errorOf("mask")}
              </p>
            )}
            <div className="row">
              <Field id="mask_blur" label="Mask blur (px)" error={errorOf("mask_blur")}>
                <input id="f-mask_blur" type="number" min={0} max={limits.data?.max_mask_blur} placeholder={String(limits.data?.default_mask_blur ?? 4)} value={form.maskBlur} onChange={(e) => set("maskBlur", e.target.value)} />
              </Field>
              <label className="check">
                <input type="checkbox" checked={form.invertMask} onChange={(e) => set("invertMask", e.target.checked)} /> Invert mask
              </label>
              <label className="check">
                <input type="checkbox" checked={form.pasteBack} onChange={(e) => set("pasteBack", e.target.checked)} /> Paste back
              </label>
            </div>
          </div>
        )}
        {form.mode !== "txt2img" && (
          <Field id="strength" label="Strength" error={errorOf("strength")}>
            <input id="f-strength" type="number" step="0.05" min={0} max={1} value={form.strength} placeholder={String(form.mode === "inpaint" ? (limits.data?.default_inpaint_strength ?? 1) : (limits.data?.default_img2img_strength ?? 0.8))} onChange={(e) => set("strength", e.target.value)} />
          </Field>
        )}

        <SizeFields form={form} set={set} defaults={defaults} limits={limits.data} errorOf={errorOf} />

        <div className="row">
          <Field id="steps" label="Steps" error={errorOf("steps")}>
            <input id="f-steps" type="number" min={1} max={limits.data?.max_steps} placeholder={defaults.steps ? String(defaults.steps) : "model's"} value={form.steps} onChange={(e) => set("steps", e.target.value)} />
          </Field>
          <Field id="guidance" label="Guidance" error={errorOf("guidance")}>
            <input id="f-guidance" type="number" step="0.5" min={0} max={limits.data?.max_guidance} placeholder={defaults.guidance !== undefined ? String(defaults.guidance) : "model's"} value={form.guidance} onChange={(e) => set("guidance", e.target.value)} />
          </Field>
          <Field id="scheduler" label="Scheduler" error={errorOf("scheduler")}>
            <select id="f-scheduler" value={form.scheduler} onChange={(e) => set("scheduler", e.target.value)}>
              <option value="">Model's ({defaults.scheduler ?? "default"})</option>
              {(limits.data?.schedulers ?? []).map((s) => (
                <option key={s}>{s}</option>
              ))}
            </select>
          </Field>
        </div>

        <fieldset className="seed">
          <legend>Seed</legend>
          {(["random", "fixed", "reuse"] as const).map((m) => (
            <label key={m} className="check">
              <input type="radio" name="seed-mode" value={m} checked={form.seedMode === m} onChange={() => set("seedMode", m)} />
              {m === "random" ? "Random" : m === "fixed" ? "Fixed" : `Reuse last${lastSeed !== undefined ? ` (${lastSeed})` : ""}`}
            </label>
          ))}
          {form.seedMode === "fixed" && (
            <input id="f-seed" aria-label="Seed" type="number" min={0} value={form.seed} onChange={(e) => set("seed", e.target.value)} aria-invalid={!!errorOf("seed") || undefined} />
          )}
          {errorOf("seed") && <p className="error">{errorOf("seed")}</p>}
        </fieldset>

        <div className="row">
          <Field id="num_images" label="Images" error={errorOf("num_images")}>
            <input id="f-num_images" type="number" min={1} max={limits.data?.max_images ?? 8} value={form.numImages} onChange={(e) => set("numImages", Number(e.target.value))} />
          </Field>
          <Field id="output_format" label="Format" error={errorOf("output_format")}>
            <select id="f-output_format" value={form.outputFormat} onChange={(e) => set("outputFormat", e.target.value)}>
              <option value="">PNG (default)</option>
              {(limits.data?.output_formats ?? []).map((f) => (
                <option key={f} value={f}>
                  {f.toUpperCase()}
                </option>
              ))}
            </select>
          </Field>
        </div>

        <Loras model={model} form={form} set={set} error={errorOf("loras")} />

        {allErrors.some((e) => !e.field) && (
          <p className="error" role="alert">
            {allErrors.filter((e) => !e.field).map((e) => e.message).join(" ")}
          </p>
        )}
        {allErrors.length > 0 && (
          <p className="sr-only" role="alert">
            {allErrors.map((e) => `${e.field || "request"}: ${e.message}`).join(". ")}
          </p>
        )}
        <div className="actions">
          <button type="submit" className="primary" disabled={uploading || job.state === "submitting"}>
            {uploading ? "Uploading…" : running ? "Generate another" : "Generate"}
          </button>
          {uploading && (
            <button type="button" className="quiet" onClick={() => uploads.current?.abort()}>
              Cancel upload
            </button>
          )}
        </div>
      </form>
      <LivePanel job={job} onCancel={job.cancel} />
    </div>
  );
}

/** A labelled control; with an error, the control is marked invalid and described by the error's text. */
export function Field({ id, label, error, children }: { id: string; label: string; error?: string; children: ReactElement<Record<string, unknown>> }) {
  const control = error ? cloneElement(children, { "aria-invalid": true, "aria-describedby": `f-${id}-error` }) : children;
  return (
    <div className={`field${error ? " invalid" : ""}`}>
      <label htmlFor={`f-${id}`}>{label}</label>
      {control}
      {error && (
        <p className="error" id={`f-${id}-error`}>
          {error}
        </p>
      )}
    </div>
  );
}

function SizeFields({ form, set, defaults, limits, errorOf }: { form: FormState; set: <K extends keyof FormState>(k: K, v: FormState[K]) => void; defaults: ReturnType<typeof modelDefaults>; limits?: LimitsView; errorOf: (f: string) => string | undefined }) {
  const preset = SIZE_PRESETS.find((p) => String(p.width) === form.width && String(p.height) === form.height);
  const fits = (w: number, h: number) => !limits || (w <= limits.max_side && h <= limits.max_side && w * h <= limits.max_pixels);
  return (
    <div className="row">
      <div className="field">
        <label htmlFor="f-size">Size</label>
        <select
          id="f-size"
          value={preset ? preset.label : form.width || form.height ? "custom" : ""}
          onChange={(e) => {
            const p = SIZE_PRESETS.find((x) => x.label === e.target.value);
            if (p) {
              set("width", String(p.width));
              set("height", String(p.height));
            } else if (e.target.value === "") {
              set("width", "");
              set("height", "");
            }
          }}
        >
          <option value="">Model's ({defaults.width && defaults.height ? `${defaults.width} × ${defaults.height}` : "default"})</option>
          {SIZE_PRESETS.filter((p) => fits(p.width, p.height)).map((p) => (
            <option key={p.label}>{p.label}</option>
          ))}
          <option value="custom">Custom</option>
        </select>
      </div>
      <Field id="width" label="Width" error={errorOf("width")}>
        <input id="f-width" type="number" step={8} min={8} max={limits?.max_side} placeholder={defaults.width ? String(defaults.width) : "model's"} value={form.width} onChange={(e) => set("width", e.target.value)} />
      </Field>
      <Field id="height" label="Height" error={errorOf("height")}>
        <input id="f-height" type="number" step={8} min={8} max={limits?.max_side} placeholder={defaults.height ? String(defaults.height) : "model's"} value={form.height} onChange={(e) => set("height", e.target.value)} />
      </Field>
    </div>
  );
}

function InitPicker({ init, error, onChoose, onClear }: { init: Picture | null; error?: string; onChoose: (f: File | null | undefined) => void; onClear: () => void }) {
  const [over, setOver] = useState(false);
  return (
    <div className={`field${error ? " invalid" : ""}`}>
      <label htmlFor="f-init_image">Start from a picture</label>
      <div
        className={`drop${over ? " over" : ""}`}
        onDragOver={(e) => {
          e.preventDefault();
          setOver(true);
        }}
        onDragLeave={() => setOver(false)}
        onDrop={(e) => {
          e.preventDefault();
          setOver(false);
          onChoose(e.dataTransfer.files[0]);
        }}
      >
        {init ? <img src={init.url} alt="The picture to start from" className="init-thumb" /> : <span>Drop a PNG, JPEG or WebP here, or choose one:</span>}
        <input id="f-init_image" type="file" accept="image/png,image/jpeg,image/webp" onChange={(e) => onChoose(e.target.files?.[0])} aria-invalid={!!error || undefined} />
        {init && (
          <button type="button" className="quiet" onClick={onClear}>
            Remove picture ({init.width} × {init.height})
          </button>
        )}
      </div>
      {error && <p className="error">{error}</p>}
    </div>
  );
}

function Loras({ model, form, set, error }: { model?: ModelInfo; form: FormState; set: <K extends keyof FormState>(k: K, v: FormState[K]) => void; error?: string }) {
  const available = (model?.loras ?? []).filter((l) => !form.loras.some((x) => x.name === l));
  if (!model?.loras?.length && !form.loras.length) return null;
  return (
    <fieldset className={`loras${error ? " invalid" : ""}`} id="f-loras" tabIndex={-1}>
      <legend>LoRAs</legend>
      {form.loras.map((l, i) => (
        <div className="row" key={l.name}>
          <label className="inline">
            {l.name} scale
            <input type="number" step="0.05" min={-4} max={4} value={l.scale} onChange={(e) => set("loras", form.loras.map((x, j) => (j === i ? { ...x, scale: Number(e.target.value) } : x)))} />
          </label>
          <button type="button" className="quiet" onClick={() => set("loras", form.loras.filter((_, j) => j !== i))}>
            Remove {l.name}
          </button>
        </div>
      ))}
      {available.length > 0 && (
        <select aria-label="Add a LoRA" value="" onChange={(e) => e.target.value && set("loras", [...form.loras, { name: e.target.value, scale: 1 }])}>
          <option value="">Add a LoRA…</option>
          {available.map((l) => (
            <option key={l}>{l}</option>
          ))}
        </select>
      )}
      {error && <p className="error">{error}</p>}
    </fieldset>
  );
}
