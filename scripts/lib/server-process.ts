/** A server process started on a free port, found by the line where it says it listens (tests and benchmarks). */
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";

const REPO = fileURLToPath(new URL("../../", import.meta.url));

export interface ServerProcess {
  url: string;
  child: ChildProcess;
  output: () => string;
}

/**
 * Starts `cmd args` in the repo and resolves once it prints "listening on http://host:port"; rejects (and
 * kills it) if that takes longer than `timeoutMs`, or if it exits first.
 */
export function startProcess(cmd: string, args: string[], env: Record<string, string> = {}, timeoutMs = 60_000): Promise<ServerProcess> {
  const child = spawn(cmd, args, { cwd: REPO, env: { ...process.env, NO_COLOR: "1", ...env }, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`no listening line within ${timeoutMs / 1000} s:\n${output}`));
    }, timeoutMs);
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      const m = /[Ll]istening on (http:\/\/[\w.:[\]]+?:\d+)/.exec(output);
      if (m) {
        clearTimeout(timer);
        resolve({ url: m[1]!, child, output: () => output });
      }
    };
    child.stdout!.on("data", onData);
    child.stderr!.on("data", onData);
    // "close", not "exit": close waits for stdout and stderr to end, so the message printed just before
    // exiting is in `output` (exit can fire first, with the pipe still unread).
    child.on("close", (code) => {
      clearTimeout(timer);
      reject(new Error(`exited with ${code} before listening:\n${output}`));
    });
  });
}
