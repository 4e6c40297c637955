/**
 * The session store on a Redis server (`--session-store redis://host:port[/db]`): for many worker processes
 * (Bun, Node or Deno, through ioredis) on any number of machines sharing one session space.
 *
 * Data model, under `<prefix><tenant>:` (prefix "uls:" by default; `kp` below):
 *
 * - A *blob* is an immutable run of bytes, stored as chunks of at most `chunkBytes` (1 MiB by default)
 *   under `kp blob:<blob>:<n>` (n = 0, 1, ...), with a hash `kp blob:<blob>` {r: versions referring to it,
 *   n: bytes, c: chunk size, k: chunks}. Every save, append or upload writes one new blob.
 * - A session's version is its *head*, the string `kp head:<id>` holding JSON {t: tag, n: bytes, s: segments},
 *   a segment being [blob, bytes, chunk size]: the version's bytes are its segments' in order, each the
 *   first `bytes` of its blob (a truncate cuts the last segment short without copying). An append's head is
 *   the old segments plus the new blob; a fork's is the parent's segments under a new tag.
 * - `kp ids` is the set of the tenant's session ids.
 * - Commits write their blob's chunks first, each with a TTL (`stagingTtlMs`, an hour by default: a writer
 *   that dies leaves nothing for long), then swap the head in one Lua script that checks the lease and the
 *   expected version, makes sure every chunk the new head needs is there, counts the new head's blobs in
 *   (PERSIST on a blob's first reference) and the old head's out; a blob that no head refers to any more is
 *   deleted at once (old versions are collected), unless an open reader pins it (below).
 * - Readers: opening a version pins its blobs (`kp pin:<blob>`, a sorted set of reader ids scored by an
 *   expiry in server time) in the same script that reads the head; the reader renews its pins every
 *   readerTtlMs / 3 and drops them on close. A blob left with no head but pinned is kept, with a TTL to its
 *   last pin's expiry, so a reader that dies pins nothing for long. Reads run ahead of the reader over a
 *   connection of their own (`bufferBytes` in flight), so decoding many small reads is served from memory.
 * - Leases: `kp lease:<id>` holds the holder's fencing token, set with NX semantics and a PX expiry by a
 *   script that takes the token from `kp fence` (INCR: larger than every earlier grant in the tenant, so
 *   in the session); renewed (PEXPIRE) and released (DEL) only while it still holds that token. A commit
 *   under a lease requires the key to hold the lease's token: an expired lease (key gone) or a later one
 *   (another token) is LeaseLost.
 *
 * The scripts touch keys they compute from ARGV (a blob's chunks), which a single Redis server (and its
 * replicas) allows; Redis Cluster does not, unless every key of a tenant shares one hash slot.
 */
import { Buffer } from "node:buffer";
import { createHash, randomBytes } from "node:crypto";
import { Redis } from "ioredis";
import { invalidRequest } from "../errors.ts";
import { readSnapshotSummary, SnapshotError, type SnapshotSummary } from "../snapshot.ts";
import {
  Exists,
  LeaseLost,
  NotFound,
  poll,
  SessionBusy,
  StaleVersion,
  type CommitOptions,
  type Lease,
  type LeaseOptions,
  type SaveOptions,
  type SessionStore,
  type SnapshotReader,
  type StagedSnapshot,
  type StoreVersion,
  type TenantStore,
  NAME_PATTERN as NAME,
} from "../session-store.ts";

export interface RedisStoreOptions {
  /** Largest chunk value (1 MiB by default). */
  chunkBytes?: number;
  /** Prepended to every key ("uls:" by default): several stores can share one Redis database. */
  prefix?: string;
  /** How long chunks written but not (yet) committed live: a staged upload, or a save whose writer died (an hour by default). */
  stagingTtlMs?: number;
  /** How long an open reader keeps its version's chunks past its last renewal (a reader whose process died; 60 s by default). */
  readerTtlMs?: number;
}

const MIB = 1 << 20;
/** Chunk writes in flight at once per writer. */
const WRITES_IN_FLIGHT = 8;
/** Default bytes a reader fetches ahead of what it has handed out. */
const READ_AHEAD = 8 * MIB;
/** Margin (ms) added to TTLs that follow a pin's expiry. */
const GRACE_MS = 1000;
const EMPTY = new Uint8Array(0);

/** [blob id, bytes of the blob this segment covers (a prefix), the blob's chunk size] */
type Segment = [blob: string, bytes: number, chunk: number];
/** A blob just written and not yet counted by any head: [blob id, bytes, chunk size, chunks]. */
type FreshBlob = [blob: string, bytes: number, chunk: number, chunks: number];
interface Head {
  t: string;
  n: number;
  s: Segment[];
}

const randomId = () => randomBytes(12).toString("hex");

function parseHead(json: string): Head {
  const h = JSON.parse(json) as { t: string; n: number; s: Segment[] | Record<string, never> };
  // Lua's cjson writes an empty list as {}.
  return { t: h.t, n: h.n, s: Array.isArray(h.s) ? h.s : [] };
}

const versionOf = (h: Head): StoreVersion => ({ tag: h.t, bytes: h.n });

// ---------------------------------------------------------------------------------------------------------
// Lua. Every script's ARGV[1] is the tenant's key prefix.

const PRELUDE = `
local kp = ARGV[1]
local GRACE = ${GRACE_MS}
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function mkey(b) return kp .. 'blob:' .. b end
local function ckey(b, i) return kp .. 'blob:' .. b .. ':' .. i end
local function pkey(b) return kp .. 'pin:' .. b end
local function nchunks(b) return tonumber(redis.call('HGET', mkey(b), 'k')) or 0 end
-- Gives a blob and its chunks a TTL (ms), or none (ttl nil).
local function expire_blob(b, ttl)
  local k = nchunks(b)
  if ttl then
    redis.call('PEXPIRE', mkey(b), ttl)
    for i = 0, k - 1 do redis.call('PEXPIRE', ckey(b, i), ttl) end
  else
    redis.call('PERSIST', mkey(b))
    for i = 0, k - 1 do redis.call('PERSIST', ckey(b, i)) end
  end
end
-- A blob that no head refers to: deleted now, or kept (with a TTL) until the pins of its open readers expire.
local function collect(b, now)
  local pk = pkey(b)
  redis.call('ZREMRANGEBYSCORE', pk, '-inf', now)
  local last = redis.call('ZRANGE', pk, -1, -1, 'WITHSCORES')
  if last[2] then
    expire_blob(b, math.floor(tonumber(last[2]) - now) + GRACE)
  else
    local k = nchunks(b)
    for i = 0, k - 1 do redis.call('UNLINK', ckey(b, i)) end
    redis.call('UNLINK', mkey(b), pk)
  end
end
local function decref(b, now)
  if redis.call('EXISTS', mkey(b)) == 0 then return end
  if redis.call('HINCRBY', mkey(b), 'r', -1) <= 0 then collect(b, now) end
end
local function pin(b, reader, now, ttl)
  local pk = pkey(b)
  redis.call('ZADD', pk, now + ttl, reader)
  if redis.call('PTTL', pk) < ttl + GRACE then redis.call('PEXPIRE', pk, ttl + GRACE) end
  -- A blob no head refers to any more lives as long as its last pin.
  if redis.call('HGET', mkey(b), 'r') == '0' and redis.call('PTTL', mkey(b)) < ttl + GRACE then expire_blob(b, ttl + GRACE) end
end
`;

/**
 * The commit: KEYS = head, ids, lease; ARGV = kp, id, expect ('any' | 'none' | 'tag'), expected tag, lease
 * token ('' for none), op ('check' | 'set' | 'append' | 'delete'), new tag, segments (JSON: the new head's,
 * or for 'append' those added), fresh blobs (JSON). Returns {'ok', head JSON or false} or {refusal}.
 */
const COMMIT = `${PRELUDE}
if ARGV[5] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[5] then return {'lease'} end
local cur = redis.call('GET', KEYS[1])
local old = nil
if cur then old = cjson.decode(cur) end
-- The same commit again (a reply lost, the command sent again): it is done.
if old and old.t == ARGV[7] then return {'ok', cur} end
if ARGV[3] == 'none' and old then return {'exists'} end
if ARGV[3] == 'tag' and (not old or old.t ~= ARGV[4]) then return {'stale'} end
local op = ARGV[6]
if op == 'check' then return {'ok', false} end
local now = now_ms()
if op == 'delete' then
  if old then
    redis.call('DEL', KEYS[1])
    redis.call('SREM', KEYS[2], ARGV[2])
    for _, s in ipairs(old.s) do decref(s[1], now) end
  end
  return {'ok', false}
end
local fresh = {}
for _, f in ipairs(cjson.decode(ARGV[9])) do fresh[f[1]] = f end
local segs = {}
if op == 'append' then
  if not old then return {'stale'} end
  for _, s in ipairs(old.s) do segs[#segs + 1] = s end
end
for _, s in ipairs(cjson.decode(ARGV[8])) do segs[#segs + 1] = s end
-- Every blob of the new head must be whole: counted by a head already, or all its chunks still there.
for _, s in ipairs(segs) do
  local b = s[1]
  local r = redis.call('HGET', mkey(b), 'r')
  if not r or tonumber(r) <= 0 then
    local k
    if r then k = nchunks(b) elseif fresh[b] then k = fresh[b][4] else return {'gone'} end
    for i = 0, k - 1 do
      if redis.call('EXISTS', ckey(b, i)) == 0 then return {'gone'} end
    end
  end
end
local bytes = 0
for _, s in ipairs(segs) do
  local b = s[1]
  local m = mkey(b)
  if redis.call('EXISTS', m) == 0 then
    local f = fresh[b]
    redis.call('HSET', m, 'r', 0, 'n', f[2], 'c', f[3], 'k', f[4])
  end
  if redis.call('HINCRBY', m, 'r', 1) == 1 then expire_blob(b, nil) end
  bytes = bytes + s[2]
end
local head = cjson.encode({t = ARGV[7], n = bytes, s = segs})
redis.call('SET', KEYS[1], head)
redis.call('SADD', KEYS[2], ARGV[2])
if old then
  for _, s in ipairs(old.s) do decref(s[1], now) end
end
return {'ok', head}
`;

/** KEYS = from's head, to's head, ids; ARGV = kp, to, new tag. */
const FORK = `${PRELUDE}
local cur = redis.call('GET', KEYS[1])
if not cur then return {'notfound'} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'exists'} end
local h = cjson.decode(cur)
for _, s in ipairs(h.s) do redis.call('HINCRBY', mkey(s[1]), 'r', 1) end
h.t = ARGV[3]
local head = cjson.encode(h)
redis.call('SET', KEYS[2], head)
redis.call('SADD', KEYS[3], ARGV[2])
return {'ok', head}
`;

/** Opens a version: KEYS = head; ARGV = kp, reader id, ttl. Returns the head, its blobs pinned, or nil. */
const OPEN = `${PRELUDE}
local cur = redis.call('GET', KEYS[1])
if not cur then return false end
local now = now_ms()
local ttl = tonumber(ARGV[3])
for _, s in ipairs(cjson.decode(cur).s) do pin(s[1], ARGV[2], now, ttl) end
return cur
`;

/** ARGV = kp, reader id, ttl, blobs... */
const RENEW_PINS = `${PRELUDE}
local now = now_ms()
local ttl = tonumber(ARGV[3])
for i = 4, #ARGV do
  if redis.call('ZSCORE', pkey(ARGV[i]), ARGV[2]) then pin(ARGV[i], ARGV[2], now, ttl) end
end
return 1
`;

/** ARGV = kp, reader id, blobs... */
const UNPIN = `${PRELUDE}
local now = now_ms()
for i = 3, #ARGV do
  local b = ARGV[i]
  redis.call('ZREM', pkey(b), ARGV[2])
  if redis.call('HGET', mkey(b), 'r') == '0' then collect(b, now) end
end
return 1
`;

/** Deletes a written blob that no commit adopted: ARGV = kp, blob, chunks. */
const DISCARD = `${PRELUDE}
if redis.call('EXISTS', mkey(ARGV[2])) == 1 then return 0 end
for i = 0, tonumber(ARGV[3]) - 1 do redis.call('UNLINK', ckey(ARGV[2], i)) end
return 1
`;

/** KEYS = lease, fence counter; ARGV = ttl. Returns the new token, or nil if the lease is held. */
const ACQUIRE = `
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
`;

/** KEYS = lease; ARGV = token, ttl. */
const RENEW = `
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
`;

/** KEYS = lease; ARGV = token. */
const RELEASE = `
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
`;

/** A Lua script run by EVALSHA, loaded with EVAL where the server does not have it yet. */
class Script {
  private readonly sha: string;
  constructor(private readonly lua: string) {
    this.sha = createHash("sha1").update(lua).digest("hex");
  }

  async run(conn: Redis, keys: string[], args: (string | number)[]): Promise<unknown> {
    try {
      return await conn.evalsha(this.sha, keys.length, ...keys, ...args);
    } catch (e) {
      if (!String((e as Error)?.message).startsWith("NOSCRIPT")) throw e;
      return await conn.eval(this.lua, keys.length, ...keys, ...args);
    }
  }
}

const SCRIPTS = {
  commit: new Script(COMMIT),
  fork: new Script(FORK),
  open: new Script(OPEN),
  renewPins: new Script(RENEW_PINS),
  unpin: new Script(UNPIN),
  discard: new Script(DISCARD),
  acquire: new Script(ACQUIRE),
  renew: new Script(RENEW),
  release: new Script(RELEASE),
};

function unrefTimer(timer: unknown): void {
  (timer as { unref?: () => void } | null)?.unref?.();
}

// ---------------------------------------------------------------------------------------------------------

interface Settings {
  chunkBytes: number;
  prefix: string;
  stagingTtlMs: number;
  readerTtlMs: number;
}

export class RedisSessionStore implements SessionStore {
  readonly description: string;
  /** Leases and readers of this handle, whose renewals close() stops. */
  readonly timers = new Set<{ halt(): void }>();
  private readonly tenants = new Map<string, RedisTenantStore>();
  private closing: Promise<void> | null = null;

  private constructor(
    /** Heads, scripts, leases. */
    readonly ctl: Redis,
    /** Chunk reads and writes (bulk traffic does not hold up lease renewals). */
    readonly data: Redis,
    description: string,
    readonly settings: Settings,
  ) {
    this.description = description;
  }

  static async connect(url: string, options: RedisStoreOptions = {}): Promise<RedisSessionStore> {
    const settings: Settings = {
      chunkBytes: options.chunkBytes ?? MIB,
      prefix: options.prefix ?? "uls:",
      stagingTtlMs: options.stagingTtlMs ?? 3_600_000,
      readerTtlMs: options.readerTtlMs ?? 60_000,
    };
    if (!Number.isInteger(settings.chunkBytes) || settings.chunkBytes < 1 || settings.chunkBytes > 512 * MIB) {
      throw new RangeError(`chunkBytes must be an integer from 1 to ${512 * MIB}`);
    }
    for (const ms of [settings.stagingTtlMs, settings.readerTtlMs]) {
      if (!Number.isInteger(ms) || ms < 1) throw new RangeError("TTLs are whole milliseconds, at least 1");
    }
    const description = describeUrl(url);
    const open = async (role: string): Promise<Redis> => {
      const conn = new Redis(url, { lazyConnect: true, connectionName: `ultralong-serve-${role}` });
      let lastError: unknown = null;
      conn.on("error", (e) => (lastError = e)); // reconnects on its own; without a listener ioredis logs each
      try {
        await conn.connect();
      } catch (e) {
        conn.disconnect();
        throw new Error(`cannot connect to the session store ${description}: ${(e as Error)?.message ?? lastError}`);
      }
      return conn;
    };
    const ctl = await open("ctl");
    let data: Redis;
    try {
      data = await open("data");
    } catch (e) {
      ctl.disconnect();
      throw e;
    }
    return new RedisSessionStore(ctl, data, description, settings);
  }

  forTenant(tenant: string): TenantStore {
    return this.tenant(tenant);
  }

  /** The tenant's store, with its internals (tests count its keys by `keyPrefix`). */
  tenant(tenant: string): RedisTenantStore {
    if (!NAME.test(tenant)) throw invalidRequest("a tenant name is 1-64 letters, digits, '_' or '-'", "tenant");
    let t = this.tenants.get(tenant);
    if (!t) this.tenants.set(tenant, (t = new RedisTenantStore(this, `${this.settings.prefix}${tenant}:`)));
    return t;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      for (const t of [...this.timers]) t.halt();
      await Promise.all(
        [this.ctl, this.data].map(async (conn) => {
          try {
            await conn.quit();
          } catch {
            conn.disconnect();
          }
        }),
      );
    })();
    return this.closing;
  }
}

/** The URL without credentials or options. */
function describeUrl(url: string): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}${u.pathname === "/" ? "" : u.pathname}`;
  } catch {
    throw new RangeError("a Redis session store is given as redis://[user:password@]host[:port][/db] (or rediss://)");
  }
}

function assertId(id: string): void {
  if (!NAME.test(id)) throw invalidRequest("a session id is 1-64 letters, digits, '_' or '-'", "id");
}

/** One piece of a version to fetch: a chunk key, and how many of its first bytes belong to the version. */
interface Piece {
  key: string;
  bytes: number;
  /** The chunk holds exactly these bytes (GET), or more (GETRANGE). */
  whole: boolean;
}

function piecesOf(kp: string, segments: Segment[]): Piece[] {
  const pieces: Piece[] = [];
  for (const [blob, bytes, chunk] of segments) {
    for (let i = 0; i * chunk < bytes; i++) {
      const n = Math.min(chunk, bytes - i * chunk);
      pieces.push({ key: `${kp}blob:${blob}:${i}`, bytes: n, whole: n === chunk });
    }
  }
  return pieces;
}

async function fetchPiece(conn: Redis, piece: Piece, start = 0, end = piece.bytes): Promise<Uint8Array> {
  const got = start === 0 && end === piece.bytes && piece.whole ? await conn.getBuffer(piece.key) : await conn.getrangeBuffer(piece.key, start, end - 1);
  if (!got || got.length !== end - start) {
    throw new Error(`the session store lost part of a version being read (${piece.key}): it expired or was collected`);
  }
  return new Uint8Array(got.buffer, got.byteOffset, got.length);
}

/** Sequential reads of a version's pieces, fetched ahead. */
class RedisReader implements SnapshotReader {
  private next = 0;
  private readonly ahead: { piece: Piece; bytes: Promise<Uint8Array> }[] = [];
  private aheadBytes = 0;
  private current: Uint8Array = EMPTY;
  private at = 0;
  private position = 0;
  private scratch: Uint8Array = EMPTY;
  private starts: number[] | null = null;

  constructor(
    private readonly conn: Redis,
    readonly version: StoreVersion,
    private readonly pieces: Piece[],
    private readonly bufferBytes: number,
    private readonly onClose: () => Promise<void> = async () => {},
  ) {}

  get size(): number {
    return this.version.bytes;
  }

  private fill(): void {
    while (this.next < this.pieces.length && (this.ahead.length < 2 || this.aheadBytes < this.bufferBytes)) {
      const piece = this.pieces[this.next++]!;
      const bytes = fetchPiece(this.conn, piece);
      bytes.catch(() => {}); // awaited when its turn comes (or never, after close)
      this.ahead.push({ piece, bytes });
      this.aheadBytes += piece.bytes;
    }
  }

  /** Makes the next piece current; false at the end. */
  private async advance(): Promise<boolean> {
    this.fill();
    const next = this.ahead.shift();
    if (!next) return false;
    this.aheadBytes -= next.piece.bytes;
    this.fill();
    this.current = await next.bytes;
    this.at = 0;
    return true;
  }

  async read(n: number, out?: Uint8Array): Promise<Uint8Array> {
    const want = Math.max(0, Math.min(n, this.size - this.position));
    const dest = out ?? new Uint8Array(want);
    let filled = 0;
    while (filled < want) {
      if (this.at === this.current.length && !(await this.advance())) break;
      const take = Math.min(want - filled, this.current.length - this.at);
      dest.set(this.current.subarray(this.at, this.at + take), filled);
      this.at += take;
      filled += take;
    }
    this.position += filled;
    return filled === dest.length ? dest : dest.subarray(0, filled);
  }

  /** A view into the fetched chunk itself where the bytes lie in one (no copy), valid until the next read. */
  async readTemporary(n: number): Promise<Uint8Array> {
    const want = Math.max(0, Math.min(n, this.size - this.position));
    if (want > 0 && this.at === this.current.length) await this.advance();
    if (this.current.length - this.at >= want) {
      const view = this.current.subarray(this.at, this.at + want);
      this.at += want;
      this.position += want;
      return view;
    }
    if (this.scratch.length < want) this.scratch = new Uint8Array(Math.max(want, this.scratch.length * 2));
    return this.read(want, this.scratch.subarray(0, want));
  }

  /** Random access (the snapshot's headers for a summary), apart from the sequential position. */
  async readAt(offset: number, n: number): Promise<Uint8Array> {
    const end = Math.min(this.size, offset + n);
    if (offset >= end) return EMPTY;
    if (!this.starts) {
      this.starts = [];
      let at = 0;
      for (const p of this.pieces) {
        this.starts.push(at);
        at += p.bytes;
      }
    }
    const starts = this.starts;
    let lo = 0;
    let hi = starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (starts[mid]! <= offset) lo = mid;
      else hi = mid - 1;
    }
    const parts: Promise<Uint8Array>[] = [];
    for (let i = lo; i < this.pieces.length && starts[i]! < end; i++) {
      const p = this.pieces[i]!;
      parts.push(fetchPiece(this.conn, p, Math.max(0, offset - starts[i]!), Math.min(p.bytes, end - starts[i]!)));
    }
    const got = await Promise.all(parts);
    if (got.length === 1) return got[0]!;
    const out = new Uint8Array(end - offset);
    let at = 0;
    for (const g of got) {
      out.set(g, at);
      at += g.length;
    }
    return out;
  }

  private closed = false;
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.ahead.length = 0;
    this.current = EMPTY;
    await this.onClose();
  }
}

/** Writes one new blob's chunks, each with a TTL until a commit adopts it. */
class BlobWriter {
  readonly blob = randomId();
  bytes = 0;
  private count = 0;
  private buffer: Uint8Array = EMPTY;
  private filled = 0;
  private readonly inFlight: Promise<unknown>[] = [];

  constructor(
    private readonly tenant: RedisTenantStore,
    private readonly chunk: number,
  ) {}

  async write(data: Uint8Array): Promise<void> {
    for (let at = 0; at < data.length; ) {
      if (this.filled === this.buffer.length) {
        if (this.filled === this.chunk) await this.flush();
        // Grow towards a whole chunk: small writes (an append's delta) do not take a whole chunk's memory.
        const grown = new Uint8Array(Math.min(this.chunk, Math.max(64 << 10, this.buffer.length * 2, data.length - at)));
        grown.set(this.buffer.subarray(0, this.filled));
        this.buffer = grown;
      }
      const take = Math.min(data.length - at, this.buffer.length - this.filled);
      this.buffer.set(data.subarray(at, at + take), this.filled);
      this.filled += take;
      this.bytes += take;
      at += take;
    }
  }

  private async flush(): Promise<void> {
    if (this.filled === 0) return;
    const value = Buffer.from(this.buffer.buffer, this.buffer.byteOffset, this.filled);
    const { data, settings } = this.tenant.store;
    const sent = data.set(`${this.tenant.kp}blob:${this.blob}:${this.count++}`, value, "PX", settings.stagingTtlMs);
    sent.catch(() => {}); // awaited below or in finish/abort
    this.inFlight.push(sent);
    this.buffer = EMPTY;
    this.filled = 0;
    while (this.inFlight.length >= WRITES_IN_FLIGHT) await this.inFlight.shift();
  }

  /** Writes what is left; the blob as a commit adopts it (null: no bytes, no blob). */
  async finish(): Promise<FreshBlob | null> {
    await this.flush();
    while (this.inFlight.length > 0) await this.inFlight.shift();
    return this.bytes === 0 ? null : [this.blob, this.bytes, this.chunk, this.count];
  }

  /** Deletes whatever was written (what cannot be, a dead connection, expires). */
  async abort(): Promise<void> {
    await Promise.allSettled(this.inFlight.splice(0));
    await discardBlob(this.tenant, this.blob, this.count);
  }
}

async function discardBlob(tenant: RedisTenantStore, blob: string, chunks: number): Promise<void> {
  if (chunks === 0) return;
  try {
    await SCRIPTS.discard.run(tenant.store.ctl, [], [tenant.kp, blob, chunks]);
  } catch {
    // the chunks expire
  }
}

class RedisStaged implements StagedSnapshot {
  private discarded = false;
  constructor(
    readonly tenant: RedisTenantStore,
    readonly blob: FreshBlob | null,
  ) {}

  get bytes(): number {
    return this.blob?.[1] ?? 0;
  }

  get segments(): Segment[] {
    return this.blob ? [[this.blob[0], this.blob[1], this.blob[2]]] : [];
  }

  async open(): Promise<SnapshotReader> {
    if (this.discarded) throw new Error("this staged upload was discarded");
    return new RedisReader(this.tenant.store.data, { tag: `staged-${this.blob?.[0] ?? "empty"}`, bytes: this.bytes }, piecesOf(this.tenant.kp, this.segments), READ_AHEAD);
  }

  async discard(): Promise<void> {
    if (this.discarded) return;
    this.discarded = true;
    // A blob a commit adopted stays: discard deletes only chunks no head has counted.
    if (this.blob) await discardBlob(this.tenant, this.blob[0], this.blob[3]);
  }
}

class RedisLease implements Lease {
  private gone = false;
  private halted = false;
  private deadline: number;
  private readonly timer: ReturnType<typeof setInterval>;
  private renewing = false;

  constructor(
    private readonly tenant: RedisTenantStore,
    readonly id: string,
    readonly token: number,
    private readonly ttlMs: number,
    grantedAt: number,
  ) {
    this.deadline = grantedAt + ttlMs;
    this.timer = setInterval(() => void this.renew(), Math.max(1, Math.floor(ttlMs / 3)));
    unrefTimer(this.timer);
    tenant.store.timers.add(this);
  }

  get held(): boolean {
    return !this.gone && Date.now() < this.deadline;
  }

  private async renew(): Promise<void> {
    if (this.renewing || this.gone || this.halted) return;
    this.renewing = true;
    const sent = Date.now();
    try {
      const ok = await SCRIPTS.renew.run(this.tenant.store.ctl, [this.tenant.leaseKey(this.id)], [String(this.token), this.ttlMs]);
      if (Number(ok) === 1) this.deadline = sent + this.ttlMs;
      else this.lost();
    } catch {
      // held until the deadline; the next renewal tries again
    } finally {
      this.renewing = false;
    }
  }

  /** Stops renewing (the store handle closes): the lease expires in the store. */
  halt(): void {
    this.halted = true;
    clearInterval(this.timer);
    this.tenant.store.timers.delete(this);
  }

  private lost(): void {
    this.gone = true;
    this.halt();
  }

  async release(): Promise<void> {
    if (this.gone) return;
    this.lost();
    try {
      await SCRIPTS.release.run(this.tenant.store.ctl, [this.tenant.leaseKey(this.id)], [String(this.token)]);
    } catch {
      // it expires
    }
  }
}

async function* readerChunks(reader: SnapshotReader, size = MIB): AsyncGenerator<Uint8Array> {
  for (;;) {
    const chunk = await reader.read(size);
    if (chunk.length === 0) return;
    yield chunk;
  }
}

type Refusal = "lease" | "exists" | "stale" | "gone" | "notfound";

export class RedisTenantStore implements TenantStore {
  constructor(
    readonly store: RedisSessionStore,
    /** Every key of this tenant starts with this. */
    readonly kp: string,
  ) {}

  private headKey(id: string): string {
    return `${this.kp}head:${id}`;
  }
  private get idsKey(): string {
    return `${this.kp}ids`;
  }
  leaseKey(id: string): string {
    return `${this.kp}lease:${id}`;
  }

  private async currentHead(id: string): Promise<Head | null> {
    assertId(id);
    const json = await this.store.ctl.get(this.headKey(id));
    return json === null ? null : parseHead(json);
  }

  async has(id: string): Promise<boolean> {
    assertId(id);
    return (await this.store.ctl.exists(this.headKey(id))) === 1;
  }

  async ids(): Promise<string[]> {
    return (await this.store.ctl.smembers(this.idsKey)).sort();
  }

  async head(id: string): Promise<StoreVersion | null> {
    const h = await this.currentHead(id);
    return h && versionOf(h);
  }

  async open(id: string, bufferBytes = READ_AHEAD): Promise<SnapshotReader> {
    assertId(id);
    const { ctl, data, settings, timers } = this.store;
    const reader = randomId();
    const json = (await SCRIPTS.open.run(ctl, [this.headKey(id)], [this.kp, reader, settings.readerTtlMs])) as string | null;
    if (json === null) throw new NotFound(id);
    const head = parseHead(json);
    const blobs = [...new Set(head.s.map((s) => s[0]))];
    if (blobs.length === 0) return new RedisReader(data, versionOf(head), [], bufferBytes);
    const pins = {
      timer: setInterval(() => {
        SCRIPTS.renewPins.run(ctl, [], [this.kp, reader, settings.readerTtlMs, ...blobs]).catch(() => {});
      }, Math.max(1, Math.floor(settings.readerTtlMs / 3))),
      halt() {
        clearInterval(pins.timer);
        timers.delete(pins);
      },
    };
    unrefTimer(pins.timer);
    timers.add(pins);
    return new RedisReader(data, versionOf(head), piecesOf(this.kp, head.s), bufferBytes, async () => {
      pins.halt();
      try {
        await SCRIPTS.unpin.run(ctl, [], [this.kp, reader, ...blobs]);
      } catch {
        // the pins expire
      }
    });
  }

  async read<T>(id: string, fn: (reader: SnapshotReader) => Promise<T>): Promise<T> {
    const reader = await this.open(id);
    try {
      return await fn(reader);
    } finally {
      await reader.close();
    }
  }

  async summary(id: string): Promise<SnapshotSummary> {
    const reader = (await this.open(id, 0)) as RedisReader;
    try {
      return await readSnapshotSummary((offset, n) => reader.readAt(offset, n), reader.size);
    } finally {
      await reader.close();
    }
  }

  /** The commit script; throws the refusal it returns. */
  private async commit(
    id: string,
    op: "check" | "set" | "append" | "delete",
    options: { expect?: StoreVersion | null; lease?: Lease | null },
    segments: Segment[] = [],
    fresh: FreshBlob[] = [],
  ): Promise<Head | null> {
    assertId(id);
    const lease = options.lease;
    if (lease && lease.id !== id) throw new LeaseLost(id);
    const expect = options.expect === undefined ? "any" : options.expect === null ? "none" : "tag";
    const result = (await SCRIPTS.commit.run(
      this.store.ctl,
      [this.headKey(id), this.idsKey, this.leaseKey(id)],
      [this.kp, id, expect, options.expect?.tag ?? "", lease ? String(lease.token) : "", op, randomId(), JSON.stringify(segments), JSON.stringify(fresh)],
    )) as [string, string | null];
    const [status, head] = result;
    if (status !== "ok") throw refusal(id, status as Refusal);
    return head ? parseHead(head) : null;
  }

  /** Writes chunks as a new blob, commits it with `commit`, and deletes the blob if that fails. */
  private async writeAndCommit(
    chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>,
    commit: (segments: Segment[], fresh: FreshBlob[]) => Promise<Head | null>,
  ): Promise<StoreVersion> {
    const writer = new BlobWriter(this, this.store.settings.chunkBytes);
    let blob: FreshBlob | null;
    try {
      for await (const chunk of chunks) await writer.write(chunk);
      blob = await writer.finish();
    } catch (e) {
      await writer.abort();
      throw e;
    }
    try {
      const head = await commit(blob ? [[blob[0], blob[1], blob[2]]] : [], blob ? [blob] : []);
      return versionOf(head!);
    } catch (e) {
      if (blob) await discardBlob(this, blob[0], blob[3]);
      throw e;
    }
  }

  async save(id: string, chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>, options: SaveOptions = {}): Promise<StoreVersion> {
    // Refuse before writing what would be refused after.
    if (options.expect !== undefined || options.lease) await this.commit(id, "check", options);
    else assertId(id);
    return this.writeAndCommit(chunks, (segments, fresh) => this.commit(id, "set", options, segments, fresh));
  }

  async append(id: string, chunks: Iterable<Uint8Array>, at: StoreVersion, options: CommitOptions = {}): Promise<StoreVersion> {
    const o = { lease: options.lease, expect: at };
    await this.commit(id, "check", o);
    return this.writeAndCommit(chunks, (segments, fresh) => this.commit(id, "append", o, segments, fresh));
  }

  async truncate(id: string, bytes: number, options: CommitOptions = {}): Promise<StoreVersion> {
    for (;;) {
      const head = await this.currentHead(id);
      if (!head) throw new NotFound(id);
      if (!Number.isInteger(bytes) || bytes < 0 || bytes > head.n) throw new RangeError(`cannot cut session ${id} (${head.n} bytes) to ${bytes} bytes`);
      const segments: Segment[] = [];
      let left = bytes;
      for (const [blob, n, chunk] of head.s) {
        if (left === 0) break;
        segments.push([blob, Math.min(n, left), chunk]);
        left -= Math.min(n, left);
      }
      try {
        return versionOf((await this.commit(id, "set", { lease: options.lease, expect: versionOf(head) }, segments))!);
      } catch (e) {
        if (!(e instanceof StaleVersion)) throw e; // another commit came between: cut the version now current
      }
    }
  }

  async remove(id: string, options: CommitOptions = {}): Promise<void> {
    await this.commit(id, "delete", { lease: options.lease });
  }

  async fork(from: string, to: string): Promise<StoreVersion> {
    assertId(from);
    assertId(to);
    const [status, head] = (await SCRIPTS.fork.run(this.store.ctl, [this.headKey(from), this.headKey(to), this.idsKey], [this.kp, to, randomId()])) as [string, string | null];
    if (status !== "ok") throw refusal(status === "exists" ? to : from, status as Refusal);
    return versionOf(parseHead(head!));
  }

  async stage(body: ReadableStream<Uint8Array>, maxBytes: number): Promise<StagedSnapshot> {
    const writer = new BlobWriter(this, this.store.settings.chunkBytes);
    const reader = body.getReader();
    let blob: FreshBlob | null;
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (writer.bytes + value.length > maxBytes) throw new SnapshotError("too_large", `the upload passes the ${maxBytes}-byte limit for snapshots`);
        await writer.write(value);
      }
      blob = await writer.finish();
    } catch (e) {
      await reader.cancel(e).catch(() => {});
      await writer.abort();
      throw e;
    }
    return new RedisStaged(this, blob);
  }

  async commitStaged(id: string, staged: StagedSnapshot, options: SaveOptions = {}): Promise<StoreVersion> {
    if (staged instanceof RedisStaged && staged.tenant === this) {
      const head = await this.commit(id, "set", options, staged.segments, staged.blob ? [staged.blob] : []);
      return versionOf(head!);
    }
    // Another store's upload: copied.
    const reader = await staged.open();
    try {
      return await this.save(id, readerChunks(reader), options);
    } finally {
      await reader.close();
    }
  }

  async lease(id: string, options: LeaseOptions): Promise<Lease> {
    assertId(id);
    const ttl = Math.max(1, Math.round(options.ttlMs));
    const attempt = async (): Promise<Lease | null> => {
      const sent = Date.now();
      const token = await SCRIPTS.acquire.run(this.store.ctl, [this.leaseKey(id), `${this.kp}fence`], [ttl]);
      return token === null ? null : new RedisLease(this, id, Number(token), ttl, sent);
    };
    if (!options.wait) {
      options.signal?.throwIfAborted();
      const lease = await attempt();
      if (!lease) throw new SessionBusy(id);
      return lease;
    }
    return poll(attempt, options.signal);
  }
}

function refusal(id: string, status: Refusal): Error {
  switch (status) {
    case "lease":
      return new LeaseLost(id);
    case "exists":
      return new Exists(id);
    case "stale":
      return new StaleVersion(id);
    case "notfound":
      return new NotFound(id);
    case "gone":
      return new Error(`session ${id}: the chunks written for this commit expired before it (a staged upload kept past the store's staging TTL?)`);
    default:
      return new Error(`session ${id}: the store answered ${String(status)}`);
  }
}
