// A job's live state as its events move it along: one pure function, so hooks and tests share it.
import type { ApiError, ImageResult, JobEvent, StatusView } from "@sd-rbee/sdk";

export type LiveState = "idle" | "submitting" | "queued" | "running" | "completed" | "failed" | "cancelled";

export interface LiveJob {
  state: LiveState;
  jobId?: string;
  /** Set while queued, from the job's status: jobs ahead of it, and the estimated time to completion. */
  queuePosition?: number;
  etaMs?: number;
  workerId?: string;
  /** `loading` while the worker loads the model. */
  phase?: string;
  step: number;
  total: number;
  percent: number;
  /** The newest step preview, a `data:image/jpeg` URL. */
  preview?: string;
  images: ImageResult[];
  warnings: string[];
  /** Why it failed: the API's code, message and the request's field at fault. */
  failure?: { code: string; message: string; field?: string };
  /** Steps done when it was cancelled. */
  cancelledAtStep?: number;
  /** An error of the request itself (refused submission, lost connection). */
  error?: ApiError | Error;
  /** The id of the last event applied (resume after it). */
  lastEventId?: string;
  /** The final status, fetched after the terminal event. */
  status?: StatusView;
}

export const IDLE: LiveJob = { state: "idle", step: 0, total: 0, percent: 0, images: [], warnings: [] };

/** `job` moved along by `event`. */
export function applyEvent(job: LiveJob, event: JobEvent): LiveJob {
  const next: LiveJob = { ...job, lastEventId: event.id || job.lastEventId };
  switch (event.event) {
    case "queued":
      return { ...next, state: "queued", jobId: event.data.job_id };
    case "started":
      return { ...next, state: "running", workerId: event.data.worker_id, queuePosition: undefined };
    case "progress":
      return {
        ...next,
        state: "running",
        step: event.data.step,
        total: event.data.total,
        percent: event.data.percent,
        etaMs: event.data.eta_ms ?? undefined,
        phase: event.data.phase ?? undefined,
        queuePosition: undefined,
      };
    case "preview":
      return { ...next, preview: event.data.image };
    case "completed":
      return { ...next, state: "completed", images: event.data.images, warnings: event.data.warnings ?? [], percent: 100, etaMs: undefined };
    case "failed":
      return {
        ...next,
        state: "failed",
        failure: { code: event.data.code, message: event.data.message, field: event.data.field ?? undefined },
        etaMs: undefined,
      };
    case "cancelled":
      return { ...next, state: "cancelled", cancelledAtStep: event.data.at_step ?? undefined, etaMs: undefined };
    default:
      return next;
  }
}

/** `job` with what a status answer says (queue position and ETA while queued; running once started; the whole
 * record at the end). */
export function applyStatus(job: LiveJob, status: StatusView): LiveJob {
  const next: LiveJob = { ...job, jobId: status.job_id };
  if (status.state === "queued") {
    return { ...next, state: job.state === "submitting" || job.state === "idle" ? "queued" : job.state, queuePosition: status.queue_position ?? undefined, etaMs: status.eta_ms ?? job.etaMs };
  }
  if (status.state === "completed" || status.state === "failed" || status.state === "cancelled") {
    return {
      ...next,
      state: status.state,
      status,
      images: status.images ?? job.images,
      warnings: status.warnings ?? job.warnings,
      failure: status.error ? { code: status.error.code, message: status.error.message, field: status.error.field ?? undefined } : job.failure,
      cancelledAtStep: status.cancelled_at_step ?? job.cancelledAtStep,
    };
  }
  if (status.state === "running") {
    // The poll can see the start before the `started` event comes; an ended job does not go back.
    const live = job.state === "idle" || job.state === "submitting" || job.state === "queued" || job.state === "running";
    if (!live) return { ...next, status };
    return { ...next, state: "running", status, queuePosition: undefined, workerId: status.worker_id ?? job.workerId, etaMs: status.eta_ms ?? job.etaMs };
  }
  return { ...next, status };
}
