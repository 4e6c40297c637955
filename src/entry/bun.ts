/** `bun run serve`: Bun.serve in front of the Hono app. */
import { createServerOrExit, exitOnSignals, startupLine } from "../server.ts";

const server = await createServerOrExit(process.env, process.argv.slice(2), process.exit);
const { app, config } = server;
// A connection silent both ways for --idle-timeout-s is closed; a generation lifts it for its own request
// once its body is in (Bun hands the server to fetch as its second argument, which Hono calls env).
const listener = Bun.serve({ fetch: app.fetch, hostname: config.host, port: config.port, idleTimeout: config.idleTimeoutS });
server.idle.exempt = (c) => (c.env as { timeout(request: Request, seconds: number): void }).timeout(c.req.raw, 0);
console.log(startupLine(server, `bun ${Bun.version}`, `http://${config.host}:${listener.port}`));

exitOnSignals(server, {
  // stop(false): close the listening socket, let in-flight requests finish; resolves when they have.
  stopListening: () => listener.stop(false),
  exit: process.exit,
  onSignal: (signal, handler) => process.on(signal, handler),
});
