// One job: every parameter and seed, live progress while it runs, its images, and what to do next.
import { useJob } from "@sd-rbee/react";
import { useState } from "react";

import { useWorkspace } from "./workspace";
import { fromJob } from "./form";
import { duration, when } from "./format";
import { ImageGrid } from "./ImageGrid";
import { ProgressBar, StatusLine } from "./LivePanel";
import { go, href } from "./route";
import { useQueen } from "@sd-rbee/react";

export function JobPage({ id }: { id: string }) {
  const client = useQueen();
  const job = useJob(id);
  const { setForm } = useWorkspace();
  const [cancelError, setCancelError] = useState<string | null>(null);
  const s = job.status;
  const r = s?.request;
  const cancel = async () => {
    try {
      await client.cancel(id);
      job.reload();
    } catch (e) {
      setCancelError((e as Error).message);
    }
  };
  const active = job.state === "queued" || job.state === "running";
  const rows: [string, string | number | undefined | null][] = s
    ? [
        ["Model", s.model],
        ["Kind", s.kind ?? "txt2img"],
        ["Prompt", r?.prompt],
        ["Negative prompt", r?.negative_prompt],
        ["Size", r?.width && r?.height ? `${r.width} × ${r.height}` : s.images?.[0] ? `${s.images[0].width} × ${s.images[0].height} (model's)` : "model's"],
        ["Steps", r?.steps ?? "model's"],
        ["Guidance", r?.guidance ?? "model's"],
        ["Scheduler", r?.scheduler ?? "model's"],
        ["Timestep spacing", r?.timestep_spacing],
        ["Seed", r?.seed ?? (s.images?.length ? `random: ${s.images.map((i) => i.seed).join(", ")}` : "random")],
        ["Images", r?.num_images],
        ["Strength", r?.strength],
        ["Mask blur", r?.mask_blur],
        ["Invert mask", r?.invert_mask === undefined || r?.invert_mask === null ? undefined : r.invert_mask ? "yes" : "no"],
        ["Paste back", r?.paste_back === undefined || r?.paste_back === null ? undefined : r.paste_back ? "yes" : "no"],
        ["LoRAs", r?.loras?.length ? r.loras.map((l) => `${l.name} × ${l.scale ?? 1}`).join(", ") : undefined],
        ["Clip skip", r?.clip_skip],
        ["Format", r?.output_format?.toUpperCase()],
        ["Worker", s.worker_id],
        ["Deliveries", (s.deliveries ?? 0) > 1 ? s.deliveries : undefined],
        ["Created", when(s.created_at)],
        ["Started", when(s.started_at)],
        ["Finished", when(s.finished_at)],
        ["Queue time", s.timings ? duration(s.timings.queue_ms) : undefined],
        ["Generation time", s.timings ? duration(s.timings.generation_ms) : undefined],
        ["Total time", s.timings ? duration(s.timings.total_ms) : undefined],
      ]
    : [];
  return (
    <section className="panel job" aria-labelledby="job-title">
      <p>
        <a href={href({ page: "gallery" })}>← Gallery</a>
      </p>
      <h1 id="job-title">Job {id}</h1>
      {job.error && (
        <p className="error" role="alert">
          {job.error.message}
        </p>
      )}
      {s && (
        <>
          <StatusLine job={job} />
          {active && <ProgressBar job={job} />}
          {job.failure && (
            <p className="error">
              {job.failure.message} ({job.failure.code}
              {job.failure.field ? `, field ${job.failure.field}` : ""})
            </p>
          )}
          <div className="actions">
            {r && (
              <button type="button" className="primary" onClick={() => (setForm(fromJob(s)), go({ page: "generate" }))}>
                Use these settings again
              </button>
            )}
            {active && (
              <button type="button" className="danger" onClick={cancel}>
                Cancel
              </button>
            )}
          </div>
          {cancelError && <p className="error">{cancelError}</p>}
          {job.preview && active && <img className="preview" src={job.preview} alt={`Preview at step ${job.step}`} />}
          {job.images.length > 0 && <ImageGrid jobId={id} images={job.images} urls={s.image_urls} />}
          <dl className="params">
            {rows
              .filter(([, v]) => v !== undefined && v !== null && v !== "")
              .map(([k, v]) => (
                <div key={k}>
                  <dt>{k}</dt>
                  <dd>{v}</dd>
                </div>
              ))}
          </dl>
          {s.warnings && s.warnings.length > 0 && (
            <ul className="warnings">
              {s.warnings.map((w) => (
                <li key={w}>{w}</li>
              ))}
            </ul>
          )}
        </>
      )}
    </section>
  );
}
