/** `deno task serve`: Deno.serve in front of the Hono app. */
import { createServer, reportStartupFailure, startupLine } from "../server.ts";

declare const Deno: {
  env: { toObject(): Record<string, string> };
  args: string[];
  version: { deno: string };
  exit(code: number): never;
  serve(
    options: { hostname: string; port: number; onListen?: (addr: { port: number }) => void },
    handler: (req: Request) => Response | Promise<Response>,
  ): { shutdown(): Promise<void>; addr: { port: number } };
  addSignalListener(signal: string, handler: () => void): void;
};

let server;
try {
  server = await createServer(Deno.env.toObject(), Deno.args);
} catch (e) {
  reportStartupFailure(e);
  Deno.exit(1);
}
const { app, engine, config } = server;
const listener = Deno.serve({ hostname: config.host, port: config.port, onListen: () => {} }, app.fetch);
console.log(startupLine(server, `deno ${Deno.version.deno}`, `http://${config.host}:${listener.addr.port}`));

const shutdown = async () => {
  await listener.shutdown();
  await engine.close();
  Deno.exit(0);
};
Deno.addSignalListener("SIGINT", shutdown);
Deno.addSignalListener("SIGTERM", shutdown);
