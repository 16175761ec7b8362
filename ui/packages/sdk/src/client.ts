// QueenClient: every endpoint of the queen's HTTP API, typed from its OpenAPI document.
import { ApiError, ConnectionError, isAbort } from "./errors.js";
import { followJob, type FollowOptions } from "./events.js";
import { watchdog } from "./watchdog.js";
import type {
  CancelResponse,
  JobEvent,
  JobList,
  JobState,
  JobSubmission,
  LimitsView,
  ModelInfo,
  StatusView,
  SubmitResponse,
  TokenInfo,
  UploadResponse,
  WorkerInfo,
} from "./types.js";

export interface ClientOptions {
  /** The queen's address, e.g. `http://127.0.0.1:8080`; empty (the default) for the page's own origin. */
  baseUrl?: string;
  /** The bearer token, or a function giving the current one (a token kept in the browser's storage). */
  token?: string | null | (() => string | null | undefined);
  /** `fetch` to use (tests, Node without a global fetch); the global one by default. */
  fetch?: typeof fetch;
  /** How long a request may take, answer read included, before it fails with a [`ConnectionError`]; 30 s by
   * default (2 min for uploads and image downloads, which carry the bytes); 0 for no limit. Event streams
   * have their own idle watchdog instead (`FollowOptions.idleTimeoutMs`). */
  timeoutMs?: number;
  /** Called with every `401` the queen answers (the token was revoked or is wrong), before it is thrown: the
   * place to sign out, since callers catch their errors. */
  onUnauthorized?: (error: ApiError) => void;
}

export interface RequestOptions {
  signal?: AbortSignal;
  /** This request's time limit, in place of the client's `timeoutMs`; 0 for none. */
  timeoutMs?: number;
}

const TIMEOUT_MS = 30_000;
/** Uploads and image downloads move up to tens of MiB: they get longer by default. */
const BULK_TIMEOUT_MS = 120_000;

export interface JobFilter {
  state?: JobState;
  model?: string;
  /** 1 to 500; 50 by default. */
  limit?: number;
  offset?: number;
  /** A page's `next_cursor`. */
  cursor?: number;
  /** Only this tenant's jobs (an operator's token; a tenant's token lists only its own jobs). */
  tenant?: string;
}

/** The queen's HTTP API. Every method throws [`ApiError`] for an error answer and [`ConnectionError`] when the
 * queen cannot be reached or does not answer in time; an aborted request rejects with its signal's reason (the
 * `AbortError`, or the `TimeoutError` of `AbortSignal.timeout()`, or what was given to `abort()`). */
export class QueenClient {
  readonly baseUrl: string;
  private readonly token: () => string | null | undefined;
  private readonly fetchImpl: typeof fetch;
  private readonly timeoutMs: number | undefined;
  private readonly onUnauthorized: ((error: ApiError) => void) | undefined;

  constructor(options: ClientOptions = {}) {
    this.baseUrl = (options.baseUrl ?? "").replace(/\/+$/, "");
    const token = options.token;
    this.token = typeof token === "function" ? token : () => token;
    this.fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.timeoutMs = options.timeoutMs;
    this.onUnauthorized = options.onUnauthorized;
  }

  /** The URL of an API path. */
  url(path: string): string {
    return `${this.baseUrl}${path}`;
  }

  /** Headers every request carries: the bearer token when there is one. */
  headers(extra: Record<string, string> = {}): Record<string, string> {
    const token = this.token();
    return token ? { authorization: `Bearer ${token}`, ...extra } : { ...extra };
  }

  /** Sends a request; an answer outside 2xx is thrown as an [`ApiError`]. No time limit of its own: the caller
   * reads the body (give `init.signal` one). */
  async send(method: string, path: string, init: RequestInit & { headers?: Record<string, string> } = {}): Promise<Response> {
    let response: Response;
    try {
      response = await this.fetchImpl(this.url(path), { ...init, method, headers: this.headers(init.headers) });
    } catch (e) {
      // An aborted fetch rejects with the signal's reason, which is an AbortError only by default.
      if (isAbort(e) || init.signal?.aborted) throw e;
      throw new ConnectionError(`cannot reach the queen at ${this.baseUrl || "this origin"}: ${String((e as Error)?.message ?? e)}`, { cause: e });
    }
    if (!response.ok) {
      const error = await ApiError.from(response);
      if (error.status === 401) this.onUnauthorized?.(error);
      throw error;
    }
    return response;
  }

  /** Sends a request and reads its answer with `read`, both within the request's time limit. */
  private async call<T>(
    method: string,
    path: string,
    init: RequestInit & { headers?: Record<string, string> },
    options: RequestOptions,
    read: (response: Response) => Promise<T>,
    defaultMs: number = TIMEOUT_MS,
  ): Promise<T> {
    const ms = options.timeoutMs ?? this.timeoutMs ?? defaultMs;
    const limit = watchdog(options.signal, ms);
    try {
      const response = await this.send(method, path, { ...init, signal: limit.signal });
      try {
        return await read(response);
      } catch (e) {
        if (isAbort(e) || limit.signal.aborted) throw e;
        throw new ConnectionError(`unreadable answer from the queen to ${method} ${path}`, { cause: e });
      }
    } catch (e) {
      if (limit.fired() && !options.signal?.aborted) {
        throw new ConnectionError(`the queen did not answer ${method} ${path} within ${Math.round(ms / 100) / 10} s`, { cause: e });
      }
      throw e;
    } finally {
      limit.clear();
    }
  }

  private json<T>(method: string, path: string, init: RequestInit & { headers?: Record<string, string> }, options: RequestOptions, defaultMs?: number): Promise<T> {
    return this.call(method, path, init, options, async (response) => (await response.json()) as T, defaultMs);
  }

  /** `POST /v1/jobs`: queues a job. The same `idempotencyKey` maps a retried request to the same job: without
   * one, a retry after an error or a lost answer (a 502, 503 or 504, a timeout, a dropped connection) may queue
   * the job twice, since the queen may have queued it before the answer was lost. */
  submit(job: JobSubmission, options: RequestOptions & { idempotencyKey?: string } = {}): Promise<SubmitResponse> {
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (options.idempotencyKey) headers["idempotency-key"] = options.idempotencyKey;
    return this.json("POST", "/v1/jobs", { body: JSON.stringify(job), headers }, options);
  }

  /** `GET /v1/jobs/{id}`: the job's status, queue position, ETA and image URLs. */
  job(id: string, options: RequestOptions = {}): Promise<StatusView> {
    return this.json("GET", `/v1/jobs/${encodeURIComponent(id)}`, {}, options);
  }

  /** `GET /v1/jobs`: one page of jobs, newest first. */
  jobs(filter: JobFilter = {}, options: RequestOptions = {}): Promise<JobList> {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(filter)) {
      if (value !== undefined && value !== null && value !== "") query.set(key, String(value));
    }
    const q = query.toString();
    return this.json("GET", `/v1/jobs${q ? `?${q}` : ""}`, {}, options);
  }

  /** `DELETE /v1/jobs/{id}`: `cancelled` when it never started, `cancelling` when a worker stops it. */
  cancel(id: string, options: RequestOptions = {}): Promise<CancelResponse> {
    return this.json("DELETE", `/v1/jobs/${encodeURIComponent(id)}`, {}, options);
  }

  /** `GET /v1/jobs/{id}/images/{n}`: image `n` of a completed job, through the queen. */
  image(id: string, n: number, options: RequestOptions = {}): Promise<Blob> {
    return this.call("GET", `/v1/jobs/${encodeURIComponent(id)}/images/${n}`, {}, options, (response) => response.blob(), BULK_TIMEOUT_MS);
  }

  /** `POST /v1/uploads`: an image (PNG, JPEG or WebP) to name as `init_image` or `mask` by its key. */
  upload(image: Blob | ArrayBuffer | Uint8Array, options: RequestOptions = {}): Promise<UploadResponse> {
    const type = image instanceof Blob && image.type ? image.type : "application/octet-stream";
    return this.json("POST", "/v1/uploads", { body: image as BodyInit, headers: { "content-type": type } }, options, BULK_TIMEOUT_MS);
  }

  /** `GET /v1/models`: the models jobs may name, with their workers, LoRAs and defaults. */
  models(options: RequestOptions = {}): Promise<ModelInfo[]> {
    return this.json("GET", "/v1/models", {}, options);
  }

  /** `GET /v1/workers`: every worker the queen has heard of (an operator's token; a tenant's is answered
   * `403 FORBIDDEN`). */
  workers(options: RequestOptions = {}): Promise<WorkerInfo[]> {
    return this.json("GET", "/v1/workers", {}, options);
  }

  /** `GET /v1/me`: what this client's token may do: its tenant (absent for an operator's token), priorities
   * and submission rate. */
  me(options: RequestOptions = {}): Promise<TokenInfo> {
    return this.json("GET", "/v1/me", {}, options);
  }

  /** `GET /v1/limits`: what a job may ask for here, and the values of its choice fields. */
  limits(options: RequestOptions = {}): Promise<LimitsView> {
    return this.json("GET", "/v1/limits", {}, options);
  }

  /** `GET /health`: whether the queen's process is up. */
  async health(options: RequestOptions = {}): Promise<boolean> {
    return this.call("GET", "/health", {}, options, async () => true).catch((e) => {
      if (isAbort(e) || options.signal?.aborted) throw e;
      return false;
    });
  }

  /** `GET /ready`: whether the queen can reach NATS and its streams. */
  async ready(options: RequestOptions = {}): Promise<boolean> {
    return this.call("GET", "/ready", {}, options, async () => true).catch((e) => {
      if (isAbort(e) || options.signal?.aborted) throw e;
      return false;
    });
  }

  /** `GET /metrics`: the Prometheus text. */
  metrics(options: RequestOptions = {}): Promise<string> {
    return this.call("GET", "/metrics", {}, options, (response) => response.text());
  }

  /** `GET /v1/jobs/{id}/events`: the job's events, typed, until its terminal one; a dropped connection is
   * resumed with `Last-Event-ID`, so no event is lost or repeated. */
  events(id: string, options: FollowOptions = {}): AsyncGenerator<JobEvent, void, undefined> {
    return followJob(this, id, options);
  }

  /** Submits a job and follows it to its end, calling `onEvent` for each event; resolves with the job's
   * final status. */
  async generate(
    job: JobSubmission,
    options: FollowOptions & { idempotencyKey?: string; onSubmitted?: (answer: SubmitResponse) => void; onEvent?: (event: JobEvent) => void } = {},
  ): Promise<StatusView> {
    const answer = await this.submit(job, options);
    options.onSubmitted?.(answer);
    for await (const event of this.events(answer.job_id, options)) options.onEvent?.(event);
    return this.job(answer.job_id, { signal: options.signal });
  }
}
