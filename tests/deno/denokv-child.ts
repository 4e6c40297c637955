/// <reference lib="deno.unstable" />
/**
 * A second Deno process on the same Deno KV file, for tests/deno/store-denokv.test.ts:
 *
 *   deno run -A --unstable-kv tests/deno/denokv-child.ts <kv path> <session id> <mode>
 *
 * mode "turn": checks it sees the parent's version (the tag on stdin's first line), takes the session's
 * lease, appends under it, prints {token, version}, waits for a line "release" on stdin, releases and exits.
 * mode "hold": takes the lease (ttl 400 ms), prints {token}, and runs until it is killed.
 */
import { DenoKvSessionStore } from "../../runtime/stores/denokv-store.ts";

const [path, id, mode] = Deno.args;
const store = await DenoKvSessionStore.open(path);
const t = store.forTenant("default");
const lines = Deno.stdin.readable.pipeThrough(new TextDecoderStream() as unknown as TransformStream<Uint8Array, string>).getReader();
let pending = "";
async function line(): Promise<string> {
  for (;;) {
    const nl = pending.indexOf("\n");
    if (nl >= 0) {
      const out = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      return out;
    }
    const { value, done } = await lines.read();
    if (done) return pending;
    pending += value;
  }
}
const say = (o: unknown) => console.log(JSON.stringify(o));

if (mode === "turn") {
  const expectTag = (await line()).trim();
  const head = await t.head(id!);
  if (!head || head.tag !== expectTag) throw new Error(`child: expected version ${expectTag}, found ${JSON.stringify(head)}`);
  const lease = await t.lease(id!, { ttlMs: 5000, wait: false });
  const version = await t.append(id!, [new TextEncoder().encode("child turn")], head, { lease });
  say({ token: lease.token, version });
  if ((await line()).trim() !== "release") throw new Error("child: expected release");
  await lease.release();
  await store.close();
} else if (mode === "hold") {
  const lease = await t.lease(id!, { ttlMs: 400, wait: false });
  say({ token: lease.token });
  await new Promise(() => {}); // killed by the parent
} else throw new Error(`unknown mode ${mode}`);
