// @sd-rbee/sdk: a typed client for the sd-rbee queen's HTTP API.
export { QueenClient, type ClientOptions, type JobFilter, type RequestOptions } from "./client.js";
export { ApiError, ConnectionError, isAbort } from "./errors.js";
export { followJob, parseFrame, type FollowOptions } from "./events.js";
export * from "./types.js";
export type { components, paths } from "./schema.js";
