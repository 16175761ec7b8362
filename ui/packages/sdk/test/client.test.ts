import { describe, expect, it } from "vitest";

import { ApiError, ConnectionError, QueenClient } from "../src/index.js";
import { fakeFetch, json } from "./fake.js";

const JOB = "0b7e2c3a-1f7e-4a57-9a2b-2f1d3c4b5a69";

describe("QueenClient", () => {
  it("submits a job as JSON with the bearer token and the idempotency key", async () => {
    const { fetch, seen } = fakeFetch(() => json(202, { job_id: JOB, status_url: `/v1/jobs/${JOB}`, events_url: `/v1/jobs/${JOB}/events`, created: true }));
    const client = new QueenClient({ baseUrl: "http://queen:8080/", token: "t0k", fetch });
    const answer = await client.submit({ model: "tiny", prompt: "a red bike", steps: 3, num_images: 1 }, { idempotencyKey: "k-1" });
    expect(answer.job_id).toBe(JOB);
    expect(seen).toHaveLength(1);
    const req = seen[0]!;
    expect(req.method).toBe("POST");
    expect(req.url).toBe("http://queen:8080/v1/jobs");
    expect(req.headers.authorization).toBe("Bearer t0k");
    expect(req.headers["idempotency-key"]).toBe("k-1");
    expect(req.headers["content-type"]).toBe("application/json");
    expect(JSON.parse(req.body!)).toEqual({ model: "tiny", prompt: "a red bike", steps: 3, num_images: 1 });
  });

  it("reads the token anew for every request, and sends none when there is none", async () => {
    const { fetch, seen } = fakeFetch(() => json(200, []));
    let token: string | null = null;
    const client = new QueenClient({ token: () => token, fetch });
    await client.models();
    token = "second";
    await client.workers();
    expect(seen[0]!.headers.authorization).toBeUndefined();
    expect(seen[0]!.url).toBe("/v1/models");
    expect(seen[1]!.headers.authorization).toBe("Bearer second");
  });

  it("builds job list queries from the filter, leaving out what is not set", async () => {
    const { fetch, seen } = fakeFetch(() => json(200, { jobs: [], total: 0, total_exact: true }));
    const client = new QueenClient({ fetch });
    await client.jobs({ state: "completed", model: "a b", limit: 24, offset: undefined, cursor: 7 });
    await client.jobs();
    expect(seen[0]!.url).toBe("/v1/jobs?state=completed&model=a+b&limit=24&cursor=7");
    expect(seen[1]!.url).toBe("/v1/jobs");
  });

  it("throws the API's error as an ApiError with its status, code, field and request id", async () => {
    const { fetch } = fakeFetch(() =>
      json(422, { error: { code: "INVALID_REQUEST", message: "width must be a positive multiple of 8, got 63", field: "width" } }, { "x-request-id": "r-9" }),
    );
    const client = new QueenClient({ fetch });
    const error = await client.submit({ model: "tiny", prompt: "x", width: 63, num_images: 1 }).catch((e) => e);
    expect(error).toBeInstanceOf(ApiError);
    expect(error).toMatchObject({ status: 422, code: "INVALID_REQUEST", field: "width", requestId: "r-9", retryable: false });
    expect(error.message).toContain("multiple of 8");
  });

  it("reads an answer without the API's body (a proxy's) as code OTHER", async () => {
    const { fetch } = fakeFetch(() => new Response("<html>Bad gateway</html>", { status: 502 }));
    const error = await new QueenClient({ fetch }).job(JOB).catch((e) => e);
    expect(error).toBeInstanceOf(ApiError);
    expect(error).toMatchObject({ status: 502, code: "OTHER", retryable: true });
    expect(error.message).toContain("Bad gateway");
  });

  it("says a queen that cannot be reached is a ConnectionError", async () => {
    const fetch = (async () => {
      throw new TypeError("fetch failed");
    }) as unknown as typeof globalThis.fetch;
    const error = await new QueenClient({ baseUrl: "http://127.0.0.1:9", fetch }).models().catch((e) => e);
    expect(error).toBeInstanceOf(ConnectionError);
    expect(error.message).toContain("http://127.0.0.1:9");
  });

  it("passes an abort through as the AbortError", async () => {
    const { fetch } = fakeFetch(() => json(200, []));
    const controller = new AbortController();
    controller.abort();
    const error = await new QueenClient({ fetch }).models({ signal: controller.signal }).catch((e) => e);
    expect(error.name).toBe("AbortError");
  });

  it("rejects with the signal's own reason (AbortSignal.timeout(), abort(reason)), not as a ConnectionError", async () => {
    // As a real fetch does: an abort rejects with `signal.reason`.
    const fetch = ((_input: RequestInfo | URL, init: RequestInit = {}) =>
      new Promise((_resolve, reject) => {
        const signal = init.signal!;
        if (signal.aborted) return reject(signal.reason);
        signal.addEventListener("abort", () => reject(signal.reason), { once: true });
      })) as typeof globalThis.fetch;
    const client = new QueenClient({ fetch, timeoutMs: 0 });
    const timedOut = await client.models({ signal: AbortSignal.timeout(10) }).catch((e) => e);
    expect(timedOut).not.toBeInstanceOf(ConnectionError);
    expect(timedOut.name).toBe("TimeoutError");
    const controller = new AbortController();
    const pending = client.job(JOB, { signal: controller.signal }).catch((e) => e);
    controller.abort(new Error("page closed"));
    expect(await pending).toMatchObject({ message: "page closed" });
    expect(await client.send("GET", "/health", { signal: AbortSignal.abort("gone") }).catch((e) => e)).toBe("gone");
  });

  it("fails a request the queen does not answer in time with a ConnectionError, the client's limit or the request's", async () => {
    const fetch = ((_input: RequestInfo | URL, init: RequestInit = {}) =>
      new Promise((_resolve, reject) => init.signal!.addEventListener("abort", () => reject(init.signal!.reason), { once: true }))) as typeof globalThis.fetch;
    const client = new QueenClient({ fetch, timeoutMs: 20 });
    const error = await client.submit({ model: "tiny", prompt: "x", num_images: 1 }).catch((e) => e);
    expect(error).toBeInstanceOf(ConnectionError);
    expect(error.message).toContain("did not answer POST /v1/jobs");
    const t0 = Date.now();
    expect(await client.models({ timeoutMs: 60 }).catch((e) => e)).toBeInstanceOf(ConnectionError);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(50);
  });

  it("limits the whole answer, body included", async () => {
    // Headers at once, then a body that never ends.
    const { fetch } = fakeFetch((_req, signal) => {
      const body = new ReadableStream<Uint8Array>({
        start(c) {
          c.enqueue(new TextEncoder().encode("["));
          signal?.addEventListener("abort", () => c.error(signal.reason));
        },
      });
      return new Response(body, { status: 200, headers: { "content-type": "application/json" } });
    });
    const error = await new QueenClient({ fetch, timeoutMs: 20 }).workers().catch((e) => e);
    expect(error).toBeInstanceOf(ConnectionError);
    expect(error.message).toContain("within");
  });

  it("tells onUnauthorized of a refused token before throwing it", async () => {
    const { fetch } = fakeFetch(() => json(401, { error: { code: "UNAUTHORIZED", message: "bad token" } }));
    const refused: string[] = [];
    const client = new QueenClient({ token: "old", fetch, onUnauthorized: (e) => refused.push(e.code) });
    const error = await client.models().catch((e) => e);
    expect(error).toMatchObject({ status: 401, code: "UNAUTHORIZED" });
    expect(refused).toEqual(["UNAUTHORIZED"]);
  });

  it("reads at most 64 KiB of an error body", async () => {
    let pulled = 0;
    const chunk = new TextEncoder().encode("x".repeat(16 * 1024));
    // 4 MiB of a proxy's page, pulled chunk by chunk.
    const page = new ReadableStream<Uint8Array>(
      {
        pull(c) {
          pulled += 1;
          if (pulled > 256) c.close();
          else c.enqueue(chunk);
        },
      },
      { highWaterMark: 0 },
    );
    const error = await ApiError.from(new Response(page, { status: 502, statusText: "Bad Gateway" }));
    expect(error).toMatchObject({ status: 502, code: "OTHER" });
    expect(error.message.length).toBeLessThanOrEqual(200);
    expect(pulled).toBeLessThanOrEqual(5);
  });

  it("is not retryable when the answer says x-should-retry: false", async () => {
    const { fetch } = fakeFetch(() => json(503, { error: { code: "UNAVAILABLE", message: "the bus did not confirm job x" } }, { "x-should-retry": "false" }));
    const error = await new QueenClient({ fetch }).submit({ model: "tiny", prompt: "x", num_images: 1 }).catch((e) => e);
    expect(error).toMatchObject({ code: "UNAVAILABLE", retryable: false });
  });

  it("says a submission over the token's rate may be sent again after Retry-After", async () => {
    const { fetch } = fakeFetch(() => json(429, { error: { code: "RATE_LIMITED", message: "this token's submit_rate is 30/min jobs: the next one in 2 s" } }, { "retry-after": "2" }));
    const error = await new QueenClient({ fetch }).submit({ model: "tiny", prompt: "x", num_images: 1 }).catch((e) => e);
    expect(error).toMatchObject({ status: 429, code: "RATE_LIMITED", retryable: true, retryAfterMs: 2000 });
  });

  it("uploads an image with its type, and fetches images as blobs", async () => {
    const { fetch, seen } = fakeFetch((req) =>
      req.method === "POST" ? json(201, { object_key: "uploads/a.png", bytes: 4, width: 8, height: 8 }) : new Response(new Uint8Array([1, 2, 3]), { headers: { "content-type": "image/png" } }),
    );
    const client = new QueenClient({ token: "t", fetch });
    const up = await client.upload(new Blob([new Uint8Array([137, 80, 78, 71])], { type: "image/png" }));
    expect(up.object_key).toBe("uploads/a.png");
    expect(seen[0]!.headers["content-type"]).toBe("image/png");
    const blob = await client.image(JOB, 0);
    expect(seen[1]!.url).toBe(`/v1/jobs/${JOB}/images/0`);
    expect(blob.type).toBe("image/png");
    expect(new Uint8Array(await blob.arrayBuffer())).toEqual(new Uint8Array([1, 2, 3]));
  });
});
