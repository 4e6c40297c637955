/**
 * The snapshot format: round trips, and refusal of everything else with its cause named. Uploads go
 * through the real HTTP app onto an existing session, which must come through every refusal untouched.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { Packr, Unpackr } from "msgpackr";
import { rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { crc32 } from "node:zlib";
import { Engine } from "../runtime/index.ts";
import { KvCache } from "../runtime/kv-cache.ts";
import { assertPlainMsgpack, MsgpackShapeError } from "../runtime/msgpack-guard.ts";
import { decodeSnapshot, encodeSnapshot, SNAPSHOT_MAGIC, type ByteSource, type SnapshotData } from "../runtime/snapshot.ts";
import { FileByteSource } from "../runtime/snapshot-store.ts";
import { buildModelFolder } from "../scripts/lib/model-folder.ts";
import { TINY_LLAMA_CONFIG } from "../scripts/lib/onnx-llama.ts";
import { engineOptions, sharedEngine } from "./helpers/model.ts";
import { snapshotDataOf } from "./helpers/snapshot-data.ts";
import { sessionApp, tempDir } from "./helpers/sessions.ts";

const engine = await sharedEngine();
const DATE = { date_string: "26 Jul 2024" };
const GREEDY = { temperature: 0, max_tokens: 8 };

function memorySource(bytes: Uint8Array): ByteSource {
  let at = 0;
  return {
    async read(n) {
      const out = bytes.subarray(at, Math.min(bytes.length, at + n));
      at += out.length;
      return out.slice();
    },
  };
}

const concat = (chunks: Iterable<Uint8Array>) => {
  const list = [...chunks];
  const out = new Uint8Array(list.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of list) {
    out.set(c, at);
    at += c.length;
  }
  return out;
};

/** Frames of a snapshot file: [u32 length][u32 crc][payload]. */
function frames(bytes: Uint8Array): { start: number; end: number; payload: Uint8Array }[] {
  const out = [];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = SNAPSHOT_MAGIC.length;
  while (at < bytes.length) {
    const length = view.getUint32(at, true);
    out.push({ start: at, end: at + 8 + length, payload: bytes.subarray(at + 8, at + 8 + length) });
    at += 8 + length;
  }
  return out;
}

function frameBytes(payload: Uint8Array, crc = crc32(payload)): Uint8Array {
  const out = new Uint8Array(8 + payload.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, payload.length, true);
  view.setUint32(4, crc, true);
  out.set(payload, 8);
  return out;
}

/** The snapshot with frame `index` replaced by `payload` (a correct checksum unless one is given). */
function replaceFrame(bytes: Uint8Array, index: number, payload: Uint8Array): Uint8Array {
  const f = frames(bytes)[index]!;
  return concat([bytes.subarray(0, f.start), frameBytes(payload), bytes.subarray(f.end)]);
}

const unpackr = new Unpackr({ useRecords: false });
const packr = new Packr({ useRecords: false });

describe("snapshot codec", () => {
  const filled = (dtype: "float32" | "float16", length: number) => {
    const cache = new KvCache(dtype, 3, 2, 4);
    const make = (seed: number) => {
      const a = dtype === "float16" ? new Uint16Array(2 * length * 4) : new Float32Array(2 * length * 4);
      for (let i = 0; i < a.length; i++) a[i] = dtype === "float16" ? (i * 31 + seed) & 0xffff : Math.sin(i + seed);
      return a;
    };
    const positions = Int32Array.from({ length }, (_, i) => i * 3 + 5); // compacted-looking positions survive
    cache.assign([make(1), make(2), make(3)], [make(4), make(5), make(6)], positions, length, positions[length - 1]! + 10);
    return cache;
  };
  const data = (cache: KvCache, tokens: number): SnapshotData =>
    snapshotDataOf(cache, Int32Array.from({ length: tokens }, (_, i) => 1000 + i), cache.layerArrays(), {
      messages: [{ role: "user", content: "hi" }],
      templateKwargs: { date_string: "1 Jan 2025" },
    });
  const expectation = { fingerprint: "f", modelId: "m", layers: 3, kvHeads: 2, headDim: 4, maxTokens: 10_000, vocabSize: 128256 };

  for (const dtype of ["float32", "float16"] as const) {
    test(`${dtype}: encode then decode gives the same tokens, positions, KV and meta (chunks not dividing the length)`, async () => {
      const cache = filled(dtype, 77);
      const original = data(cache, 80);
      const bytes = concat(encodeSnapshot(original, 10));
      expect(frames(bytes).length).toBe(1 + 8 + 8 + 8 * 3 * 2 + 1);
      const back = await decodeSnapshot(memorySource(bytes), { ...expectation, kvDtype: dtype });
      expect(Array.from(back.tokens)).toEqual(Array.from(original.tokens));
      expect(Array.from(back.positions)).toEqual(Array.from(original.positions));
      expect(back.nextPosition).toBe(original.nextPosition);
      for (let l = 0; l < 3; l++) {
        expect(Array.from(back.keys[l]!)).toEqual(Array.from(original.keys[l]!));
        expect(Array.from(back.values[l]!)).toEqual(Array.from(original.values[l]!));
      }
      expect(back.meta).toEqual(original.meta);
    });
  }

  test("read from a file through buffers smaller than, equal to and larger than its frames: the same data", async () => {
    const cache = filled("float32", 300);
    const original = data(cache, 300);
    const bytes = concat(encodeSnapshot(original, 64)); // kv frames of 64 slots x 8 floats: ~2 KB
    const dir = tempDir("byte-source");
    const file = join(dir, "s.msgpack");
    await writeFile(file, bytes);
    try {
      for (const bufferBytes of [16, 1000, 2077, 5000, 1 << 20]) {
        const source = await FileByteSource.open(file, bufferBytes);
        try {
          const back = await decodeSnapshot(source, { ...expectation, kvDtype: "float32" });
          expect(Array.from(back.tokens)).toEqual(Array.from(original.tokens));
          for (let l = 0; l < 3; l++) {
            expect(Array.from(back.keys[l]!)).toEqual(Array.from(original.keys[l]!));
            expect(Array.from(back.values[l]!)).toEqual(Array.from(original.values[l]!));
          }
        } finally {
          await source.close();
        }
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test("an empty session round-trips", async () => {
    const cache = new KvCache("float32", 3, 2, 4);
    const back = await decodeSnapshot(memorySource(concat(encodeSnapshot(data(cache, 0)))), { ...expectation, kvDtype: "float32" });
    expect(back.length).toBe(0);
    expect(back.tokens.length).toBe(0);
  });
});

describe("msgpack guard", () => {
  test("plain data passes", () => {
    assertPlainMsgpack(packr.pack({ a: [1, -2, 3.5, "x", null, true, { b: new Uint8Array([1, 2]) }], big: 2 ** 40 }));
  });
  test("extension types, hostile lengths, deep nesting, non-string keys and trailing bytes are refused", () => {
    const refuse = (bytes: Uint8Array, why: RegExp) => expect(() => assertPlainMsgpack(bytes)).toThrow(why);
    refuse(new Packr({ useRecords: false, moreTypes: true }).pack({ d: new Date(0) }), /extension type/);
    refuse(new Packr({ useRecords: true }).pack([{ x: 1 }, { x: 2 }]), /extension type/);
    refuse(Uint8Array.of(0xdd, 0xff, 0xff, 0xff, 0xff, 0x01), /declares 4294967295 elements/);
    refuse(Uint8Array.of(0xc6, 0x7f, 0xff, 0xff, 0xff, 0x01), /runs past the end/);
    refuse(new Uint8Array(1000).fill(0x91), /nesting deeper/);
    refuse(Uint8Array.of(0x81, 0x01, 0x02), /not a string/);
    refuse(Uint8Array.of(0xc0, 0xc0), /trailing/);
    refuse(Uint8Array.of(0xc1), /reserved/);
    expect(() => assertPlainMsgpack(Uint8Array.of(0xd4, 0x01, 0x00))).toThrow(MsgpackShapeError);
  });
});

describe("uploads that must be refused, each with its cause, leaving the target session untouched", () => {
  const server = sessionApp(engine, { maxSnapshotBytes: 2 * 1024 * 1024 });
  let good: Uint8Array;
  let victimBefore: unknown;
  let otherDir: string;

  beforeAll(async () => {
    await server.post("/v1/sessions", { id: "source", document: "The lighthouse keeper counted 212 seals.", chat_template_kwargs: DATE });
    await server.post("/v1/sessions/source/messages", { content: "How many?", ...GREEDY });
    good = new Uint8Array(await (await server.app.request("/v1/sessions/source/snapshot")).arrayBuffer());
    await server.post("/v1/sessions", { id: "victim", document: "A different log entirely.", chat_template_kwargs: DATE });
    victimBefore = await (await server.app.request("/v1/sessions/victim")).json();
  });
  afterAll(async () => {
    if (otherDir) await rm(otherDir, { recursive: true, force: true });
  });

  const upload = (body: Uint8Array | ReadableStream<Uint8Array>, id = "victim", headers: Record<string, string> = {}) =>
    server.app.request(`/v1/sessions/${id}/snapshot`, { method: "PUT", body: body as BodyInit, headers });

  async function refused(body: Uint8Array | ReadableStream<Uint8Array>, status: number, code: string, message: RegExp, headers: Record<string, string> = {}) {
    const res = await upload(body, "victim", headers);
    expect(res.status).toBe(status);
    const { error } = (await res.json()) as { error: { code: string; message: string } };
    expect(error.code).toBe(code);
    expect(error.message).toMatch(message);
    // The session the upload aimed at is exactly as it was, and the server goes on serving.
    expect(await (await server.app.request("/v1/sessions/victim")).json()).toEqual(victimBefore);
    expect((await server.post("/v1/chat/completions", { messages: [{ role: "user", content: "ok?" }], max_tokens: 2 })).status).toBe(200);
  }

  test("the unmodified snapshot is accepted (control)", async () => {
    const res = await upload(good, "control");
    expect(res.status).toBe(201);
  });

  test("a flipped byte in a KV chunk: checksum_mismatch", async () => {
    const f = frames(good);
    const kv = f[f.length - 3]!; // a KV frame near the end
    const bad = good.slice();
    bad[kv.end - 5] ^= 0x40;
    await refused(bad, 400, "checksum_mismatch", /frame \d+ fails its CRC-32 check/);
  });

  test("a flipped byte in the magic: not_a_snapshot", async () => {
    const bad = good.slice();
    bad[2] ^= 0x01;
    await refused(bad, 400, "not_a_snapshot", /magic/);
  });

  test("a truncated file: truncated", async () => {
    await refused(good.subarray(0, good.length - 100), 400, "truncated", /frame \d+ has \d+ of its \d+ bytes/);
    const f = frames(good);
    await refused(good.subarray(0, f.at(-1)!.start), 400, "truncated", new RegExp(`ends before frame ${f.length - 1}`));
    await refused(good.subarray(0, f[3]!.start), 400, "truncated", /header promises \d+ bytes of tokens and tensors but the data holds \d+ bytes/);
  });

  test("another format version: unsupported_version", async () => {
    const header = unpackr.unpack(frames(good)[0]!.payload) as Record<string, unknown>;
    await refused(replaceFrame(good, 0, packr.pack({ ...header, version: 4 })), 400, "unsupported_version", /format version 4; this server reads versions 1, 2, 3/);
  });

  test("another model's snapshot: model_mismatch", async () => {
    otherDir = tempDir("other-model");
    await buildModelFolder(join(otherDir, "other"), TINY_LLAMA_CONFIG, undefined, { seed: 99 });
    const other = await Engine.load(engineOptions({ modelDir: join(otherDir, "other") }));
    const elsewhere = sessionApp(other);
    await elsewhere.post("/v1/sessions", { id: "theirs", document: "Same shapes, other weights.", chat_template_kwargs: DATE });
    const theirs = new Uint8Array(await (await elsewhere.app.request("/v1/sessions/theirs/snapshot")).arrayBuffer());
    await other.close();
    await refused(theirs, 400, "model_mismatch", /made by model other \(fingerprint [0-9a-f]+\); this server runs random/);
  });

  test("an oversize upload: 413, whether announced by content-length or only streamed", async () => {
    const big = new Uint8Array(3 * 1024 * 1024);
    big.set(good);
    await refused(big, 413, "too_large", /upload of 3145728 bytes passes the 2097152-byte limit/, { "content-length": String(big.length) });
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        for (let i = 0; i < 3; i++) controller.enqueue(new Uint8Array(1024 * 1024));
        controller.close();
      },
    });
    await refused(stream, 413, "too_large", /passes the 2097152-byte limit/);
  });

  test("malicious msgpack: extension objects, a lying array length, deep nesting, prototype keys, a huge frame length", async () => {
    const header = unpackr.unpack(frames(good)[0]!.payload) as Record<string, any>;
    const withDate = new Packr({ useRecords: false, moreTypes: true }).pack({ ...header, meta: { ...header.meta, createdAt: new Date(0) } });
    await refused(replaceFrame(good, 0, withDate), 400, "malformed", /extension type/);
    const withRecords = new Packr({ useRecords: true }).pack({ ...header, meta: { ...header.meta, messages: [{ role: "a", content: "b" }, { role: "c", content: "d" }] } });
    await refused(replaceFrame(good, 0, withRecords), 400, "malformed", /extension type/);
    await refused(replaceFrame(good, 0, Uint8Array.of(0xdd, 0x7f, 0xff, 0xff, 0xff, 0xc0)), 400, "malformed", /declares \d+ elements/);
    await refused(replaceFrame(good, 0, new Uint8Array(5000).fill(0x91)), 400, "malformed", /nesting deeper/);
    // A raw map with a __proto__ key: it must not reach any prototype, and the header is then invalid.
    const proto = concat([Uint8Array.of(0x81, 0xa9), new TextEncoder().encode("__proto__"), Uint8Array.of(0x81, 0xa8), new TextEncoder().encode("polluted"), Uint8Array.of(0xc3)]);
    await refused(replaceFrame(good, 0, proto), 400, "malformed", /header field/);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
    // A KV frame whose data is a string, and a frame header claiming 4 GiB.
    const f = frames(good);
    const kvFrame = unpackr.unpack(f[f.length - 2]!.payload) as Record<string, unknown>;
    await refused(replaceFrame(good, f.length - 2, packr.pack({ ...kvFrame, data: "x".repeat((kvFrame.data as Uint8Array).length) })), 400, "malformed", /missing or out of order/);
    const huge = good.slice();
    new DataView(huge.buffer).setUint32(f[2]!.start, 0xffffffff, true);
    await refused(huge, 400, "malformed", /declares 4294967295 bytes/);
  });

  test("a small file whose header claims a huge cache is refused before anything is allocated for it", async () => {
    const header = unpackr.unpack(frames(good)[0]!.payload) as Record<string, any>;
    const claim = replaceFrame(good.subarray(0, frames(good)[1]!.start), 0, packr.pack({ ...header, tokenCount: 4000, length: 4000 }));
    await refused(claim, 400, "truncated", /header promises \d+ bytes of tokens and tensors but the data holds \d+ bytes/);
  });

  test("frames out of order or missing: malformed", async () => {
    const f = frames(good);
    const swapped = concat([good.subarray(0, f[1]!.start), good.subarray(f[2]!.start, f[2]!.end), good.subarray(f[1]!.start, f[1]!.end), good.subarray(f[2]!.end)]);
    await refused(swapped, 400, "malformed", /missing or out of order/);
    const extra = concat([good, frameBytes(packr.pack({ t: "end", frames: 0 }))]);
    await refused(extra, 400, "malformed", /continues after the end frame/);
  });

  /** Index and decoded payload of the first data frame of kind `t` ("tokens", "positions", "kv"). */
  const firstFrame = (t: string) => {
    const f = frames(good);
    const index = f.findIndex((x, i) => i > 0 && (unpackr.unpack(x.payload) as { t: string }).t === t);
    return { index, frame: unpackr.unpack(f[index]!.payload) as Record<string, any> };
  };

  test("what can be checked cheaply is checked: token ids, positions, finite KV, messages, template variables", async () => {
    // A token id outside the vocabulary (checksums recomputed: only the content is wrong).
    const tokens = firstFrame("tokens");
    const ids = new Int32Array(tokens.frame.data.slice().buffer);
    ids[3] = engine.info.vocabSize + 5;
    await refused(replaceFrame(good, tokens.index, packr.pack({ ...tokens.frame, data: new Uint8Array(ids.buffer) })), 400, "malformed", /token 3 is id \d+, outside the vocabulary/);
    // A negative first position.
    const positions = firstFrame("positions");
    const pos = new Int32Array(positions.frame.data.slice().buffer);
    pos[0] = -7;
    await refused(replaceFrame(good, positions.index, packr.pack({ ...positions.frame, data: new Uint8Array(pos.buffer) })), 400, "malformed", /negative position -7/);
    // NaN and infinity in the KV.
    const kv = firstFrame("kv");
    for (const bad of [NaN, Infinity]) {
      const values = new Float32Array(kv.frame.data.slice().buffer);
      values[1] = bad;
      await refused(replaceFrame(good, kv.index, packr.pack({ ...kv.frame, data: new Uint8Array(values.buffer) })), 400, "malformed", /not finite/);
    }
    // Messages and template variables the API would not take.
    const header = unpackr.unpack(frames(good)[0]!.payload) as Record<string, any>;
    const withMeta = (meta: Record<string, unknown>) => replaceFrame(good, 0, packr.pack({ ...header, meta: { ...header.meta, ...meta } }));
    await refused(withMeta({ messages: [{ role: "root", content: "x" }] }), 400, "malformed", /header field meta\.messages\.0\.role/);
    await refused(withMeta({ messages: [{ role: "user", content: 42 }] }), 400, "malformed", /header field meta\.messages\.0\.content/);
    let deep: unknown = 1;
    for (let i = 0; i < 32; i++) deep = [deep];
    await refused(withMeta({ templateKwargs: { date_string: "1 Jan 2025", deep } }), 400, "malformed", /at most 32 levels of nesting/);
    await refused(withMeta({ templateKwargs: { add_generation_prompt: false } }), 400, "malformed", /replaces one the server sets/);
  });
});
