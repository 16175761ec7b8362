// The fleet: each model with its workers and queue, each worker with its device, models and state.
import { useMe, useModels, useWorkers } from "@sd-rbee/react";
import { ApiError, type WorkerInfo } from "@sd-rbee/sdk";

import { ago, duration } from "./format";

function isForbidden(error: Error): boolean {
  return error instanceof ApiError && error.code === "FORBIDDEN";
}

function liveness(w: WorkerInfo): string {
  if (w.stopped) return "stopped";
  if (w.lost) return "lost";
  return w.state.status;
}

export function FleetPage() {
  const models = useModels({ refreshMs: 5000 });
  const me = useMe();
  return (
    <div className="fleet">
      <section className="panel" aria-labelledby="models-title">
        <h1 id="models-title">Models</h1>
        {models.error && <p className="error">Cannot list the models: {models.error.message}</p>}
        <div className="table-wrap">
          <table>
            <thead>
              <tr>
                <th scope="col">Model</th>
                <th scope="col">Workers</th>
                <th scope="col">Resident on</th>
                <th scope="col">Queued</th>
                <th scope="col">LoRAs</th>
              </tr>
            </thead>
            <tbody>
              {(models.data ?? []).map((m) => (
                <tr key={m.name}>
                  <th scope="row">{m.name}</th>
                  <td>{m.workers}</td>
                  <td>{m.resident_workers ?? 0}</td>
                  <td data-testid={`queued-${m.name}`}>{m.queued ?? "—"}</td>
                  <td>{m.loras?.length ? m.loras.join(", ") : "—"}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </section>
      {me.data?.tenant != null ? (
        <section className="panel" aria-labelledby="workers-title">
          <h2 id="workers-title">Workers</h2>
          <p className="muted">The workers are shown to operators' tokens; this token is tenant {me.data.tenant}'s.</p>
        </section>
      ) : (
        me.data || me.error ? (
          <WorkersPanel />
        ) : (
          <p className="muted">Loading…</p>
        )
      )}
    </div>
  );
}

/** The fleet's workers (an operator's token: a tenant's is refused them). */
function WorkersPanel() {
  const workers = useWorkers({ refreshMs: 5000 });
  return (
    <section className="panel" aria-labelledby="workers-title">
      <h2 id="workers-title">Workers</h2>
      {workers.error &&
        (isForbidden(workers.error) ? (
          <p className="muted">The workers are shown to operators' tokens; this token is a tenant's.</p>
        ) : (
          <p className="error">Cannot list the workers: {workers.error.message}</p>
        ))}
      {workers.data && workers.data.length === 0 && <p className="muted">No worker has been heard from yet.</p>}
      <div className="table-wrap">
        <table>
          <thead>
            <tr>
              <th scope="col">Worker</th>
              <th scope="col">State</th>
              <th scope="col">Device</th>
              <th scope="col">Models (resident)</th>
              <th scope="col">Done / failed</th>
              <th scope="col">Last heartbeat</th>
            </tr>
          </thead>
          <tbody>
            {(workers.data ?? []).map((w) => (
              <tr key={w.worker_id} data-testid="worker-row">
                <th scope="row">
                  {w.worker_id}
                  <span className="muted small"> {w.hostname} · v{w.version} · up {duration(w.uptime_s * 1000)}</span>
                </th>
                <td>
                  <span className={`badge live-${liveness(w)}`}>{liveness(w)}</span>
                </td>
                <td>{w.device}</td>
                <td>{w.models.map((m) => (w.resident?.includes(m) ? `${m} (resident)` : m)).join(", ")}</td>
                <td>
                  {w.jobs_done} / {w.jobs_failed}
                </td>
                <td>{ago(w.last_seen)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
    </section>
  );
}
