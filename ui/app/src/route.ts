// Routes live in the URL's fragment (#/gallery, #/jobs/ID), so the queen serves one page at `/`.
import { useEffect, useState } from "react";

export type Route = { page: "generate" } | { page: "gallery" } | { page: "fleet" } | { page: "job"; id: string };

export function parseRoute(hash: string): Route {
  const path = hash.replace(/^#\/?/, "");
  const [head, id] = path.split("/");
  if (head === "gallery") return { page: "gallery" };
  if (head === "fleet") return { page: "fleet" };
  if (head === "jobs" && id) {
    const decoded = decode(id);
    if (decoded !== undefined) return { page: "job", id: decoded };
  }
  return { page: "generate" };
}

/** `text` URI-decoded, or `undefined` when it is not valid (`%ZZ`): a hand-edited link must not break the page. */
function decode(text: string): string | undefined {
  try {
    return decodeURIComponent(text);
  } catch {
    return undefined;
  }
}

export function href(route: Route): string {
  return route.page === "job" ? `#/jobs/${encodeURIComponent(route.id)}` : `#/${route.page === "generate" ? "" : route.page}`;
}

export function useRoute(): Route {
  const [route, setRoute] = useState(() => parseRoute(location.hash));
  useEffect(() => {
    const onChange = () => setRoute(parseRoute(location.hash));
    addEventListener("hashchange", onChange);
    return () => removeEventListener("hashchange", onChange);
  }, []);
  return route;
}

export function go(route: Route): void {
  location.hash = href(route);
}
