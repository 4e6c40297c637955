/** `npm run serve:node`: @hono/node-server in front of the Hono app. */
import { serve } from "@hono/node-server";
import type { AddressInfo } from "node:net";
import { createServerOrExit, startupLine } from "../server.ts";

const server = await createServerOrExit(process.env, process.argv.slice(2), process.exit);
const { app, engine, config } = server;
const listener = serve({ fetch: app.fetch, hostname: config.host, port: config.port }, (info: AddressInfo) => {
  console.log(startupLine(server, `node ${process.version}`, `http://${config.host}:${info.port}`));
});
// A long non-streaming generation sends nothing for a while: no request timeout.
(listener as unknown as { requestTimeout: number }).requestTimeout = 0;

const shutdown = () => {
  listener.close(async () => {
    await engine.close();
    process.exit(0);
  });
};
process.on("SIGINT", shutdown);
process.on("SIGTERM", shutdown);
