// Names for the generated schema's types (schema.ts is generated from openapi.json: `npm run gen`).
import type { components } from "./schema.js";

type S = components["schemas"];
export type JobSubmission = S["JobSubmission"];
export type ImageInput = S["ImageInput"];
export type SubmitResponse = S["SubmitResponse"];
export type UploadResponse = S["UploadResponse"];
export type StatusView = S["StatusView"];
export type JobStatus = S["JobStatus"];
export type JobState = S["JobState"];
export type JobKind = S["JobKind"];
export type JobList = S["JobList"];
export type RequestSummary = S["RequestSummary"];
export type ImageResult = S["ImageResult"];
export type CancelResponse = S["CancelResponse"];
export type ModelInfo = S["ModelInfo"];
export type WorkerInfo = S["WorkerInfo"];
export type LimitsView = S["LimitsView"];
export type TokenInfo = S["TokenInfo"];
export type LoraRef = S["LoraRef"];
export type ApiErrorCode = S["ApiErrorCode"];
export type ApiEvent = S["ApiEvent"];

/** A job event's name: `queued`, `started`, `progress`, `preview`, `completed`, `failed`, `cancelled`. */
export type JobEventName = ApiEvent["event"];
/** The event named `N`, typed by its name. */
export type JobEventOf<N extends JobEventName> = Extract<ApiEvent, { event: N }>;

/** One Server-Sent Event of a job: its name and typed data, and its `id` (resume after it). */
export type JobEvent = ApiEvent & { id: string };

export const JOB_STATES: readonly JobState[] = ["queued", "running", "completed", "failed", "cancelled"];
export const TERMINAL_EVENTS: readonly JobEventName[] = ["completed", "failed", "cancelled"];

export function isTerminalState(state: JobState): boolean {
  return state === "completed" || state === "failed" || state === "cancelled";
}
