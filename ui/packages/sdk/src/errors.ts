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
  ) {
    super(message);
  }

  /** Whether retrying the same request later may succeed (the queen or what it needs was unavailable, or the
   * token's event streams were all in use). Not `WAIT_TIMEOUT`: its job goes on, and a retry would submit it
   * again. */
  get retryable(): boolean {
    if (this.code === "WAIT_TIMEOUT") return false;
    if (this.code === "TOO_MANY_STREAMS") return true;
    return this.code === "UNAVAILABLE" || this.status === 502 || this.status === 503 || this.status === 504;
  }

  /** Reads an error answer: the API's `{error: {code, message, field}}`, else what a proxy in front said. */
  static async from(response: Response): Promise<ApiError> {
    const requestId = response.headers.get("x-request-id") ?? undefined;
    const retryAfterMs = parseRetryAfter(response.headers.get("retry-after"));
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text) as { error?: { code?: string; message?: string; field?: string } };
      if (body.error && typeof body.error.code === "string" && typeof body.error.message === "string") {
        return new ApiError(response.status, body.error.code as ApiErrorCode, body.error.message, body.error.field ?? undefined, requestId, retryAfterMs);
      }
    } catch {
      // not the API's body: fall through
    }
    const message = text.trim().slice(0, 200) || `HTTP ${response.status} ${response.statusText}`;
    return new ApiError(response.status, "OTHER", message, undefined, requestId, retryAfterMs);
  }
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
