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
