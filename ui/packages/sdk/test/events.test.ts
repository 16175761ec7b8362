import { describe, expect, it } from "vitest";

import { ApiError, QueenClient, type JobEvent } from "../src/index.js";
import { parseRetryAfter } from "../src/errors.js";
import { fakeFetch, json, sse } from "./fake.js";

const JOB = "0b7e2c3a-1f7e-4a57-9a2b-2f1d3c4b5a69";
const queued = { id: "0", event: "queued", data: { job_id: JOB, at: 1, model: "tiny" } };
const started = { id: "4", event: "started", data: { job_id: JOB, at: 2, worker_id: "w1" } };
const progress = (step: number, id: string) => ({ id, event: "progress", data: { job_id: JOB, at: 3, step, total: 3, percent: (step / 3) * 100 } });
const completed = {
  id: "9",
  event: "completed",
  data: { job_id: JOB, at: 5, images: [{ index: 0, key: "k", width: 64, height: 64, seed: 7, bytes: 10, content_type: "image/png" }], timings: { queue_ms: 1, load_ms: 0, generation_ms: 2, upload_ms: 1, total_ms: 4 } },
};

async function collect(it: AsyncIterable<JobEvent>): Promise<JobEvent[]> {
  const out: JobEvent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

describe("events", () => {
  it("yields typed events until the terminal one, skipping events it does not know", async () => {
    const { fetch, seen } = fakeFetch(() => sse([queued, started, { id: "5", event: "party", data: {} }, progress(1, "6"), completed, progress(3, "10")]));
    const events = await collect(new QueenClient({ token: "t", fetch }).events(JOB));
    expect(events.map((e) => e.event)).toEqual(["queued", "started", "progress", "completed"]);
    const last = events[3]!;
    if (last.event !== "completed") throw new Error("typed by name");
    expect(last.data.images[0]!.seed).toBe(7);
    expect(last.id).toBe("9");
    expect(seen[0]!.headers.accept).toBe("text/event-stream");
    expect(seen[0]!.headers.authorization).toBe("Bearer t");
  });

  it("resumes a dropped stream with Last-Event-ID, losing and repeating nothing", async () => {
    let call = 0;
    const { fetch, seen } = fakeFetch(() => {
      call += 1;
      if (call === 1) return sse([queued, started, progress(1, "6")]);
      if (call === 2) throw new TypeError("connection refused");
      if (call === 3) return json(503, { error: { code: "UNAVAILABLE", message: "NATS is down" } });
      return sse([progress(2, "7"), completed]);
    });
    const reconnects: number[] = [];
    const events = await collect(new QueenClient({ fetch }).events(JOB, { retryDelayMs: 1, onReconnect: (n) => reconnects.push(n) }));
    expect(events.map((e) => e.id)).toEqual(["0", "4", "6", "7", "9"]);
    expect(seen.map((s) => s.headers["last-event-id"])).toEqual([undefined, "6", "6", "6"]);
    expect(reconnects).toEqual([1, 2, 3]);
  });

  it("starts after a given event id", async () => {
    const { fetch, seen } = fakeFetch(() => sse([completed]));
    await collect(new QueenClient({ fetch }).events(JOB, { lastEventId: "6" }));
    expect(seen[0]!.headers["last-event-id"]).toBe("6");
  });

  it("throws an error answer about the request at once, without retrying", async () => {
    const { fetch, seen } = fakeFetch(() => json(404, { error: { code: "NOT_FOUND", message: "no job " + JOB } }));
    const error = await collect(new QueenClient({ fetch }).events(JOB, { retryDelayMs: 1 })).catch((e) => e);
    expect(error).toBeInstanceOf(ApiError);
    expect(error.code).toBe("NOT_FOUND");
    expect(seen).toHaveLength(1);
  });

  it("waits as long as a 429's Retry-After asks before it follows again", async () => {
    let call = 0;
    const { fetch, seen } = fakeFetch(() => {
      call += 1;
      if (call === 1) return json(429, { error: { code: "TOO_MANY_STREAMS", message: "close one" } }, { "retry-after": "1" });
      return sse([queued, completed]);
    });
    const t0 = Date.now();
    const events = await collect(new QueenClient({ fetch }).events(JOB, { retryDelayMs: 1 }));
    expect(events.map((e) => e.event)).toEqual(["queued", "completed"]);
    expect(seen).toHaveLength(2);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(950);
  });

  it("reads Retry-After as seconds or as a date", () => {
    const now = Date.parse("Wed, 02 Dec 2026 10:00:00 GMT");
    expect(parseRetryAfter("5", now)).toBe(5000);
    expect(parseRetryAfter("Wed, 02 Dec 2026 10:00:30 GMT", now)).toBe(30_000);
    expect(parseRetryAfter("Wed, 02 Dec 2026 09:00:00 GMT", now)).toBe(0);
    expect(parseRetryAfter("soon", now)).toBeUndefined();
    expect(parseRetryAfter(null, now)).toBeUndefined();
  });

  it("gives up after maxRetries reconnections without a new event", async () => {
    const { fetch, seen } = fakeFetch(() => sse([]));
    const error = await collect(new QueenClient({ fetch }).events(JOB, { retryDelayMs: 1, maxRetries: 2 })).catch((e) => e);
    expect(error.name).toBe("ConnectionError");
    expect(seen).toHaveLength(3);
  });

  it("waits at least 250 ms however small a retry: the stream sends", async () => {
    let call = 0;
    const { fetch } = fakeFetch(() => {
      call += 1;
      if (call === 1) return new Response(`retry: 0\nid: 0\nevent: queued\ndata: ${JSON.stringify(queued.data)}\n\n`, { headers: { "content-type": "text/event-stream" } });
      return sse([completed]);
    });
    const t0 = Date.now();
    const events = await collect(new QueenClient({ fetch }).events(JOB, { retryDelayMs: 1 }));
    expect(events.map((e) => e.event)).toEqual(["queued", "completed"]);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(240);
  });

  it("drops a connection that stays silent and resumes after the last event", async () => {
    let call = 0;
    const { fetch, seen } = fakeFetch((_req, signal) => {
      call += 1;
      // The first stream stops sending anything (not even keep-alives) but stays open.
      if (call === 1) return sse([queued, started], true, signal);
      return sse([progress(1, "6"), completed]);
    });
    const reconnects: unknown[] = [];
    const events = await collect(new QueenClient({ fetch }).events(JOB, { retryDelayMs: 1, idleTimeoutMs: 50, onReconnect: (_n, e) => reconnects.push(e) }));
    expect(events.map((e) => e.id)).toEqual(["0", "4", "6", "9"]);
    expect(seen.map((s) => s.headers["last-event-id"])).toEqual([undefined, "4"]);
    expect(String(reconnects[0])).toContain("silent");
  });

  it("gives up at once on a frame too large to buffer", async () => {
    const { fetch, seen } = fakeFetch(() => new Response(`event: preview\ndata: ${"A".repeat(5 * 1024 * 1024)}`, { headers: { "content-type": "text/event-stream" } }));
    const error = await collect(new QueenClient({ fetch }).events(JOB, { retryDelayMs: 1 })).catch((e) => e);
    expect(error.name).toBe("ConnectionError");
    expect(seen).toHaveLength(1);
  });

  it("stops when its signal aborts, also while the stream is open", async () => {
    const controller = new AbortController();
    const { fetch } = fakeFetch((_req, signal) => sse([queued], true, signal));
    const seen: string[] = [];
    const error = await (async () => {
      for await (const e of new QueenClient({ fetch }).events(JOB, { signal: controller.signal })) {
        seen.push(e.event);
        setTimeout(() => controller.abort(), 5);
      }
    })().catch((e) => e);
    expect(seen).toEqual(["queued"]);
    expect(error.name).toBe("AbortError");
  });
});
