// React hooks over @sd-rbee/sdk. Every hook takes its client from <QueenProvider>.
import { createContext, createElement, useCallback, useContext, useEffect, useRef, useState, type ReactNode } from "react";
import { ApiError, isAbort, type JobFilter, type JobList, type JobSubmission, type LimitsView, type ModelInfo, type QueenClient, type StatusView, type TokenInfo, type WorkerInfo } from "@sd-rbee/sdk";

import { applyEvent, applyStatus, IDLE, type LiveJob } from "./live.js";

const QueenContext = createContext<QueenClient | null>(null);

/** Makes `client` the one the hooks below use. */
export function QueenProvider(props: { client: QueenClient; children?: ReactNode }) {
  return createElement(QueenContext.Provider, { value: props.client }, props.children);
}

/** The client of the nearest <QueenProvider>. */
export function useQueen(): QueenClient {
  const client = useContext(QueenContext);
  if (!client) throw new Error("sd-rbee hooks need a <QueenProvider client={...}> above them");
  return client;
}

export interface Resource<T> {
  data?: T;
  error?: Error;
  loading: boolean;
  /** Fetches again now. */
  reload: () => void;
}

/** `load` run when `key` changes (and again `refreshMs` after each answer when given), aborted when superseded
 * or unmounted. */
export function useResource<T>(load: (client: QueenClient, signal: AbortSignal) => Promise<T>, key: string, refreshMs?: number): Resource<T> {
  const client = useQueen();
  const [state, setState] = useState<{ data?: T; error?: Error; loading: boolean }>({ loading: true });
  const [tick, setTick] = useState(0);
  const loadRef = useRef(load);
  loadRef.current = load;
  useEffect(() => {
    const controller = new AbortController();
    let timer: ReturnType<typeof setTimeout> | undefined;
    setState((s) => ({ ...s, loading: true }));
    loadRef.current(client, controller.signal)
      .then(
        (data) => {
          if (!controller.signal.aborted) setState({ data, loading: false });
        },
        (error: Error) => {
          if (!isAbort(error) && !controller.signal.aborted) setState((s) => ({ data: s.data, error, loading: false }));
        },
      )
      .finally(() => {
        // The next refresh counts from this answer: a slow queen is neither asked twice at once nor cut off
        // before it answers.
        if (refreshMs && !controller.signal.aborted) timer = setTimeout(() => setTick((t) => t + 1), refreshMs);
      });
    return () => {
      controller.abort();
      if (timer) clearTimeout(timer);
    };
  }, [client, key, tick, refreshMs]);
  const reload = useCallback(() => setTick((t) => t + 1), []);
  return { ...state, reload };
}

/** `GET /v1/models`. */
export function useModels(options: { refreshMs?: number } = {}): Resource<ModelInfo[]> {
  return useResource((c, signal) => c.models({ signal }), "models", options.refreshMs);
}

/** `GET /v1/limits`. */
export function useLimits(): Resource<LimitsView> {
  return useResource((c, signal) => c.limits({ signal }), "limits");
}

/** `GET /v1/me`: what the client's token may do (its tenant, priorities, submission rate). */
export function useMe(): Resource<TokenInfo> {
  return useResource((c, signal) => c.me({ signal }), "me");
}

/** `GET /v1/workers`, refreshed every `refreshMs` (5 s by default). */
export function useWorkers(options: { refreshMs?: number } = {}): Resource<WorkerInfo[]> {
  return useResource((c, signal) => c.workers({ signal }), "workers", options.refreshMs ?? 5000);
}

/** `GET /v1/jobs` with `filter`, refreshed every `refreshMs` when given. */
export function useJobs(filter: JobFilter = {}, options: { refreshMs?: number } = {}): Resource<JobList> {
  return useResource((c, signal) => c.jobs(filter, { signal }), JSON.stringify(filter), options.refreshMs);
}

/** The longest wait between two status polls after failures. */
const MAX_POLL_MS = 30_000;

/** Waits `ms`, or less when `signal` aborts. */
function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });
}

/** Follows job `id` from `client`, calling `update` with each new live state until the job ends; the status
 * is polled while the job is queued (queue position and ETA), as long as the event stream lasts. Resolves when
 * the job ended, its stream failed, or `signal` aborted. */
async function follow(client: QueenClient, id: string, start: LiveJob, update: (job: LiveJob) => void, signal: AbortSignal, pollMs: number): Promise<void> {
  let job = start;
  const set = (next: LiveJob) => {
    job = next;
    if (!signal.aborted) update(job);
  };
  // The poll ends with the stream, however it ends: after that only the final status (or the error) counts.
  const polling = new AbortController();
  const stopPolling = () => polling.abort();
  signal.addEventListener("abort", stopPolling, { once: true });
  const poll = async () => {
    let wait = pollMs;
    while (!polling.signal.aborted && (job.state === "queued" || job.state === "submitting")) {
      try {
        // Read `job` after the answer: events may have moved it on meanwhile.
        const status = await client.job(id, { signal: polling.signal });
        set(applyStatus(job, status));
        wait = pollMs;
      } catch (error) {
        if (polling.signal.aborted) return;
        // A refused token or a job gone (401, 404, 410) stays so; anything else may pass: ask less often.
        if (error instanceof ApiError && !error.retryable) return;
        wait = Math.min(wait * 2, Math.max(MAX_POLL_MS, pollMs));
      }
      await pause(wait, polling.signal);
    }
  };
  void poll();
  try {
    for await (const event of client.events(id, { signal, lastEventId: job.lastEventId })) set(applyEvent(job, event));
    polling.abort();
    const status = await client.job(id, { signal });
    set(applyStatus(job, status));
  } catch (error) {
    if (!isAbort(error)) set({ ...job, error: error as Error });
  } finally {
    polling.abort();
    signal.removeEventListener("abort", stopPolling);
  }
}

/** One job, live: its status, then its events as they come (progress, previews, the end). */
export function useJob(id: string | undefined, options: { pollMs?: number } = {}): LiveJob & { reload: () => void } {
  const client = useQueen();
  const [job, setJob] = useState<LiveJob>(IDLE);
  const [tick, setTick] = useState(0);
  useEffect(() => {
    if (!id) return setJob(IDLE);
    const controller = new AbortController();
    (async () => {
      try {
        const status: StatusView = await client.job(id, { signal: controller.signal });
        const start = applyStatus({ ...IDLE, state: status.state === "running" ? "running" : "queued", jobId: id, status }, status);
        setJob(start);
        if (status.state === "queued" || status.state === "running") {
          await follow(client, id, start, setJob, controller.signal, options.pollMs ?? 1000);
        }
      } catch (error) {
        if (!isAbort(error)) setJob({ ...IDLE, jobId: id, error: error as Error });
      }
    })();
    return () => controller.abort();
  }, [client, id, tick, options.pollMs]);
  return { ...job, reload: useCallback(() => setTick((t) => t + 1), []) };
}

export interface Generate extends LiveJob {
  /** Submits `job` and follows it; a job still followed is let go (not cancelled). */
  submit: (job: JobSubmission, options?: { idempotencyKey?: string }) => Promise<void>;
  /** Cancels the job (`DELETE /v1/jobs/{id}`); its `cancelled` event ends it. */
  cancel: () => Promise<void>;
  /** Forgets the job (stops following it). */
  reset: () => void;
}

/** Submit a job and watch it live: state, queue position, progress, previews, images, errors; cancel. */
export function useGenerate(options: { pollMs?: number } = {}): Generate {
  const client = useQueen();
  const [job, setJob] = useState<LiveJob>(IDLE);
  const controller = useRef<AbortController | null>(null);
  const jobId = useRef<string | undefined>(undefined);
  useEffect(() => () => controller.current?.abort(), []);
  const submit = useCallback(
    async (submission: JobSubmission, submitOptions: { idempotencyKey?: string } = {}) => {
      controller.current?.abort();
      const mine = new AbortController();
      controller.current = mine;
      jobId.current = undefined;
      const submitting: LiveJob = { ...IDLE, state: "submitting" };
      setJob(submitting);
      try {
        const answer = await client.submit(submission, { signal: mine.signal, idempotencyKey: submitOptions.idempotencyKey });
        jobId.current = answer.job_id;
        const queued: LiveJob = { ...submitting, state: "queued", jobId: answer.job_id };
        if (!mine.signal.aborted) setJob(queued);
        await follow(client, answer.job_id, queued, setJob, mine.signal, options.pollMs ?? 1000);
      } catch (error) {
        if (!isAbort(error) && !mine.signal.aborted) setJob((j) => ({ ...j, state: j.jobId ? j.state : "failed", error: error as Error }));
      }
    },
    [client, options.pollMs],
  );
  const cancel = useCallback(async () => {
    if (!jobId.current) {
      controller.current?.abort();
      setJob(IDLE);
      return;
    }
    try {
      await client.cancel(jobId.current);
    } catch (error) {
      setJob((j) => ({ ...j, error: error as Error }));
    }
  }, [client]);
  const reset = useCallback(() => {
    controller.current?.abort();
    jobId.current = undefined;
    setJob(IDLE);
  }, []);
  return { ...job, submit, cancel, reset };
}
