import { describe, expect, it } from "vitest";

import { href, parseRoute } from "../src/route";

describe("parseRoute", () => {
  it("reads a job's id, and falls back to the generate page for one that does not decode", () => {
    expect(parseRoute(href({ page: "job", id: "a b/c" }))).toEqual({ page: "job", id: "a b/c" });
    expect(parseRoute("#/jobs/0b7e2c3a")).toEqual({ page: "job", id: "0b7e2c3a" });
    expect(parseRoute("#/jobs/%ZZ")).toEqual({ page: "generate" });
    expect(parseRoute("#/gallery")).toEqual({ page: "gallery" });
  });
});
