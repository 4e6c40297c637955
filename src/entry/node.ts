/** `npm run serve:node`: @hono/node-server in front of the Hono app. */
import { serve } from "@hono/node-server";
import type { Server as HttpServer } from "node:http";
import type { AddressInfo } from "node:net";
import { createServerOrExit, exitOnSignals, startupLine } from "../server.ts";

const server = await createServerOrExit(process.env, process.argv.slice(2), process.exit);
const { app, config } = server;
const listener = serve({ fetch: app.fetch, hostname: config.host, port: config.port }, (info: AddressInfo) => {
  console.log(startupLine(server, `node ${process.version}`, `http://${config.host}:${info.port}`));
}) as HttpServer;
// A long non-streaming generation sends nothing for a while: no whole-request timeout. A socket silent
// both ways for --idle-timeout-s is closed, except one whose request a generation has exempted.
listener.requestTimeout = 0;
listener.timeout = config.idleTimeoutS * 1000;
server.idle.exempt = (c) => (c.env as { incoming: { socket: { setTimeout(ms: number): void } } }).incoming.socket.setTimeout(0);

exitOnSignals(server, {
  stopListening: () =>
    new Promise<void>((resolve) => {
      // close() stops accepting and calls back once every connection has ended; a kept-alive connection
      // that goes idle after its last response would hold it until its keep-alive timeout, so close those
      // as they become idle.
      const sweep = setInterval(() => listener.closeIdleConnections(), 100);
      listener.close(() => {
        clearInterval(sweep);
        resolve();
      });
      listener.closeIdleConnections();
    }),
  exit: process.exit,
  onSignal: (signal, handler) => process.on(signal, handler),
});
