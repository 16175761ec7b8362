// A job while it lives: where it is in the queue, its progress and step previews, then its images.
import type { LiveJob } from "@sd-rbee/react";

import { duration } from "./format";
import { ImageGrid } from "./ImageGrid";
import { href } from "./route";

const STATE_TEXT: Record<LiveJob["state"], string> = {
  idle: "Nothing running",
  submitting: "Submitting…",
  queued: "Queued",
  running: "Running",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
};

export function ProgressBar({ job }: { job: LiveJob }) {
  const loading = job.phase === "loading";
  const label = loading ? "Loading the model…" : job.total ? `Step ${job.step} of ${job.total}` : "Waiting to start";
  return (
    <div className="progress-wrap">
      <div className="progress" role="progressbar" aria-label="Progress" aria-valuemin={0} aria-valuemax={100} aria-valuenow={Math.round(job.percent)} aria-valuetext={label}>
        <div className="bar" style={{ width: `${Math.min(100, Math.max(0, job.percent))}%` }} />
      </div>
      <p className="muted" aria-live="polite">
        {label}
        {job.etaMs ? ` · about ${duration(job.etaMs)} left` : ""}
      </p>
    </div>
  );
}

export function StatusLine({ job }: { job: LiveJob }) {
  return (
    <p className={`state state-${job.state}`} data-testid="job-state" aria-live="polite">
      {STATE_TEXT[job.state]}
      {job.state === "queued" && job.queuePosition !== undefined && ` · ${job.queuePosition === 0 ? "next in line" : `${job.queuePosition} ahead`}`}
      {job.state === "queued" && job.etaMs ? ` · done in about ${duration(job.etaMs)}` : ""}
      {job.state === "cancelled" && job.cancelledAtStep !== undefined && ` at step ${job.cancelledAtStep}`}
      {job.status?.waiting_for_worker && " · waiting for a worker that serves this model"}
      {job.status?.waiting_for_redelivery && " · its worker went silent; waiting for another"}
    </p>
  );
}

export function LivePanel({ job, onCancel }: { job: LiveJob; onCancel: () => void }) {
  const active = job.state === "queued" || job.state === "running" || job.state === "submitting";
  return (
    <section className="panel live" aria-labelledby="live-title">
      <h2 id="live-title">Result</h2>
      <StatusLine job={job} />
      {job.jobId && (
        <p className="muted">
          Job <a href={href({ page: "job", id: job.jobId })}>{job.jobId}</a>
        </p>
      )}
      {(active || job.percent > 0) && job.state !== "completed" && <ProgressBar job={job} />}
      {/* Also while submitting: a submission the queen does not answer can be given up. */}
      {active && (
        <button type="button" className="danger" onClick={onCancel}>
          Cancel
        </button>
      )}
      {job.failure && (
        <p className="error" role="alert">
          {job.failure.message}
          {job.failure.field && ` (field ${job.failure.field})`}
        </p>
      )}
      {job.error && !job.failure && (
        <p className="error" role="alert">
          {job.error.message}
        </p>
      )}
      {job.preview && job.state !== "completed" && <img className="preview" src={job.preview} alt={`Preview at step ${job.step}`} data-testid="preview" />}
      {job.state === "completed" && job.jobId && <ImageGrid jobId={job.jobId} images={job.images} urls={job.status?.image_urls} />}
      {job.warnings.length > 0 && (
        <ul className="warnings">
          {job.warnings.map((w) => (
            <li key={w}>{w}</li>
          ))}
        </ul>
      )}
    </section>
  );
}
