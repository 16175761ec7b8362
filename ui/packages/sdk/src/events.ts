// A job's Server-Sent Events over fetch (so the bearer token can go in a header, which EventSource cannot
// send), parsed by eventsource-parser, resumed with Last-Event-ID after a dropped connection.
import { EventSourceParserStream, ParseError, type EventSourceMessage } from "eventsource-parser/stream";

import type { QueenClient } from "./client.js";
import { ApiError, ConnectionError, isAbort } from "./errors.js";
import type { JobEvent, JobEventName } from "./types.js";
import { TERMINAL_EVENTS } from "./types.js";
import { watchdog } from "./watchdog.js";

export interface FollowOptions {
  signal?: AbortSignal;
  /** Resume after this event id (a previous stream's last `id`). */
  lastEventId?: string;
  /** Reconnections in a row without a new event before giving up; 8 by default. */
  maxRetries?: number;
  /** Delay before the first reconnection, doubled each time up to 10 s; 500 ms by default. */
  retryDelayMs?: number;
  /** Called before each reconnection, with the attempt number and what broke. */
  onReconnect?: (attempt: number, error: unknown) => void;
  /** A connection that brings no byte for this long is dropped and resumed (the queen sends a comment every
   * 15 s, so silence means a dead connection a proxy or the network kept open); 45 s by default, 0 never. */
  idleTimeoutMs?: number;
}

/** The most one frame may buffer: previews are small JPEGs, and bus messages are at most 1 MiB. */
const MAX_FRAME = 4 * 1024 * 1024;
/** What a stream's `retry:` may ask for: not a busy loop, nor longer than `Retry-After` is followed. */
const MIN_RETRY_MS = 250;
const MAX_RETRY_MS = 60_000;

const KNOWN: readonly string[] = ["queued", "started", "progress", "preview", "completed", "failed", "cancelled"];

/** Reads one SSE frame as a typed event; `undefined` for an event this SDK does not know (a newer queen). */
export function parseFrame(frame: Pick<EventSourceMessage, "event" | "data" | "id">): JobEvent | undefined {
  const name = frame.event ?? "message";
  if (!KNOWN.includes(name)) return undefined;
  return { event: name as JobEventName, data: JSON.parse(frame.data), id: frame.id ?? "" } as JobEvent;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason ?? new DOMException("aborted", "AbortError"));
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason ?? new DOMException("aborted", "AbortError"));
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** The job's events until its terminal one (`completed`, `failed` or `cancelled`). Error answers the queen
 * gives for the request itself (401, 404, 400) are thrown at once; a refused or dropped connection, a 5xx
 * and `429 TOO_MANY_STREAMS` are retried from the last event seen, after the answer's `Retry-After` (at most
 * a minute) when it has one, else the stream's own `retry:`, else the backoff. */
export async function* followJob(client: QueenClient, id: string, options: FollowOptions = {}): AsyncGenerator<JobEvent, void, undefined> {
  const maxRetries = options.maxRetries ?? 8;
  const idleMs = options.idleTimeoutMs ?? 45_000;
  let delay = options.retryDelayMs ?? 500;
  let lastEventId = options.lastEventId;
  let failures = 0;
  // The stream's `retry:` holds until another replaces it, as in EventSource.
  let serverRetry: number | undefined;
  for (;;) {
    // This connection's signal: the caller's, or the idle watchdog's when no byte came for `idleMs`.
    const idle = watchdog(options.signal, idleMs);
    try {
      const headers: Record<string, string> = { accept: "text/event-stream" };
      if (lastEventId) headers["last-event-id"] = lastEventId;
      const response = await client.send("GET", `/v1/jobs/${encodeURIComponent(id)}/events`, { headers, signal: idle.signal });
      idle.touch();
      if (!response.body) throw new ConnectionError("the queen's event stream has no body");
      const frames = response.body
        .pipeThrough(new TransformStream<Uint8Array<ArrayBuffer>, Uint8Array<ArrayBuffer>>({ transform: (chunk, out) => (idle.touch(), out.enqueue(chunk)) }))
        .pipeThrough(new TextDecoderStream())
        .pipeThrough(
          new EventSourceParserStream({
            onRetry: (ms) => (serverRetry = Math.min(Math.max(ms, MIN_RETRY_MS), MAX_RETRY_MS)),
            maxBufferSize: MAX_FRAME,
          }),
        );
      const reader = frames.getReader();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          const event = parseFrame(value);
          if (value.id) lastEventId = value.id;
          if (!event) continue;
          failures = 0;
          delay = options.retryDelayMs ?? 500;
          yield event;
          if (TERMINAL_EVENTS.includes(event.event)) return;
        }
      } finally {
        reader.cancel().catch(() => {});
      }
      throw new ConnectionError("the queen's event stream ended before the job did");
    } catch (caught) {
      idle.clear();
      const e = idle.fired() && !options.signal?.aborted ? new ConnectionError(`the queen's event stream was silent for ${idleMs / 1000} s`, { cause: caught }) : caught;
      if (isAbort(e) || options.signal?.aborted) throw e;
      if (e instanceof ApiError && !e.retryable) throw e;
      if (e instanceof SyntaxError) throw new ConnectionError(`unreadable event from the queen: ${e.message}`, { cause: e });
      // The same frame would come again after a reconnection.
      if (e instanceof ParseError) throw new ConnectionError(`unreadable event stream from the queen: ${e.message}`, { cause: e });
      failures += 1;
      if (failures > maxRetries) throw e;
      options.onReconnect?.(failures, e);
      // What the queen asks for, up to a minute (a proxy's date could be hours away: the caller can retry).
      const asked = e instanceof ApiError && e.retryAfterMs !== undefined ? Math.min(e.retryAfterMs, 60_000) : undefined;
      await sleep(asked ?? serverRetry ?? delay, options.signal);
      delay = Math.min(delay * 2, 10_000);
    } finally {
      idle.clear();
    }
  }
}
