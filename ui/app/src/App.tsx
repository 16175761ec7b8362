import { QueenClient } from "@sd-rbee/sdk";
import { QueenProvider, useGenerate, useMe } from "@sd-rbee/react";
import { useCallback, useEffect, useMemo, useRef, useState } from "react";

import { WorkspaceContext, type Picture } from "./workspace";
import { EMPTY_FORM, type Attempt, type FormState } from "./form";
import { FleetPage } from "./FleetPage";
import { GalleryPage } from "./GalleryPage";
import { GeneratePage } from "./GeneratePage";
import { JobPage } from "./JobPage";
import { href, useRoute, type Route } from "./route";
import { savedToken, saveToken } from "./session";
import { SignIn } from "./SignIn";

const TITLES: Record<Route["page"], string> = { generate: "Generate", gallery: "Gallery", fleet: "Fleet", job: "Job" };

/** The tenant the signed-in token acts for (nothing for an operator's token). */
function TenantBadge() {
  const me = useMe();
  if (!me.data?.tenant) return null;
  return (
    <span className="badge" data-testid="tenant" title="This token sees its tenant's jobs alone">
      tenant {me.data.tenant}
    </span>
  );
}

export function App() {
  const [token, setToken] = useState<string | null>(savedToken);
  const [refused, setRefused] = useState(false);
  const tokenRef = useRef(token);
  tokenRef.current = token;
  const signIn = useCallback((t: string) => {
    saveToken(t);
    setRefused(false);
    setToken(t);
  }, []);
  const signOut = useCallback(() => {
    saveToken(null);
    setToken(null);
  }, []);
  // One client per token. Any 401 it gets means the token was revoked (or the queen restarted with others):
  // sign out there, as every caller catches its errors. Not for an answer to a token already replaced.
  const client = useMemo(
    () =>
      new QueenClient({
        token,
        onUnauthorized: () => {
          if (!token || tokenRef.current !== token) return;
          setRefused(true);
          signOut();
        },
      }),
    [token, signOut],
  );
  const route = useRoute();
  const main = useRef<HTMLElement>(null);
  useEffect(() => {
    document.title = `${TITLES[route.page]} · sd-rbee`;
    main.current?.focus();
  }, [route]);

  if (!token) return <SignIn client={client} onSignedIn={signIn} notice={refused ? "The queen refused the saved token: it may have been revoked. Sign in again." : undefined} />;
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
          <TenantBadge />
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
        </WorkspaceProvider>
    </QueenProvider>
  );
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
export function WorkspaceProvider({ children }: { children: React.ReactNode }) {
  const [form, setForm] = useState<FormState>(savedForm);
  const [init, setInitState] = useState<Picture | null>(null);
  const initRef = useRef<Picture | null>(null);
  // A picture's object URL holds its whole file: let go of it once the picture is replaced or removed.
  const setInit = useCallback((p: Picture | null) => {
    const old = initRef.current;
    if (old && old.url !== p?.url) URL.revokeObjectURL(old.url);
    initRef.current = p;
    setInitState(p);
  }, []);
  useEffect(
    () => () => {
      if (initRef.current) URL.revokeObjectURL(initRef.current.url);
    },
    [],
  );
  const job = useGenerate();
  const mask = useRef<{ src: string; data: ImageData } | null>(null);
  const attempt = useRef<Attempt | null>(null);
  // A job came back: the next submission is a new one, with a new idempotency key.
  useEffect(() => {
    if (job.jobId) attempt.current = null;
  }, [job.jobId]);
  useEffect(() => {
    try {
      sessionStorage.setItem(FORM_KEY, JSON.stringify(form));
    } catch {
      // storage full or disabled: the form lasts as long as the page
    }
  }, [form]);
  return <WorkspaceContext.Provider value={{ form, setForm, init, setInit, job, mask, attempt }}>{children}</WorkspaceContext.Provider>;
}
