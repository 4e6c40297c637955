/** Server processes for tests: started on a free port, found by the line where they say they listen. */
import { join } from "node:path";
import { startProcess } from "../../scripts/lib/server-process.ts";
import { REPO } from "./model.ts";

export { startProcess, type ServerProcess } from "../../scripts/lib/server-process.ts";

export const bin = (name: string) => join(REPO, "node_modules", ".bin", name);

/** The Bun entry point with these flags. */
export const startBunServer = (args: string[]) => startProcess(bin("bun"), ["src/entry/bun.ts", ...args]);
