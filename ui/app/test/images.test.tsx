// @vitest-environment jsdom
import { act, cleanup, fireEvent, render, screen, waitFor } from "@testing-library/react";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import type { ReactNode } from "react";

import { QueenClient, type ImageResult } from "@sd-rbee/sdk";
import { QueenProvider, type Generate } from "@sd-rbee/react";
import { fakeFetch } from "../../packages/sdk/test/fake.js";
import { directUrl, DownloadLink, ResultImage } from "../src/images";
import { ImageGrid } from "../src/ImageGrid";
import { WorkspaceContext, type Picture, type Workspace } from "../src/workspace";
import { EMPTY_FORM } from "../src/form";

const JOB = "0b7e2c3a-1f7e-4a57-9a2b-2f1d3c4b5a69";
const PRESIGNED = "https://bucket.example/jobs/x/0.png?X-Amz-Signature=abc";
const image: ImageResult = { index: 0, key: "k", width: 64, height: 64, seed: 7, bytes: 3, content_type: "image/png", url: PRESIGNED };

/** A queen that serves image 0 of JOB as three bytes; and a global fetch that must not be used (the CSP's
 * `connect-src 'self'` blocks the bucket). */
function setup() {
  const { fetch, seen } = fakeFetch(() => new Response(new Uint8Array([1, 2, 3]), { headers: { "content-type": "image/png" } }));
  const client = new QueenClient({ token: "t0k", fetch });
  const wrap = (children: ReactNode) => <QueenProvider client={client}>{children}</QueenProvider>;
  return { seen, wrap };
}

beforeEach(() => {
  let n = 0;
  vi.stubGlobal("fetch", vi.fn(() => Promise.reject(new TypeError("blocked by CSP"))));
  URL.createObjectURL = vi.fn(() => `blob:made-${++n}`);
  URL.revokeObjectURL = vi.fn();
});

afterEach(() => {
  cleanup();
  vi.unstubAllGlobals();
  vi.restoreAllMocks();
});

describe("directUrl", () => {
  it("lets only absolute http(s) URLs be shown as they are", () => {
    expect(directUrl(PRESIGNED)).toBe(PRESIGNED);
    expect(directUrl("http://minio.lan:9000/b/k.png")).toBe("http://minio.lan:9000/b/k.png");
    expect(directUrl(`/v1/jobs/${JOB}/images/0`)).toBeUndefined();
    expect(directUrl("javascript:alert(1)")).toBeUndefined();
    expect(directUrl("data:image/png;base64,AA")).toBeUndefined();
    expect(directUrl(undefined)).toBeUndefined();
  });
});

describe("ResultImage", () => {
  it("shows a presigned URL, and the image through the API with the token once it fails (expired)", async () => {
    const { seen, wrap } = setup();
    render(wrap(<ResultImage jobId={JOB} index={0} url={PRESIGNED} alt="result" />));
    const img = screen.getByAltText("result") as HTMLImageElement;
    expect(img.src).toBe(PRESIGNED);
    expect(seen).toHaveLength(0);
    fireEvent.error(img);
    await waitFor(() => expect((screen.getByAltText("result") as HTMLImageElement).src).toBe("blob:made-1"));
    expect(seen.map((s) => [s.url, s.headers.authorization])).toEqual([[`/v1/jobs/${JOB}/images/0`, "Bearer t0k"]]);
  });

  it("fetches through the API what is not an http(s) URL", async () => {
    const { seen, wrap } = setup();
    render(wrap(<ResultImage jobId={JOB} index={2} url="javascript:alert(1)" alt="result" />));
    await waitFor(() => expect((screen.getByAltText("result") as HTMLImageElement).src).toBe("blob:made-1"));
    expect(seen[0]!.url).toBe(`/v1/jobs/${JOB}/images/2`);
  });
});

describe("downloads and init pictures", () => {
  it("downloads through the API with the token, not from the presigned URL", async () => {
    const { seen, wrap } = setup();
    const click = vi.spyOn(HTMLAnchorElement.prototype, "click").mockImplementation(() => {});
    render(wrap(<DownloadLink jobId={JOB} index={0} name="x.png" />));
    fireEvent.click(screen.getByRole("button", { name: "Download" }));
    await waitFor(() => expect(click).toHaveBeenCalledTimes(1));
    expect(seen.map((s) => [s.url, s.headers.authorization])).toEqual([[`/v1/jobs/${JOB}/images/0`, "Bearer t0k"]]);
    expect(globalThis.fetch).not.toHaveBeenCalled();
    expect(screen.queryByText(/Cannot download/)).toBeNull();
  });

  it("takes an image as the init picture through the API", async () => {
    const { seen, wrap } = setup();
    // jsdom decodes no image: say it did.
    HTMLImageElement.prototype.decode = () => Promise.resolve();
    const setInit = vi.fn<(p: Picture | null) => void>();
    const workspace = { form: EMPTY_FORM, setForm: vi.fn(), init: null, setInit, job: {} as Generate, mask: { current: null }, attempt: { current: null } } satisfies Workspace;
    render(wrap(<WorkspaceContext.Provider value={workspace}><ImageGrid jobId={JOB} images={[image]} urls={[PRESIGNED]} /></WorkspaceContext.Provider>));
    await act(async () => fireEvent.click(screen.getByRole("button", { name: "Use as init image" })));
    await waitFor(() => expect(setInit).toHaveBeenCalledTimes(1));
    const picture = setInit.mock.calls[0]![0]!;
    expect(new Uint8Array(await picture.blob.arrayBuffer())).toEqual(new Uint8Array([1, 2, 3]));
    expect(seen.map((s) => s.url)).toEqual([`/v1/jobs/${JOB}/images/0`]);
    expect(globalThis.fetch).not.toHaveBeenCalled();
  });
});
