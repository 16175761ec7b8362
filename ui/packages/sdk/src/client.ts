// QueenClient: every endpoint of the queen's HTTP API, typed from its OpenAPI document.
import { ApiError, ConnectionError, isAbort } from "./errors.js";
import { followJob, type FollowOptions } from "./events.js";
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
}

export interface RequestOptions {
  signal?: AbortSignal;
}

export interface JobFilter {
  state?: JobState;
  model?: string;
  /** 1 to 500; 50 by default. */
  limit?: number;
  offset?: number;
  /** A page's `next_cursor`. */
  cursor?: number;
}

/** The queen's HTTP API. Every method throws [`ApiError`] for an error answer and [`ConnectionError`] when the
 * queen cannot be reached; an aborted request rejects with the `AbortError` of its signal. */
export class QueenClient {
  readonly baseUrl: string;
  private readonly token: () => string | null | undefined;
  private readonly fetchImpl: typeof fetch;

  constructor(options: ClientOptions = {}) {
    this.baseUrl = (options.baseUrl ?? "").replace(/\/+$/, "");
    const token = options.token;
    this.token = typeof token === "function" ? token : () => token;
    this.fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
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

  /** Sends a request; an answer outside 2xx is thrown as an [`ApiError`]. */
  async send(method: string, path: string, init: RequestInit & { headers?: Record<string, string> } = {}): Promise<Response> {
    let response: Response;
    try {
      response = await this.fetchImpl(this.url(path), { ...init, method, headers: this.headers(init.headers) });
    } catch (e) {
      if (isAbort(e)) throw e;
      throw new ConnectionError(`cannot reach the queen at ${this.baseUrl || "this origin"}: ${String((e as Error)?.message ?? e)}`, { cause: e });
    }
    if (!response.ok) throw await ApiError.from(response);
    return response;
  }

  private async json<T>(method: string, path: string, init: RequestInit & { headers?: Record<string, string> } = {}): Promise<T> {
    const response = await this.send(method, path, init);
    try {
      return (await response.json()) as T;
    } catch (e) {
      if (isAbort(e)) throw e;
      throw new ConnectionError(`unreadable answer from the queen to ${method} ${path}`, { cause: e });
    }
  }

  /** `POST /v1/jobs`: queues a job. The same `idempotencyKey` maps a retried request to the same job. */
  submit(job: JobSubmission, options: RequestOptions & { idempotencyKey?: string } = {}): Promise<SubmitResponse> {
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (options.idempotencyKey) headers["idempotency-key"] = options.idempotencyKey;
    return this.json("POST", "/v1/jobs", { body: JSON.stringify(job), headers, signal: options.signal });
  }

  /** `GET /v1/jobs/{id}`: the job's status, queue position, ETA and image URLs. */
  job(id: string, options: RequestOptions = {}): Promise<StatusView> {
    return this.json("GET", `/v1/jobs/${encodeURIComponent(id)}`, { signal: options.signal });
  }

  /** `GET /v1/jobs`: one page of jobs, newest first. */
  jobs(filter: JobFilter = {}, options: RequestOptions = {}): Promise<JobList> {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(filter)) {
      if (value !== undefined && value !== null && value !== "") query.set(key, String(value));
    }
    const q = query.toString();
    return this.json("GET", `/v1/jobs${q ? `?${q}` : ""}`, { signal: options.signal });
  }

  /** `DELETE /v1/jobs/{id}`: `cancelled` when it never started, `cancelling` when a worker stops it. */
  cancel(id: string, options: RequestOptions = {}): Promise<CancelResponse> {
    return this.json("DELETE", `/v1/jobs/${encodeURIComponent(id)}`, { signal: options.signal });
  }

  /** `GET /v1/jobs/{id}/images/{n}`: image `n` of a completed job, through the queen. */
  async image(id: string, n: number, options: RequestOptions = {}): Promise<Blob> {
    const response = await this.send("GET", `/v1/jobs/${encodeURIComponent(id)}/images/${n}`, { signal: options.signal });
    return response.blob();
  }

  /** `POST /v1/uploads`: an image (PNG, JPEG or WebP) to name as `init_image` or `mask` by its key. */
  upload(image: Blob | ArrayBuffer | Uint8Array, options: RequestOptions = {}): Promise<UploadResponse> {
    const type = image instanceof Blob && image.type ? image.type : "application/octet-stream";
    return this.json("POST", "/v1/uploads", { body: image as BodyInit, headers: { "content-type": type }, signal: options.signal });
  }

  /** `GET /v1/models`: the models jobs may name, with their workers, LoRAs and defaults. */
  models(options: RequestOptions = {}): Promise<ModelInfo[]> {
    return this.json("GET", "/v1/models", { signal: options.signal });
  }

  /** `GET /v1/workers`: every worker the queen has heard of. */
  workers(options: RequestOptions = {}): Promise<WorkerInfo[]> {
    return this.json("GET", "/v1/workers", { signal: options.signal });
  }

  /** `GET /v1/limits`: what a job may ask for here, and the values of its choice fields. */
  limits(options: RequestOptions = {}): Promise<LimitsView> {
    return this.json("GET", "/v1/limits", { signal: options.signal });
  }

  /** `GET /health`: whether the queen's process is up. */
  async health(options: RequestOptions = {}): Promise<boolean> {
    return this.send("GET", "/health", { signal: options.signal }).then(() => true, (e) => {
      if (isAbort(e)) throw e;
      return false;
    });
  }

  /** `GET /ready`: whether the queen can reach NATS and its streams. */
  async ready(options: RequestOptions = {}): Promise<boolean> {
    return this.send("GET", "/ready", { signal: options.signal }).then(() => true, (e) => {
      if (isAbort(e)) throw e;
      return false;
    });
  }

  /** `GET /metrics`: the Prometheus text. */
  async metrics(options: RequestOptions = {}): Promise<string> {
    return (await this.send("GET", "/metrics", { signal: options.signal })).text();
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
