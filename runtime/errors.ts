/**
 * Typed errors raised by the runtime. The HTTP edge (src/) maps each kind to an OpenAI-style error
 * response; the runtime itself knows nothing about status codes.
 */
export type RuntimeErrorKind =
  | "model_folder" // the model folder is missing a file or holds an unexpected graph
  | "invalid_request" // the request cannot be served as asked (bad template input, too long, ...)
  | "queue_full" // the FIFO queue is at its configured limit
  | "kv_memory_full" // the KV memory budget is in use by others now (sessions, running requests, uploads)
  | "cancelled" // the client went away or aborted
  | "backend_unavailable" // a requested backend cannot be provisioned
  | "not_found" // no session with that id
  | "session_busy" // the session is in use and the server is configured to refuse rather than wait
  | "invalid_snapshot" // a snapshot was refused (see SnapshotError.reason)
  | "store_failed"; // the snapshot store could not be written (full or read-only disk): nothing changed

export class RuntimeError extends Error {
  readonly kind: RuntimeErrorKind;
  /** Name of the offending parameter, when one request field caused the error. */
  readonly param: string | null;
  constructor(kind: RuntimeErrorKind, message: string, param: string | null = null, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "RuntimeError";
    this.kind = kind;
    this.param = param;
  }
}

export class ModelFolderError extends RuntimeError {
  constructor(message: string) {
    super("model_folder", message);
    this.name = "ModelFolderError";
  }
}

export const invalidRequest = (message: string, param: string | null = null) =>
  new RuntimeError("invalid_request", message, param);
