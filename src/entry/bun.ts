/** `bun run serve`: Bun.serve in front of the Hono app. */
import { createServer, reportStartupFailure, startupLine } from "../server.ts";

let server;
try {
  server = await createServer(process.env, process.argv.slice(2));
} catch (e) {
  reportStartupFailure(e);
  process.exit(1);
}
const { app, engine, config } = server;
// idleTimeout 0: a long non-streaming generation sends nothing for a while and must not be cut off.
const listener = Bun.serve({ fetch: app.fetch, hostname: config.host, port: config.port, idleTimeout: 0 });
console.log(startupLine(server, `bun ${Bun.version}`, `http://${config.host}:${listener.port}`));

const shutdown = async () => {
  await listener.stop(true);
  await engine.close();
  process.exit(0);
};
process.on("SIGINT", shutdown);
process.on("SIGTERM", shutdown);
