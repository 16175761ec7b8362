// The types are generated from the queen's OpenAPI document; the Rust test suite checks the document is the
// queen's, this checks the types are the document's.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { expect, it } from "vitest";

const sdk = fileURLToPath(new URL("..", import.meta.url));

it("the generated types are current with openapi.json (else: npm run gen)", () => {
  const out = join(mkdtempSync(join(tmpdir(), "sdk-schema-")), "schema.ts");
  const bin = fileURLToPath(new URL("../../../node_modules/.bin/openapi-typescript", import.meta.url));
  execFileSync(bin, [join(sdk, "openapi.json"), "-o", out], { stdio: "pipe" });
  expect(readFileSync(join(sdk, "src/schema.ts"), "utf8")).toBe(readFileSync(out, "utf8"));
});
