import { QueenClient } from "@sd-rbee/sdk";
import { QueenProvider, useGenerate } from "@sd-rbee/react";
import { useCallback, useEffect, useMemo, useRef, useState } from "react";

import { WorkspaceContext, type Picture } from "./workspace";
import { EMPTY_FORM, type FormState } from "./form";
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
  const route = useRoute();
  const main = useRef<HTMLElement>(null);
  useEffect(() => {
    document.title = `${TITLES[route.page]} · sd-rbee`;
    main.current?.focus();
  }, [route]);

  if (!token) return <SignIn client={client} onSignedIn={signIn} />;
  return (
    <QueenProvider client={client}>
        <WorkspaceProvider>
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
        </WorkspaceProvider>
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

const FORM_KEY = "sd-rbee.form";

function savedForm(): FormState {
  try {
    const saved = sessionStorage.getItem(FORM_KEY);
    return saved ? { ...EMPTY_FORM, ...(JSON.parse(saved) as Partial<FormState>) } : EMPTY_FORM;
  } catch {
    return EMPTY_FORM;
  }
}

/** The generate page's form (kept in this tab's session storage), picture and job, alive across pages. */
function WorkspaceProvider({ children }: { children: React.ReactNode }) {
  const [form, setForm] = useState<FormState>(savedForm);
  const [init, setInit] = useState<Picture | null>(null);
  const job = useGenerate();
  const mask = useRef<{ src: string; data: ImageData } | null>(null);
  useEffect(() => {
    try {
      sessionStorage.setItem(FORM_KEY, JSON.stringify(form));
    } catch {
      // storage full or disabled: the form lasts as long as the page
    }
  }, [form]);
  return <WorkspaceContext.Provider value={{ form, setForm, init, setInit, job, mask }}>{children}</WorkspaceContext.Provider>;
}
