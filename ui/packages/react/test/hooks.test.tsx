// @vitest-environment jsdom
import { act, renderHook, waitFor } from "@testing-library/react";
import { createElement, type ReactNode } from "react";
import { describe, expect, it } from "vitest";

import { QueenClient } from "@sd-rbee/sdk";
import { applyEvent, applyStatus, IDLE, QueenProvider, useGenerate, useJob, useJobs, useModels, useWorkers } from "../src/index.js";
import { fakeFetch, json, sse } from "../../sdk/test/fake.js";

const JOB = "0b7e2c3a-1f7e-4a57-9a2b-2f1d3c4b5a69";
const image = { index: 0, key: "k", width: 64, height: 64, seed: 7, bytes: 10, content_type: "image/png" };
const timings = { queue_ms: 1, load_ms: 0, generation_ms: 2, upload_ms: 1, total_ms: 4 };
const status = (state: string, extra: object = {}) => ({ job_id: JOB, model: "tiny", state, created_at: 1, updated_at: 1, deliveries: 0, waiting_for_worker: false, waiting_for_redelivery: false, ...extra });

function wrapper(client: QueenClient) {
  return ({ children }: { children?: ReactNode }) => createElement(QueenProvider, { client }, children);
}

describe("applyEvent", () => {
  it("moves a job from queued through progress and previews to its images", () => {
    let job = applyEvent({ ...IDLE, state: "submitting" }, { id: "0", event: "queued", data: { job_id: JOB, at: 1, model: "tiny" } });
    expect(job).toMatchObject({ state: "queued", jobId: JOB, lastEventId: "0" });
    job = applyEvent(job, { id: "3", event: "progress", data: { job_id: JOB, at: 2, step: 1, total: 4, percent: 25, eta_ms: 900 } });
    job = applyEvent(job, { id: "3.1", event: "preview", data: { job_id: JOB, step: 1, image: "data:image/jpeg;base64,AA" } });
    expect(job).toMatchObject({ state: "running", step: 1, total: 4, percent: 25, etaMs: 900, preview: "data:image/jpeg;base64,AA", lastEventId: "3.1" });
    job = applyEvent(job, { id: "8", event: "failed", data: { job_id: JOB, at: 3, code: "INVALID_REQUEST", message: "too wide", field: "width" } });
    expect(job).toMatchObject({ state: "failed", failure: { code: "INVALID_REQUEST", field: "width" } });
  });
});

describe("applyStatus", () => {
  it("moves a queued job to running when its status says so, and never an ended one back", () => {
    const running = status("running", { worker_id: "w1", eta_ms: 800 }) as Parameters<typeof applyStatus>[1];
    expect(applyStatus({ ...IDLE, state: "queued", jobId: JOB, queuePosition: 3 }, running)).toMatchObject({ state: "running", workerId: "w1", queuePosition: undefined, etaMs: 800 });
    expect(applyStatus({ ...IDLE, state: "completed", jobId: JOB }, running).state).toBe("completed");
  });
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** An answer that comes after `ms`, or an AbortError when `signal` aborts first (as fetch does). */
function later(ms: number, answer: () => Response, signal?: AbortSignal | null): Promise<Response> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => resolve(answer()), ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    });
  });
}

describe("hooks", () => {
  it("useModels loads the models and reports a refused token as an error", async () => {
    let allowed = true;
    const { fetch } = fakeFetch(() => (allowed ? json(200, [{ name: "tiny", workers: 1, resident_workers: 1, loras: [] }]) : json(401, { error: { code: "UNAUTHORIZED", message: "bad token" } })));
    const client = new QueenClient({ fetch });
    const { result } = renderHook(() => useModels(), { wrapper: wrapper(client) });
    await waitFor(() => expect(result.current.data?.[0]?.name).toBe("tiny"));
    allowed = false;
    act(() => result.current.reload());
    await waitFor(() => expect(result.current.error).toBeDefined());
    expect((result.current.error as { code?: string }).code).toBe("UNAUTHORIZED");
  });

  it("useGenerate submits, shows the queue position, follows progress to the images, and cancels", async () => {
    let polled = 0;
    const { fetch, seen } = fakeFetch((req, signal) => {
      if (req.method === "POST") return json(202, { job_id: JOB, status_url: "", events_url: "", created: true });
      if (req.method === "DELETE") return json(202, { job_id: JOB, state: "cancelling" });
      if (req.url.endsWith("/events")) {
        return sse(
          [
            { id: "0", event: "queued", data: { job_id: JOB, at: 1, model: "tiny" } },
            { id: "2", event: "started", data: { job_id: JOB, at: 2, worker_id: "w1" } },
            { id: "3", event: "progress", data: { job_id: JOB, at: 3, step: 2, total: 4, percent: 50 } },
          ],
          true,
          signal,
        );
      }
      polled += 1;
      return json(200, status("queued", { queue_position: 3, eta_ms: 5000 }));
    });
    const client = new QueenClient({ fetch });
    const { result } = renderHook(() => useGenerate({ pollMs: 10 }), { wrapper: wrapper(client) });
    act(() => void result.current.submit({ model: "tiny", prompt: "a boat", num_images: 1 }));
    await waitFor(() => expect(result.current.state).toBe("running"));
    await waitFor(() => expect(result.current.percent).toBe(50));
    expect(result.current.jobId).toBe(JOB);
    expect(polled).toBeGreaterThan(0);
    await act(() => result.current.cancel());
    expect(seen.some((s) => s.method === "DELETE" && s.url === `/v1/jobs/${JOB}`)).toBe(true);
    act(() => result.current.reset());
    expect(result.current.state).toBe("idle");
  });

  it("useGenerate ends with the completed job's images and final status", async () => {
    const { fetch } = fakeFetch((req) => {
      if (req.method === "POST") return json(202, { job_id: JOB, status_url: "", events_url: "", created: true });
      if (req.url.endsWith("/events")) {
        return sse([
          { id: "0", event: "queued", data: { job_id: JOB, at: 1, model: "tiny" } },
          { id: "5", event: "completed", data: { job_id: JOB, at: 4, images: [image], timings } },
        ]);
      }
      return json(200, status("completed", { images: [image], timings, image_urls: [`/v1/jobs/${JOB}/images/0`] }));
    });
    const { result } = renderHook(() => useGenerate({ pollMs: 10 }), { wrapper: wrapper(new QueenClient({ fetch })) });
    await act(() => result.current.submit({ model: "tiny", prompt: "a boat", num_images: 1 }));
    expect(result.current.state).toBe("completed");
    expect(result.current.images[0]!.seed).toBe(7);
    expect(result.current.status?.image_urls).toEqual([`/v1/jobs/${JOB}/images/0`]);
  });

  it("useGenerate shows a refused submission with the field at fault", async () => {
    const { fetch } = fakeFetch(() => json(422, { error: { code: "INVALID_REQUEST", message: "must be a positive multiple of 8, got 63", field: "width" } }));
    const { result } = renderHook(() => useGenerate(), { wrapper: wrapper(new QueenClient({ fetch })) });
    await act(() => result.current.submit({ model: "tiny", prompt: "x", width: 63, num_images: 1 }));
    expect(result.current.state).toBe("failed");
    expect(result.current.error).toMatchObject({ code: "INVALID_REQUEST", field: "width" });
  });

  it("useJob shows a finished job from its status without following events", async () => {
    const { fetch, seen } = fakeFetch(() => json(200, status("cancelled", { cancelled_at_step: 2 })));
    const { result } = renderHook(() => useJob(JOB), { wrapper: wrapper(new QueenClient({ fetch })) });
    await waitFor(() => expect(result.current.state).toBe("cancelled"));
    expect(result.current.cancelledAtStep).toBe(2);
    expect(seen.every((s) => !s.url.endsWith("/events"))).toBe(true);
  });

  it("useJob stops polling the status once the event stream fails", async () => {
    let polled = 0;
    const { fetch } = fakeFetch((req) => {
      if (req.url.endsWith("/events")) return json(410, { error: { code: "EXPIRED", message: "the job expired" } });
      polled += 1;
      return json(200, status("queued", { queue_position: 2 }));
    });
    const { result } = renderHook(() => useJob(JOB, { pollMs: 5 }), { wrapper: wrapper(new QueenClient({ fetch })) });
    await waitFor(() => expect(result.current.error).toMatchObject({ code: "EXPIRED" }));
    const after = polled;
    await act(() => sleep(80));
    expect(polled).toBeLessThanOrEqual(after + 1);
  });

  it("useJob polls less often while the status fails, and not again once the job is gone", async () => {
    let polled = 0;
    let gone = false;
    let answer = () => json(503, { error: { code: "UNAVAILABLE", message: "NATS is down" } });
    const { fetch } = fakeFetch((req, signal) => {
      if (req.url.endsWith("/events")) return sse([{ id: "0", event: "queued", data: { job_id: JOB, at: 1, model: "tiny" } }], true, signal);
      polled += 1;
      return polled === 1 ? json(200, status("queued")) : answer();
    });
    const { result, unmount } = renderHook(() => useJob(JOB, { pollMs: 10 }), { wrapper: wrapper(new QueenClient({ fetch })) });
    await waitFor(() => expect(result.current.state).toBe("queued"));
    await act(() => sleep(250));
    // 10 ms apart, 25 polls; doubling from 10 ms, 5.
    expect(polled).toBeLessThan(10);
    answer = () => ((gone = true), json(404, { error: { code: "NOT_FOUND", message: "no job" } }));
    await waitFor(() => expect(gone).toBe(true), { timeout: 3000 });
    const asked = polled;
    await act(() => sleep(400));
    expect(polled).toBe(asked);
    unmount();
  });

  it("useResource waits for a slow answer before it refreshes, never asking twice at once", async () => {
    let open = 0;
    let most = 0;
    const { fetch } = fakeFetch((_req, signal) => {
      open += 1;
      most = Math.max(most, open);
      return later(60, () => json(200, []), signal).finally(() => (open -= 1));
    });
    const { result, unmount } = renderHook(() => useWorkers({ refreshMs: 10 }), { wrapper: wrapper(new QueenClient({ fetch })) });
    await waitFor(() => expect(result.current.data).toEqual([]), { timeout: 1000 });
    await act(() => sleep(100));
    expect(most).toBe(1);
    unmount();
  });

  it("useJobs asks with its filter and asks again when the filter changes", async () => {
    const { fetch, seen } = fakeFetch(() => json(200, { jobs: [status("completed")], total: 1, total_exact: true }));
    const client = new QueenClient({ fetch });
    const { result, rerender } = renderHook(({ state }) => useJobs({ state, limit: 12 }), {
      wrapper: wrapper(client),
      initialProps: { state: "completed" as "completed" | "failed" },
    });
    await waitFor(() => expect(result.current.data?.total).toBe(1));
    rerender({ state: "failed" });
    await waitFor(() => expect(seen.map((s) => s.url)).toContain("/v1/jobs?state=failed&limit=12"));
    expect(seen[0]!.url).toBe("/v1/jobs?state=completed&limit=12");
  });
});
