/**
 * Sessions over HTTP: create, list, inspect, talk to, append to, download, upload and delete them.
 *
 *   POST   /v1/sessions                  create (system prompt, messages, document; stream: prefill progress)
 *   GET    /v1/sessions                  list, in memory and in the store
 *   GET    /v1/sessions/:id              tokens read / resident, KV bytes, timestamps
 *   POST   /v1/sessions/:id/messages     add a message and generate the reply (stream or not)
 *   POST   /v1/sessions/:id/append       read text or token ids in without generating (stream: progress)
 *   GET    /v1/sessions/:id/snapshot     download the msgpack snapshot
 *   PUT    /v1/sessions/:id/snapshot     upload a snapshot and resume from it
 *   POST   /v1/sessions/:id/fork         a new session starting from this one's committed state (shares its stored KV)
 *   DELETE /v1/sessions/:id
 */
import type { Context, Hono } from "hono";
import { SnapshotError, type ChatMessage, type SessionManager } from "../runtime/index.ts";
import { badRequest } from "./http-errors.ts";
import { tenantOf } from "./auth.ts";
import { RouteKit, clientAbort, respondChat, toChatMessage } from "./http-kit.ts";
import { appendSchema, createSessionSchema, forkSessionSchema, sessionMessageSchema } from "./schemas.ts";
import { sseResponse } from "./sse.ts";

const SNAPSHOT_PATH = /^\/v1\/sessions\/[^/]+\/snapshot$/;

export const isSnapshotUpload = (c: Context) => c.req.method === "PUT" && SNAPSHOT_PATH.test(c.req.path);

type Progress = (done: number, total: number) => void;

export function registerSessionRoutes(app: Hono, kit: RouteKit, sessions: SessionManager, maxSnapshotBytes: number): void {
  const { engine } = kit;

  /** Runs an ingest, as JSON (status `status`) or, with stream, as SSE progress events then the result. */
  const ingestResponse = (
    c: Context,
    stream: boolean | undefined,
    sessionId: string | undefined,
    work: (onProgress: Progress | undefined, signal: AbortSignal) => Promise<Record<string, unknown>>,
    status: 200 | 201,
  ): Response | Promise<Response> => {
    const abort = clientAbort(c);
    if (!stream) return work(undefined, abort.signal).then((body) => c.json(body, status));
    return sseResponse(
      async (send) => {
        const result = await work((done, total) => send({ object: "session.progress", session_id: sessionId ?? null, tokens_done: done, tokens_total: total }), abort.signal);
        send(result);
      },
      abort,
      kit.errorEvent,
    );
  };

  const ingestJson = (ingest: { cachedTokens: number; prefilledTokens: number; ms: number } | null) =>
    ingest && { cached_tokens: ingest.cachedTokens, prefilled_tokens: ingest.prefilledTokens, ms: ingest.ms };

  app.post("/v1/sessions", async (c) => {
    const req = await kit.parse(c, createSessionSchema);
    const messages: ChatMessage[] = [
      ...(req.system !== undefined ? [{ role: "system", content: req.system }] : []),
      ...(req.messages ?? []).map(toChatMessage),
      ...(req.document !== undefined ? [{ role: "user", content: req.document }] : []),
    ];
    return ingestResponse(
      c,
      req.stream,
      req.id,
      async (onProgress, signal) => {
        const { ingest, ...info } = await sessions.create({ tenant: tenantOf(c), id: req.id, messages, templateKwargs: req.chat_template_kwargs, onProgress, signal });
        return { ...info, ingest: ingestJson(ingest) };
      },
      201,
    );
  });

  app.get("/v1/sessions", async (c) => c.json({ object: "list", data: await sessions.list(tenantOf(c)) }));

  app.get("/v1/sessions/:id", async (c) => c.json(await sessions.info(tenantOf(c), c.req.param("id"))));

  app.post("/v1/sessions/:id/fork", async (c) => {
    // The body is optional: no body forks under a generated id.
    const req = (await c.req.text()).trim() ? await kit.parse(c, forkSessionSchema) : {};
    return c.json({ ...(await sessions.fork(tenantOf(c), c.req.param("id"), { id: req.id })), forked_from: c.req.param("id") }, 201);
  });

  app.delete("/v1/sessions/:id", async (c) => {
    const id = c.req.param("id");
    await sessions.delete(tenantOf(c), id);
    return c.json({ id, object: "session.deleted", deleted: true });
  });

  app.post("/v1/sessions/:id/messages", async (c) => {
    const id = c.req.param("id");
    const req = await kit.parse(c, sessionMessageSchema);
    kit.checkModel(req.model);
    const message = toChatMessage({ role: req.role, content: req.content });
    const abort = clientAbort(c);
    await sessions.assertReady(tenantOf(c), id);
    const tools = req.tools ?? null;
    const turn = { ...kit.generationOf(req, kit.maxTokensOf(req.max_completion_tokens ?? req.max_tokens), abort.signal), messages: (current: ChatMessage[]) => [...current, message], tools };
    return respondChat(kit, c, {
      run: (onDelta, onToken) => sessions.turn(tenantOf(c), id, { ...turn, onToken }, onDelta),
      abort,
      stream: req.stream === true,
      includeUsage: req.stream_options?.include_usage === true,
      functions: new Set((tools ?? []).map((t) => t.function.name)),
      extra: { session_id: id },
    });
  });

  app.post("/v1/sessions/:id/append", async (c) => {
    const id = c.req.param("id");
    const req = await kit.parse(c, appendSchema);
    if (req.tokens) engine.checkTokenIds(req.tokens, "tokens");
    // Token ids join the conversation as their text: the session's history is always its rendered messages.
    const text = req.tokens ? await engine.decodeIds(req.tokens) : req.text!;
    const message = toChatMessage({ role: req.role, content: text });
    await sessions.assertReady(tenantOf(c), id);
    return ingestResponse(
      c,
      req.stream,
      id,
      async (onProgress, signal) => {
        const { ingest, ...info } = await sessions.append(tenantOf(c), id, message, onProgress, signal);
        return { ...info, ingest: ingestJson(ingest) };
      },
      200,
    );
  });

  app.get("/v1/sessions/:id/snapshot", async (c) => {
    const id = c.req.param("id");
    const { stream, bytes } = await sessions.download(tenantOf(c), id);
    return new Response(stream, {
      headers: {
        "content-type": "application/vnd.ultralong.snapshot+msgpack",
        "content-length": String(bytes),
        "content-disposition": `attachment; filename="${id}.ulsnap"`,
      },
    });
  });

  app.put("/v1/sessions/:id/snapshot", async (c) => {
    const id = c.req.param("id");
    const declared = Number(c.req.header("content-length") ?? NaN);
    if (declared > maxSnapshotBytes) throw new SnapshotError("too_large", `the upload of ${declared} bytes passes the ${maxSnapshotBytes}-byte limit for snapshots`);
    const body = c.req.raw.body;
    if (!body) throw badRequest("the request has no body: send the snapshot file as the body", null, "missing_body");
    const { replaced, ...info } = await sessions.upload(tenantOf(c), id, body, maxSnapshotBytes);
    return c.json(info, replaced ? 200 : 201);
  });
}
