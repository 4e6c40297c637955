/** `deno task serve`: Deno.serve in front of the Hono app. */
import { createServerOrExit, exitOnSignals, startupLine } from "../server.ts";

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

const server = await createServerOrExit(Deno.env.toObject(), Deno.args, Deno.exit);
const { app, config } = server;
const listener = Deno.serve({ hostname: config.host, port: config.port, onListen: () => {} }, app.fetch);
console.log(startupLine(server, `deno ${Deno.version.deno}`, `http://${config.host}:${listener.addr.port}`));

exitOnSignals(server, {
  // shutdown(): stop accepting, let in-flight requests finish; resolves when they have.
  stopListening: () => listener.shutdown(),
  exit: Deno.exit,
  onSignal: (signal, handler) => Deno.addSignalListener(signal, handler),
});
