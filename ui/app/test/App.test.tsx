// @vitest-environment jsdom
import { act, cleanup, fireEvent, render, screen, waitFor } from "@testing-library/react";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { QueenClient } from "@sd-rbee/sdk";
import { QueenProvider } from "@sd-rbee/react";
import { fakeFetch, json, sse, type Handler } from "../../packages/sdk/test/fake.js";
import { App, WorkspaceProvider } from "../src/App";
import { ErrorBoundary } from "../src/ErrorBoundary";
import { useWorkspace, type Picture, type Workspace } from "../src/workspace";

const JOB = "0b7e2c3a-1f7e-4a57-9a2b-2f1d3c4b5a69";
const TOKEN_KEY = "sd-rbee.token";
const models = [{ name: "tiny", workers: 1, resident_workers: 1, loras: [] }];
const limits = { max_prompt_bytes: 4096, max_side: 2048, max_pixels: 2048 * 2048, max_steps: 150, max_guidance: 30, max_images: 8, max_inline_image_bytes: 1, max_mask_blur: 64, max_loras: 2, max_body_bytes: 1, size_multiple: 8, schedulers: [], timestep_spacings: [], output_formats: [], resize_modes: [], default_img2img_strength: 0.8, default_inpaint_strength: 1, default_mask_blur: 4 };

/** The app's fetch: `handler`, with the models and limits answered unless it answers them. */
function queen(handler: Handler) {
  const fake = fakeFetch((req, signal) => handler(req, signal) ?? (req.url === "/v1/limits" ? json(200, limits) : json(200, models)));
  vi.stubGlobal("fetch", fake.fetch);
  return fake;
}

beforeEach(() => {
  localStorage.clear();
  sessionStorage.clear();
  location.hash = "#/";
});

afterEach(() => {
  cleanup();
  vi.unstubAllGlobals();
  vi.restoreAllMocks();
});

describe("App", () => {
  it("signs out when the queen refuses the saved token, though the page caught the error", async () => {
    localStorage.setItem(TOKEN_KEY, "revoked");
    queen((req) => (req.url === "/v1/models" ? json(401, { error: { code: "UNAUTHORIZED", message: "unknown token" } }) : (undefined as unknown as Response)));
    render(<App />);
    await screen.findByLabelText("API token");
    expect(localStorage.getItem(TOKEN_KEY)).toBeNull();
    expect(screen.getByText(/refused the saved token/)).toBeTruthy();
  });

  it("submits with one idempotency key per attempt: the same for a retry, a new one once the form changed or a job came back", async () => {
    localStorage.setItem(TOKEN_KEY, "t");
    let posts = 0;
    const { seen } = queen((req) => {
      if (req.method === "POST") {
        posts += 1;
        if (posts <= 3) throw new TypeError("connection reset");
        return json(202, { job_id: JOB, status_url: "", events_url: "", created: posts === 4 });
      }
      if (req.url.endsWith("/events")) return sse([{ id: "0", event: "queued", data: { job_id: JOB, at: 1, model: "tiny" } }, { id: "1", event: "cancelled", data: { job_id: JOB, at: 2 } }]);
      if (req.url === `/v1/jobs/${JOB}`) return json(200, { job_id: JOB, model: "tiny", state: "cancelled", created_at: 1, updated_at: 2, deliveries: 0, waiting_for_worker: false, waiting_for_redelivery: false });
      return undefined as unknown as Response;
    });
    render(<App />);
    await waitFor(() => expect((screen.getByLabelText("Model") as HTMLSelectElement).value).toBe("tiny"));
    fireEvent.change(screen.getByLabelText("Prompt"), { target: { value: "a boat" } });
    const generate = async (times: number) => {
      fireEvent.click(screen.getByRole("button", { name: /^Generate/ }));
      await waitFor(() => expect(posts).toBe(times));
      await waitFor(() => expect((screen.getByRole("button", { name: /^Generate/ }) as HTMLButtonElement).disabled).toBe(false));
    };
    await generate(1);
    await generate(2);
    fireEvent.change(screen.getByLabelText("Prompt"), { target: { value: "a red boat" } });
    await generate(3);
    await generate(4);
    await screen.findByRole("link", { name: JOB });
    await generate(5);
    const keys = seen.filter((s) => s.method === "POST").map((s) => s.headers["idempotency-key"]);
    expect(keys.every((k) => typeof k === "string" && k.length > 0)).toBe(true);
    expect(keys[1]).toBe(keys[0]);
    expect(keys[2]).not.toBe(keys[1]);
    expect(keys[3]).toBe(keys[2]);
    expect(keys[4]).not.toBe(keys[3]);
  });

  it("offers Cancel while a submission waits for the queen's answer", async () => {
    localStorage.setItem(TOKEN_KEY, "t");
    queen((req, signal) => {
      if (req.method !== "POST") return undefined as unknown as Response;
      // A queen that never answers (until the request is given up).
      return new Promise<Response>((_resolve, reject) => signal?.addEventListener("abort", () => reject(signal.reason)));
    });
    render(<App />);
    await waitFor(() => expect((screen.getByLabelText("Model") as HTMLSelectElement).value).toBe("tiny"));
    fireEvent.change(screen.getByLabelText("Prompt"), { target: { value: "a boat" } });
    fireEvent.click(screen.getByRole("button", { name: /^Generate/ }));
    await waitFor(() => expect(screen.getByTestId("job-state").textContent).toBe("Submitting…"));
    fireEvent.click(screen.getByRole("button", { name: "Cancel" }));
    await waitFor(() => expect(screen.getByTestId("job-state").textContent).toBe("Nothing running"));
    expect((screen.getByRole("button", { name: /^Generate/ }) as HTMLButtonElement).disabled).toBe(false);
  });
});

describe("WorkspaceProvider", () => {
  it("revokes the object URL of a picture replaced or removed", () => {
    const revoke = vi.fn();
    URL.revokeObjectURL = revoke;
    let workspace: Workspace | undefined;
    const Peek = () => ((workspace = useWorkspace()), null);
    render(
      <QueenProvider client={new QueenClient({ fetch: fakeFetch(() => json(200, [])).fetch })}>
        <WorkspaceProvider>
          <Peek />
        </WorkspaceProvider>
      </QueenProvider>,
    );
    const pic = (url: string): Picture => ({ blob: new Blob([]), url, width: 8, height: 8 });
    act(() => workspace!.setInit(pic("blob:first")));
    expect(revoke).not.toHaveBeenCalled();
    act(() => workspace!.setInit(pic("blob:second")));
    expect(revoke.mock.calls).toEqual([["blob:first"]]);
    act(() => workspace!.setInit(null));
    expect(revoke.mock.calls).toEqual([["blob:first"], ["blob:second"]]);
  });
});

describe("ErrorBoundary", () => {
  it("shows what broke and a way back instead of a blank page", () => {
    vi.spyOn(console, "error").mockImplementation(() => {});
    let broken = true;
    function Page() {
      if (broken) throw new URIError("URI malformed");
      return <p>the page</p>;
    }
    location.hash = "#/jobs/x";
    render(
      <ErrorBoundary>
        <Page />
      </ErrorBoundary>,
    );
    expect(screen.getByRole("alert").textContent).toContain("URI malformed");
    broken = false;
    fireEvent.click(screen.getByRole("button", { name: "Back to Generate" }));
    expect(screen.getByText("the page")).toBeTruthy();
    expect(location.hash).toBe("#/");
  });
});
