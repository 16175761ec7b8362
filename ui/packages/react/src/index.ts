// @sd-rbee/react: React hooks over @sd-rbee/sdk.
export { QueenProvider, useQueen, useResource, useModels, useLimits, useMe, useWorkers, useJobs, useJob, useGenerate, type Resource, type Generate } from "./hooks.js";
export { applyEvent, applyStatus, IDLE, type LiveJob, type LiveState } from "./live.js";
