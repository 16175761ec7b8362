// Builds crates/wasm for wasm32-unknown-unknown (release) into dist/sd_rbee_wasm.wasm. Needs the target:
// `rustup target add wasm32-unknown-unknown` (scripts/ui-deps.sh adds it).
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync } from "node:fs";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../../../", import.meta.url));
execFileSync("cargo", ["build", "--release", "--locked", "--target", "wasm32-unknown-unknown", "-p", "sd-rbee-wasm"], {
  cwd: root,
  stdio: "inherit",
  env: { ...process.env, CARGO_INCREMENTAL: "0" },
});
const out = fileURLToPath(new URL("./dist/", import.meta.url));
mkdirSync(out, { recursive: true });
copyFileSync(`${root}target/wasm32-unknown-unknown/release/sd_rbee_wasm.wasm`, `${out}sd_rbee_wasm.wasm`);
console.log(`wrote ${out}sd_rbee_wasm.wasm`);
