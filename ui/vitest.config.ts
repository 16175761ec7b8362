import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

const here = (p: string) => fileURLToPath(new URL(p, import.meta.url));

export default defineConfig({
  resolve: {
    alias: {
      "@sd-rbee/sdk": here("./packages/sdk/src/index.ts"),
      "@sd-rbee/react": here("./packages/react/src/index.ts"),
    },
  },
  test: {
    include: ["packages/*/test/**/*.test.{ts,tsx}", "app/test/**/*.test.{ts,tsx}"],
  },
});
