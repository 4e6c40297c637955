/** `bun run serve`: Bun.serve in front of the Hono app. */
import { createServerOrExit, exitOnSignals, startupLine } from "../server.ts";

const server = await createServerOrExit(process.env, process.argv.slice(2), process.exit);
const { app, config } = server;
// idleTimeout 0: a long non-streaming generation sends nothing for a while and must not be cut off.
const listener = Bun.serve({ fetch: app.fetch, hostname: config.host, port: config.port, idleTimeout: 0 });
console.log(startupLine(server, `bun ${Bun.version}`, `http://${config.host}:${listener.port}`));

exitOnSignals(server, {
  // stop(false): close the listening socket, let in-flight requests finish; resolves when they have.
  stopListening: () => listener.stop(false),
  exit: process.exit,
  onSignal: (signal, handler) => process.on(signal, handler),
});
