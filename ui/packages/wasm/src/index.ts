// @sd-rbee/wasm: the queen's own submission checks, compiled from Rust (crates/wasm) to WebAssembly, for a
// form that is refused in the browser exactly as the queen would refuse it (same codes, fields, messages).
//
//   const contract = await loadContract(fetch("/sd_rbee_wasm.wasm"));
//   const answer = contract.checkSubmission({ model: "tiny", prompt: "x", width: 63 }, await queen.limits());
//   if (!answer.ok) showError(answer.error.field, answer.error.message);

/** The API's error body, as the queen would answer. */
export interface ContractError {
  code: string;
  message: string;
  field?: string;
}

export type CheckAnswer =
  | { ok: true; job: { kind: string; model: string; width?: number; height?: number; steps?: number; num_images: number; seed?: number; loras: { name: string; scale: number }[] } }
  | { ok: false; status: number; error: ContractError };

interface Exports {
  memory: WebAssembly.Memory;
  alloc(len: number): number;
  dealloc(ptr: number, len: number): void;
  check_submission_json(body: number, bodyLen: number, limits: number, limitsLen: number): bigint;
  default_limits_json(): bigint;
  error_codes_json(): bigint;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** The module's functions, with JSON in and out. */
export class Contract {
  constructor(private readonly exports: Exports) {}

  private put(text: string): [number, number] {
    const bytes = encoder.encode(text);
    const ptr = this.exports.alloc(bytes.length);
    new Uint8Array(this.exports.memory.buffer, ptr, bytes.length).set(bytes);
    return [ptr, bytes.length];
  }

  private take(packed: bigint): unknown {
    const ptr = Number(packed >> 32n);
    const len = Number(packed & 0xffffffffn);
    const text = decoder.decode(new Uint8Array(this.exports.memory.buffer, ptr, len));
    this.exports.dealloc(ptr, len);
    return JSON.parse(text);
  }

  /** Checks a `POST /v1/jobs` body (an object, or its JSON text) against `limits` (`GET /v1/limits`'s
   * answer; the queen's defaults when left out): what the queen checks before it looks at its backends
   * (the images' contents, the model catalogue). */
  checkSubmission(submission: unknown, limits?: object): CheckAnswer {
    const body = this.put(typeof submission === "string" ? submission : JSON.stringify(submission));
    const lim = limits ? this.put(JSON.stringify(limits)) : ([0, 0] as [number, number]);
    try {
      return this.take(this.exports.check_submission_json(body[0], body[1], lim[0], lim[1])) as CheckAnswer;
    } finally {
      this.exports.dealloc(body[0], body[1]);
      if (lim[1]) this.exports.dealloc(lim[0], lim[1]);
    }
  }

  /** The queen's default limits, as `GET /v1/limits` shows them. */
  defaultLimits(): Record<string, unknown> {
    return this.take(this.exports.default_limits_json()) as Record<string, unknown>;
  }

  /** Every error code with its HTTP status. */
  errorCodes(): Record<string, number> {
    return this.take(this.exports.error_codes_json()) as Record<string, number>;
  }
}

/** Instantiates the module from its bytes, a `Response` (e.g. `fetch(url)`), or a compiled module. */
export async function loadContract(source: BufferSource | Response | Promise<Response> | WebAssembly.Module): Promise<Contract> {
  const resolved = await source;
  let instance: WebAssembly.Instance;
  if (resolved instanceof WebAssembly.Module) {
    instance = await WebAssembly.instantiate(resolved, {});
  } else if (typeof Response !== "undefined" && resolved instanceof Response) {
    if (!resolved.ok) throw new Error(`cannot load the contract module: HTTP ${resolved.status}`);
    instance = (await WebAssembly.instantiate(await resolved.arrayBuffer(), {})).instance;
  } else {
    instance = (await WebAssembly.instantiate(resolved as BufferSource, {})).instance;
  }
  return new Contract(instance.exports as unknown as Exports);
}
