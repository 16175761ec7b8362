// Errors as the SDK throws them: the API's own error body as a typed object, or a connection that failed.
import type { ApiErrorCode } from "./types.js";

/** The queen answered with an error: its HTTP status, the API's `code`, and the `field` at fault if any. */
export class ApiError extends Error {
  override readonly name = "ApiError";
  constructor(
    readonly status: number,
    readonly code: ApiErrorCode,
    message: string,
    readonly field?: string,
    /** The `x-request-id` of the answer, for the queen's logs. */
    readonly requestId?: string,
    /** How long the answer's `Retry-After` asks the client to wait before trying again, in milliseconds
     * (`429 TOO_MANY_STREAMS` sends 5 s; a proxy's 503 may send a date). */
    readonly retryAfterMs?: number,
    /** The answer's `x-should-retry: false`: the queen says a retry would do the work again. */
    readonly shouldNotRetry: boolean = false,
  ) {
    super(message);
  }

  /** Whether sending the same request again later may succeed (the queen or what it needs was unavailable, a
   * proxy in front failed, the token's event streams were all in use, or it was over its `submit_rate`: wait
   * `retryAfterMs`). Not `WAIT_TIMEOUT`, nor an answer
   * sent with `x-should-retry: false`: its job goes on, and a retry would submit it again.
   *
   * It says nothing of whether a retry is safe: a 502, 503 or 504 to a `POST /v1/jobs` may come after the
   * queen queued the job, so retry a submission only with the same `idempotencyKey` (which maps it to the
   * first job); reads (`GET`) and `DELETE` may be retried as they are. */
  get retryable(): boolean {
    if (this.code === "WAIT_TIMEOUT" || this.shouldNotRetry) return false;
    if (this.code === "TOO_MANY_STREAMS" || this.code === "RATE_LIMITED") return true;
    return this.code === "UNAVAILABLE" || this.status === 502 || this.status === 503 || this.status === 504;
  }

  /** Reads an error answer: the API's `{error: {code, message, field}}`, else what a proxy in front said. */
  static async from(response: Response): Promise<ApiError> {
    const requestId = response.headers.get("x-request-id") ?? undefined;
    const retryAfterMs = parseRetryAfter(response.headers.get("retry-after"));
    const shouldNotRetry = response.headers.get("x-should-retry")?.trim().toLowerCase() === "false";
    const text = await readCapped(response, MAX_ERROR_BODY).catch(() => "");
    try {
      const body = JSON.parse(text) as { error?: { code?: string; message?: string; field?: string } };
      if (body.error && typeof body.error.code === "string" && typeof body.error.message === "string") {
        return new ApiError(response.status, body.error.code as ApiErrorCode, body.error.message, body.error.field ?? undefined, requestId, retryAfterMs, shouldNotRetry);
      }
    } catch {
      // not the API's body: fall through
    }
    const message = text.trim().slice(0, 200) || `HTTP ${response.status} ${response.statusText}`;
    return new ApiError(response.status, "OTHER", message, undefined, requestId, retryAfterMs, shouldNotRetry);
  }
}

/** An error body is read this far at most: the API's are small, and a proxy's page or an endless body must not
 * fill the memory (nor hang the error). */
const MAX_ERROR_BODY = 64 * 1024;

/** The first `max` bytes of `response`'s body as text; the rest is not read. */
async function readCapped(response: Response, max: number): Promise<string> {
  if (!response.body) return "";
  const reader = response.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    while (size < max) {
      const { value, done } = await reader.read();
      if (done) break;
      chunks.push(value.subarray(0, max - size));
      size += Math.min(value.length, max - size);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) {
    bytes.set(c, at);
    at += c.length;
  }
  return new TextDecoder().decode(bytes);
}

/** A `Retry-After` header as milliseconds from now: delay-seconds or an HTTP date (RFC 9110 §10.2.3);
 * `undefined` when absent or unreadable. */
export function parseRetryAfter(value: string | null, now: number = Date.now()): number | undefined {
  const text = value?.trim();
  if (!text) return undefined;
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const at = Date.parse(text);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}

/** The queen could not be reached (network down, refused, CORS) or the connection broke mid-answer. */
export class ConnectionError extends Error {
  override readonly name = "ConnectionError";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** Whether `e` is the error an aborted request rejects with. */
export function isAbort(e: unknown): boolean {
  return e instanceof Error && e.name === "AbortError";
}
