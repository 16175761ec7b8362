import { ApiError, QueenClient } from "@sd-rbee/sdk";
import { useState, type FormEvent } from "react";

/** Asks for an API token and checks it against the queen before keeping it. */
export function SignIn({ client, onSignedIn, notice }: { client: QueenClient; onSignedIn: (token: string) => void; notice?: string }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    const t = token.trim();
    if (!t) return setError("Enter the API token the queen was started with (--token or SD_RBEE_TOKENS).");
    setBusy(true);
    setError(null);
    try {
      // A request that needs the token: the models list.
      await new QueenClient({ baseUrl: client.baseUrl, token: t }).models();
      onSignedIn(t);
    } catch (e) {
      if (e instanceof ApiError && e.code === "UNAUTHORIZED") setError("That token is not one of this queen's. Check it and try again.");
      else setError(`Cannot sign in: ${(e as Error).message}`);
    } finally {
      setBusy(false);
    }
  };
  return (
    <main className="signin">
      <form onSubmit={submit} aria-labelledby="signin-title" noValidate>
        <h1 id="signin-title">sd-rbee</h1>
        {notice && (
          <p className="error" role="status">
            {notice}
          </p>
        )}
        <p>Sign in with an API token of this queen. It is kept in this browser until you sign out.</p>
        <label htmlFor="token">API token</label>
        <input
          id="token"
          name="token"
          type="password"
          autoComplete="current-password"
          value={token}
          onChange={(e) => setToken(e.target.value)}
          aria-invalid={error ? true : undefined}
          aria-describedby={error ? "token-error" : undefined}
          autoFocus
        />
        {error && (
          <p id="token-error" className="error" role="alert">
            {error}
          </p>
        )}
        <button type="submit" disabled={busy}>
          {busy ? "Checking…" : "Sign in"}
        </button>
      </form>
    </main>
  );
}
