// A request's own time limit: a signal that aborts with the caller's, or once a while passes without news.

export interface Watchdog {
  /** Aborts when the caller's signal does (with its reason), or when the watchdog fires. */
  signal: AbortSignal;
  /** Whether the watchdog fired (rather than the caller aborting). */
  fired: () => boolean;
  /** Starts the wait again (bytes arrived). */
  touch: () => void;
  /** Stops the timer and lets go of the caller's signal. */
  clear: () => void;
}

/** A signal that follows `parent` and aborts on its own once `ms` pass without `touch()`; `ms` 0 or less,
 * or not finite: never on its own. */
export function watchdog(parent: AbortSignal | undefined, ms: number): Watchdog {
  const controller = new AbortController();
  let fired = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const onAbort = () => controller.abort(parent?.reason);
  if (parent?.aborted) controller.abort(parent.reason);
  else parent?.addEventListener("abort", onAbort, { once: true });
  const on = ms > 0 && Number.isFinite(ms);
  const touch = () => {
    if (!on || controller.signal.aborted) return;
    if (timer !== undefined) clearTimeout(timer);
    timer = setTimeout(() => {
      fired = true;
      controller.abort(new DOMException(`no answer within ${ms} ms`, "TimeoutError"));
    }, ms);
  };
  touch();
  return {
    signal: controller.signal,
    fired: () => fired,
    touch,
    clear: () => {
      if (timer !== undefined) clearTimeout(timer);
      parent?.removeEventListener("abort", onAbort);
    },
  };
}
