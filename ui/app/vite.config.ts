// Builds the UI into ../dist, which the queen embeds (src/queen/http/ui.rs). The bundle is committed, so
// building the binary needs no Node; `.ci/run` rebuilds it and fails if it differs.
import { fileURLToPath } from "node:url";
import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

const here = (p: string) => fileURLToPath(new URL(p, import.meta.url));

export default defineConfig({
  root: here("."),
  base: "/",
  plugins: [react()],
  resolve: {
    alias: {
      "@sd-rbee/sdk": here("../packages/sdk/src/index.ts"),
      "@sd-rbee/react": here("../packages/react/src/index.ts"),
    },
  },
  build: {
    outDir: here("../dist"),
    emptyOutDir: true,
    sourcemap: false,
    // One stylesheet and one script: the page needs nothing else.
    cssCodeSplit: false,
  },
  server: {
    // `npm run dev` in ui/app with SD_RBEE_QUEEN=http://127.0.0.1:8080 serves the UI against a running queen.
    proxy: process.env.SD_RBEE_QUEEN ? { "/v1": process.env.SD_RBEE_QUEEN } : undefined,
  },
});
