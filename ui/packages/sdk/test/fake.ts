// A fake queen for unit tests: a `fetch` that answers from a list of handlers and records every request.
export interface Seen {
  method: string;
  url: string;
  headers: Record<string, string>;
  body?: string;
}

export type Handler = (req: Seen, signal?: AbortSignal | null) => Response | Promise<Response>;

export function fakeFetch(handler: Handler): { fetch: typeof fetch; seen: Seen[] } {
  const seen: Seen[] = [];
  const fetchImpl = (async (input: RequestInfo | URL, init: RequestInit = {}) => {
    const headers: Record<string, string> = {};
    for (const [k, v] of Object.entries((init.headers as Record<string, string>) ?? {})) headers[k.toLowerCase()] = v;
    const req: Seen = { method: init.method ?? "GET", url: String(input), headers, body: typeof init.body === "string" ? init.body : undefined };
    seen.push(req);
    if (init.signal?.aborted) throw new DOMException("aborted", "AbortError");
    return handler(req, init.signal);
  }) as typeof fetch;
  return { fetch: fetchImpl, seen };
}

export function json(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json", ...headers } });
}

/** An SSE body of `frames`; with `hang`, the stream stays open after them (until the request is aborted). */
export function sse(frames: { id: string; event: string; data: unknown }[], hang = false, signal?: AbortSignal | null): Response {
  const text = frames.map((f) => `data: ${JSON.stringify(f.data)}\nid: ${f.id}\nevent: ${f.event}\n\n`).join("");
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(new TextEncoder().encode(`: keep-alive\n\n${text}`));
      if (!hang) controller.close();
      else signal?.addEventListener("abort", () => controller.error(new DOMException("aborted", "AbortError")));
    },
  });
  return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
}
