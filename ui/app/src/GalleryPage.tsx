// Every job, newest first: thumbnails, paging, and filters by state and model. Pages follow the queen's
// cursors, which new jobs do not shift and which go on past a page the queen answered short (a filtered
// list looks through a bounded part of the index per request).
import { useJobs, useModels } from "@sd-rbee/react";
import { JOB_STATES, type JobState, type JobStatus } from "@sd-rbee/sdk";
import { useState } from "react";

import { ago } from "./format";
import { presignedUrl, ResultImage } from "./images";
import { href } from "./route";

const PAGE = 24;

export function GalleryPage() {
  const [state, setState] = useState<JobState | "">("");
  const [model, setModel] = useState("");
  // The cursor of each page seen, the newest first (`undefined`: the newest page).
  const [cursors, setCursors] = useState<(number | undefined)[]>([undefined]);
  const cursor = cursors[cursors.length - 1];
  const models = useModels();
  const jobs = useJobs({ state: state || undefined, model: model || undefined, limit: PAGE, cursor }, { refreshMs: cursor === undefined ? 5000 : undefined });
  const list = jobs.data?.jobs ?? [];
  const next = jobs.data?.next_cursor ?? undefined;
  const filter = (f: () => void) => {
    f();
    setCursors([undefined]);
  };
  return (
    <section className="panel" aria-labelledby="gallery-title">
      <h1 id="gallery-title">Gallery</h1>
      <div className="row filters">
        <label className="inline">
          State
          <select value={state} onChange={(e) => filter(() => setState(e.target.value as JobState | ""))}>
            <option value="">All</option>
            {JOB_STATES.map((s) => (
              <option key={s}>{s}</option>
            ))}
          </select>
        </label>
        <label className="inline">
          Model
          <select value={model} onChange={(e) => filter(() => setModel(e.target.value))}>
            <option value="">All</option>
            {(models.data ?? []).map((m) => (
              <option key={m.name}>{m.name}</option>
            ))}
          </select>
        </label>
        <span className="muted" aria-live="polite">
          {jobs.data ? `${jobs.data.total}${jobs.data.total_exact ? "" : "+"} job${jobs.data.total === 1 ? "" : "s"}` : jobs.loading ? "Loading…" : ""}
        </span>
      </div>
      {jobs.error && (
        <p className="error" role="alert">
          Cannot list the jobs: {jobs.error.message}
        </p>
      )}
      {jobs.data && list.length === 0 && (
        <p className="muted">{next !== undefined ? "None of the jobs looked through matches; Older looks further back." : `No jobs${state || model ? " match these filters" : " yet"}.`}</p>
      )}
      <ul className="gallery" aria-label="Jobs">
        {list.map((job) => (
          <li key={job.job_id}>
            <Card job={job} />
          </li>
        ))}
      </ul>
      <nav className="pager" aria-label="Pages of jobs">
        <button type="button" disabled={cursors.length < 2} onClick={() => setCursors((c) => c.slice(0, -1))}>
          Newer
        </button>
        <button type="button" disabled={next === undefined} onClick={() => setCursors((c) => [...c, next])}>
          Older
        </button>
      </nav>
    </section>
  );
}

function Card({ job }: { job: JobStatus }) {
  const first = job.images?.[0];
  const prompt = job.request?.prompt ?? "(published on the bus)";
  return (
    <a className="card" href={href({ page: "job", id: job.job_id })} data-testid="job-card" data-state={job.state}>
      <div className="thumb">{first ? <ResultImage jobId={job.job_id} index={first.index} url={presignedUrl(first)} alt="" loading="lazy" /> : <span className={`badge state-${job.state}`}>{job.state}</span>}</div>
      <div className="card-text">
        <span className="prompt">{prompt}</span>
        <span className="muted">
          <span className={`dot state-${job.state}`} aria-hidden="true" /> {job.state} · {job.model} · {job.kind ?? "txt2img"} · {ago(job.created_at)}
        </span>
      </div>
    </a>
  );
}
