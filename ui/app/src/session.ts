// The API token, kept in the browser's storage until the person signs out.
const KEY = "sd-rbee.token";

export function savedToken(): string | null {
  try {
    return localStorage.getItem(KEY);
  } catch {
    return null;
  }
}

export function saveToken(token: string | null): void {
  try {
    if (token) localStorage.setItem(KEY, token);
    else localStorage.removeItem(KEY);
  } catch {
    // storage disabled: the token lasts as long as the page
  }
}
