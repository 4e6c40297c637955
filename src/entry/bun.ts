/** `bun run serve`: Bun.serve in front of the Hono app. */
import { createServerOrExit, startupLine } from "../server.ts";

const server = await createServerOrExit(process.env, process.argv.slice(2), process.exit);
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
