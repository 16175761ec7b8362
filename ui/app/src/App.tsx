import { QueenClient } from "@sd-rbee/sdk";
import { QueenProvider } from "@sd-rbee/react";
import { useCallback, useEffect, useMemo, useRef, useState } from "react";

import { DraftContext, type Draft } from "./draft";
import { FleetPage } from "./FleetPage";
import { GalleryPage } from "./GalleryPage";
import { GeneratePage } from "./GeneratePage";
import { JobPage } from "./JobPage";
import { href, useRoute, type Route } from "./route";
import { savedToken, saveToken } from "./session";
import { SignIn } from "./SignIn";

const TITLES: Record<Route["page"], string> = { generate: "Generate", gallery: "Gallery", fleet: "Fleet", job: "Job" };

export function App() {
  const [token, setToken] = useState<string | null>(savedToken);
  const tokenRef = useRef(token);
  tokenRef.current = token;
  const client = useMemo(() => new QueenClient({ token: () => tokenRef.current }), []);
  const signIn = useCallback((t: string) => {
    saveToken(t);
    setToken(t);
  }, []);
  const signOut = useCallback(() => {
    saveToken(null);
    setToken(null);
  }, []);
  const [draft, setDraftState] = useState<Draft>({ serial: 0 });
  const setDraft = useCallback((d: Omit<Draft, "serial">) => setDraftState((old) => ({ ...d, serial: old.serial + 1 })), []);
  const route = useRoute();
  const main = useRef<HTMLElement>(null);
  useEffect(() => {
    document.title = `${TITLES[route.page]} · sd-rbee`;
    main.current?.focus();
  }, [route]);

  if (!token) return <SignIn client={client} onSignedIn={signIn} />;
  return (
    <QueenProvider client={client}>
      <DraftContext.Provider value={{ draft, setDraft }}>
        <a className="skip" href="#main" onClick={(e) => (e.preventDefault(), main.current?.focus())}>
          Skip to content
        </a>
        <header className="top">
          <span className="brand" aria-hidden="true">
            sd-rbee
          </span>
          <nav aria-label="Pages">
            {(["generate", "gallery", "fleet"] as const).map((page) => (
              <a key={page} href={href({ page })} aria-current={route.page === page ? "page" : undefined}>
                {TITLES[page]}
              </a>
            ))}
          </nav>
          <button type="button" className="quiet" onClick={signOut}>
            Sign out
          </button>
        </header>
        <main id="main" ref={main} tabIndex={-1}>
          {route.page === "generate" && <GeneratePage />}
          {route.page === "gallery" && <GalleryPage />}
          {route.page === "fleet" && <FleetPage />}
          {route.page === "job" && <JobPage id={route.id} />}
        </main>
        <Unauthorized onSignOut={signOut} />
      </DraftContext.Provider>
    </QueenProvider>
  );
}

/** Signs out when any request is refused for its token (it was revoked since signing in). */
function Unauthorized({ onSignOut }: { onSignOut: () => void }) {
  useEffect(() => {
    const onRejection = (e: PromiseRejectionEvent) => {
      if ((e.reason as { code?: string })?.code === "UNAUTHORIZED") onSignOut();
    };
    addEventListener("unhandledrejection", onRejection);
    return () => removeEventListener("unhandledrejection", onRejection);
  }, [onSignOut]);
  return null;
}
