// What one page hands the generate page: settings to use again, a picture to start from.
import { createContext, useContext } from "react";

import type { FormState } from "./form";

export interface Draft {
  form?: FormState;
  /** A picture to start from (img2img, inpainting). */
  init?: Blob;
  /** Bumped on each hand-over, so the generate page takes it once. */
  serial: number;
}

export const DraftContext = createContext<{ draft: Draft; setDraft: (d: Omit<Draft, "serial">) => void }>({
  draft: { serial: 0 },
  setDraft: () => {},
});

export function useDraft() {
  return useContext(DraftContext);
}
