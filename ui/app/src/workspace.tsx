// The generate page's work, kept at the app's level so it outlives a visit to another page, and so the
// gallery can hand it settings to use again or a picture to start from.
import type { Generate } from "@sd-rbee/react";
import { createContext, useContext } from "react";

import type { Attempt, FormState } from "./form";

/** A picture to start from, decoded (its size is the mask's). */
export interface Picture {
  blob: Blob;
  url: string;
  width: number;
  height: number;
}

/** The generate page's work, kept while the person looks at other pages: the form, the picture, and the
 * job being followed. */
export interface Workspace {
  form: FormState;
  setForm: (f: FormState | ((old: FormState) => FormState)) => void;
  init: Picture | null;
  /** Replaces the picture; the one replaced (or removed) has its object URL revoked. */
  setInit: (p: Picture | null) => void;
  job: Generate;
  /** The mask painted over `init`, as it was when the generate page was last left. */
  mask: { current: { src: string; data: ImageData } | null };
  /** The last attempt at submitting, until a job came back from it (its idempotency key is reused meanwhile). */
  attempt: { current: Attempt | null };
}

export const WorkspaceContext = createContext<Workspace | null>(null);

export function useWorkspace(): Workspace {
  const w = useContext(WorkspaceContext);
  if (!w) throw new Error("no workspace");
  return w;
}

/** A picture the browser can read, with its size. */
export async function picture(blob: Blob): Promise<Picture> {
  const url = URL.createObjectURL(blob);
  const img = new Image();
  img.src = url;
  await img.decode().catch(() => {
    URL.revokeObjectURL(url);
    throw new Error("this file is not a picture the browser can read (PNG, JPEG or WebP)");
  });
  return { blob, url, width: img.naturalWidth, height: img.naturalHeight };
}
