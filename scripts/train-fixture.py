#!/usr/bin/python3
"""Trains the fixture model: a tiny Llama-3.1-architecture model that retrieves a pass key, or the number
of a named key among several (RULER niah_multikey), at any distance.

    npm run train:fixture        # scripts/train-fixture.sh: the data and the whole curriculum, as committed

or one stage by hand:

    npx bun scripts/make-fixture-data.ts --out /tmp/fixture-data        # prompts, tokenized (TypeScript)
    /usr/bin/python3 scripts/train-fixture.py --data /tmp/fixture-data --out F.safetensors --stages ... [--init G]

This is the only Python in the project, and only here: the runtime, the tests and CI never need it. It
needs Debian's python3-torch (apt-get install python3-torch libopenblas0-pthread); PyPI is not used.

The model is exactly the graph scripts/lib/onnx-llama.ts writes (RMSNorm, llama3-scaled RoPE computed from
position_ids with the same inv_freq floats, GQA, SwiGLU), so its weights drop into the builder. lm_head
is trained tied to embed_tokens (--tie 1) and exported as its own equal matrix, as the graph has it: tied,
a head that copies a token works for every token at once, which is what makes retrieval form quickly. Only the task vocabulary is trained: every other token id shares one embedding row and one
lm_head row (the last row here; the builder repeats it into all other ids), and in the loss that shared
row stands for all of them at once (its logit + log(their count)), which is the full-vocabulary softmax.

Distance must not matter: 20% of samples keep contiguous positions; the rest start at a random offset and
jump by a log-uniform gap (up to --max-gap) between the filler and the question, so the question can
stand a million positions after the needle. The loss is on the answer tokens and <|eot_id|>, plus
--lm-weight times the next-token loss on the prompt, plus --attn-weight times the attention supervision
(attention_targets): where two heads should look so that a reply finds its needle by the needle's key
word. Only the training loss uses it; the model still predicts every reply token from its context alone.
Seeded: a rerun gives the same model on the same machine (BLAS threading aside).
"""
import argparse
import json
import math
import os
import struct
import time

import numpy as np
import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--data", default="/tmp/fixture-data")
p.add_argument("--out", default="fixtures/fixture-model.safetensors")
p.add_argument("--tokens-per-batch", type=int, default=12288)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--max-gap", type=float, default=1.5e6)
p.add_argument("--min-gap", type=float, default=1.0, help="smallest position gap (gaps are log-uniform between --min-gap and --max-gap)")
p.add_argument("--max-offset", type=float, default=1.0e6)
p.add_argument("--fresh-keys", type=int, default=0,
               help="give the needles of a multi-key sample a fresh word and number each time the sample is drawn (consistently in "
               "the needles, the questions and the replies), so that the model cannot memorize the training set's word-number pairs")
p.add_argument("--seed", type=int, default=1)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--eval-every", type=int, default=250)
p.add_argument("--init", default=None, help="continue from a safetensors file written by this script")
p.add_argument(
    "--stages",
    default="110:passkey:contig:700,300:all:contig:700,800:all:gaps:800,0:all:gaps:1800",
    help="curriculum, comma-separated MAX_TOKENS:TASKS:POSITIONS:STEPS (0 tokens = any length; tasks passkey|multikey|all; "
    "positions contig|gaps): retrieval is learned on short contiguous samples first, then length, then distance",
)
p.add_argument("--tie", type=int, default=1, help="train with lm_head tied to embed_tokens (exported as two equal matrices)")
p.add_argument("--schedule-steps", type=int, default=0, help="length of the cosine learning-rate schedule (default: the stages' total; larger stops part-way down it)")
p.add_argument("--eval-samples", type=int, default=200)
p.add_argument("--eval-max-tokens", type=int, default=0,
               help="validate only on held-out samples of at most this many tokens (default: the first --eval-samples of any length), "
               "to see a stage trained on short prompts on prompts of its own lengths")
p.add_argument("--lm-weight", type=float, default=0.2, help="weight of next-token loss on the prompt (dense signal; induction heads form from it)")
p.add_argument("--attn-weight", type=float, default=0.0,
               help="weight of the attention supervision (see attention_targets): where two heads should look when a reply "
               "restates a needle's number; 0 (default) trains on the replies alone")
p.add_argument("--attn-heads", default="0:0,1:2",
               help="LAYER:HEAD of the head taught to carry a line's key word onto its number tokens, then LAYER:HEAD of the "
               "head taught to look up the needle's number from the reply")
args = p.parse_args()

torch.manual_seed(args.seed)
rng = np.random.default_rng(args.seed)
torch.set_num_threads(args.threads)

meta = json.load(open(os.path.join(args.data, "meta.json")))
cfg = meta["config"]
H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
NH, KV, HD, FF = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]
EPS, V = cfg["rms_norm_eps"], cfg["vocab_size"]
vocab = np.array(meta["vocab"], dtype=np.int64)
T = len(vocab)
OTHER = T  # the shared row
row_of = np.full(V, OTHER, dtype=np.int64)
row_of[vocab] = np.arange(T)
inv_freq = torch.tensor(meta["inv_freq"], dtype=torch.float32)
log_others = math.log(V - T)


def load(split):
    tokens = np.fromfile(os.path.join(args.data, f"{split}.tokens.bin"), dtype=np.int32)
    index = np.fromfile(os.path.join(args.data, f"{split}.index.bin"), dtype=np.int32).reshape(-1, 4)
    mask_file = os.path.join(args.data, f"{split}.mask.bin")
    mask = np.fromfile(mask_file, dtype=np.uint8) if os.path.exists(mask_file) else None
    return tokens, index, mask


train_tokens, train_index, train_mask = load("train")
eval_tokens, eval_index, eval_mask = load("eval")
print(f"train {len(train_index)} samples, eval {len(eval_index)}; task vocabulary {T} rows + 1 shared; config {H}x{L}, heads {NH}/{KV}x{HD}")


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(T + 1, H)
        torch.nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(H) if args.tie else 1.0)
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)
        self.layers = torch.nn.ModuleList()
        for _ in range(L):
            layer = torch.nn.Module()
            layer.q, layer.k, layer.v, layer.o = lin(H, NH * HD), lin(H, KV * HD), lin(H, KV * HD), lin(NH * HD, H)
            layer.gate, layer.up, layer.down = lin(H, FF), lin(H, FF), lin(FF, H)
            layer.ln1 = torch.nn.Parameter(torch.ones(H))
            layer.ln2 = torch.nn.Parameter(torch.ones(H))
            self.layers.append(layer)
        self.norm = torch.nn.Parameter(torch.ones(H))
        self.lm_head = lin(H, T + 1)
        if args.tie:
            # One matrix for reading and writing tokens: a head that copies a token (OV near a multiple of
            # the identity) then works for every token at once instead of being learned token by token.
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w

    @staticmethod
    def rope(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def forward(self, rows, positions, valid, keep, all_logits=False, attn_targets=None):
        """rows [B,S] row ids, positions [B,S] int64, valid [B,S] bool; returns logits at `keep` [N,2] (b, s),
        and with all_logits also those of every position [B,S,T+1]. With attn_targets ({layer: (head, b, query,
        key) index tensors}), self.attn_loss is the mean -log of those heads' attention at those keys."""
        B, S = rows.shape
        self.attn_loss = torch.zeros(())
        x = self.embed(rows)
        angles = positions.to(torch.float32)[..., None] * inv_freq  # float32, as the ONNX graph computes it
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        mask = causal[None, None] & valid[:, None, None, :]
        for li, layer in enumerate(self.layers):
            h = self.rms(x, layer.ln1)
            q = layer.q(h).view(B, S, NH, HD).transpose(1, 2)
            k = layer.k(h).view(B, S, KV, HD).transpose(1, 2)
            v = layer.v(h).view(B, S, KV, HD).transpose(1, 2)
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
            k = k.repeat_interleave(NH // KV, dim=1)
            v = v.repeat_interleave(NH // KV, dim=1)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(HD)
            scores = scores.masked_fill(~mask, -1e9)
            probs = torch.softmax(scores, dim=-1)
            a = probs @ v
            if attn_targets is not None and li in attn_targets and len(attn_targets[li][0]):
                h_, b_, q_, k_ = attn_targets[li]
                self.attn_loss = self.attn_loss - torch.log(probs[b_, h_, q_, k_] + 1e-9).mean()
            x = x + layer.o(a.transpose(1, 2).reshape(B, S, NH * HD))
            h = self.rms(x, layer.ln2)
            x = x + layer.down(F.silu(layer.gate(h)) * layer.up(h))
        x = self.rms(x, self.norm)
        # The shared row stands for every token outside the task vocabulary.
        full = lambda logits: torch.cat([logits[..., :T], logits[..., T:] + log_others], dim=-1)
        picked = full(self.lm_head(x[keep[:, 0], keep[:, 1]]))
        return (picked, full(self.lm_head(x))) if all_logits else picked


def positions_for(length, q, contiguous):
    pos = np.arange(length, dtype=np.int64)
    if contiguous:
        return pos
    offset = int(rng.uniform(0, args.max_offset)) if rng.random() < 0.7 else 0
    gap = int(math.exp(rng.uniform(math.log(args.min_gap), math.log(args.max_gap))))
    pos = pos + offset
    pos[q:] += gap
    return pos


# Llama-3 token ids of a needle line and reply: ... WORD " is" " " DDD DD (the number's two digit groups), where a
# multi-key line reads " for" WORD and a pass-key line "pass" " key".
FOR, IS, SPACE = 369, 374, 220


def number_lines(seq):
    """Positions p where seq[p:p+4] is " is" " " DDD DD (WORD at p - 1): the needles of both tasks and the replies
    that restate them (the filler has no digits, and no other " is" is followed by " ")."""
    return np.nonzero((seq[1:-3] == IS) & (seq[2:-2] == SPACE))[0] + 1


def needle_lines(seq):
    """Positions p where seq[p:p+6] is " for" WORD " is" " " DDD DD: the multi-key needles and their replies."""
    p = number_lines(seq) - 2
    p = p[p >= 0]
    return p[seq[p] == FOR]


def key_vocabulary():
    """The key words and digit-group tokens the data's needles use."""
    words, first, second = set(), set(), set()
    for off, length, q, a in train_index[1::2][:2000]:
        seq = train_tokens[off : off + length]
        for p in needle_lines(seq):
            words.add(int(seq[p + 1])), first.add(int(seq[p + 4])), second.add(int(seq[p + 5]))
    if len(words) < 16:
        raise SystemExit(f"--fresh-keys: found only {len(words)} key words in the multi-key samples")
    return np.array(sorted(words)), np.array(sorted(first)), np.array(sorted(second))


if args.fresh_keys:
    KEY_WORDS, FIRST_GROUPS, SECOND_GROUPS = key_vocabulary()
    print(f"fresh keys from {len(KEY_WORDS)} words, {len(FIRST_GROUPS)} first and {len(SECOND_GROUPS)} second digit groups")


def fresh_keys(seq):
    """The multi-key sample with every needle's word and number replaced, consistently wherever they occur."""
    seq = seq.copy()
    lines = needle_lines(seq)
    old = list(dict.fromkeys(int(seq[p + 1]) for p in lines))
    word = dict(zip(old, rng.choice(KEY_WORDS, size=len(old), replace=False)))
    number = {w: (rng.choice(FIRST_GROUPS), rng.choice(SECOND_GROUPS)) for w in old}
    for p in lines:
        seq[p + 4], seq[p + 5] = number[int(seq[p + 1])]
    for p in np.nonzero(seq[:-1] == FOR)[0]:  # needles, questions (" for" WORD "?") and replies
        seq[p + 1] = word.get(int(seq[p + 1]), seq[p + 1])
    return seq


ATTN_A, ATTN_B = [tuple(int(x) for x in spec.split(":")) for spec in args.attn_heads.split(",")]


def attention_targets(seq, replies):
    """Where the two supervised heads should look in one sample (lists of (query, key) positions).

    A line of either task ends in WORD " is" " " DDD DD (WORD is the key word, or "key" for the pass key);
    a reply restates the line of its needle. Head A, at the line's " ", DDD and DD, looks at WORD (so
    those positions carry which line they belong to); head B, at the reply's " " (which predicts DDD) and
    DDD (which predicts DD), looks at the needle's DDD and DD: the needle whose WORD the reply names, which
    it can only find by matching the WORD that head A brought to both. `replies`: bool per position, True
    where the loss applies."""
    a, b = [], []
    needles = {}
    for line in number_lines(seq):
        a += [(line + d, line - 1) for d in (1, 2, 3)]
        word = int(seq[line - 1])
        if not replies[line + 2]:
            needles[word] = line
        elif word in needles:
            b += [(line + 1, needles[word] + 2), (line + 2, needles[word] + 3)]
    return a, b


def batch_from(tokens, index, mask, ids, contiguous_share=0.2, gaps=True, refresh=False):
    S = int(index[ids, 1].max())
    B = len(ids)
    rows = np.full((B, S), OTHER, dtype=np.int64)
    positions = np.zeros((B, S), dtype=np.int64)
    valid = np.zeros((B, S), dtype=bool)
    keep, targets = [], []
    sup = []  # (layer, head, b, query, key) of the supervised attention weights
    for b, i in enumerate(ids):
        off, length, q, a = index[i]
        seq = tokens[off : off + length]
        if refresh and i % 2 == 1:  # multi-key samples (they alternate with passkey ones)
            seq = fresh_keys(seq)
        rows[b, :length] = row_of[seq]
        valid[b, :length] = True
        contiguous = (not gaps) or rng.random() < contiguous_share
        positions[b, :length] = positions_for(length, q, contiguous)
        # Predict each reply token (and its eot) from the position before it: the answer, and the replies
        # of follow-up turns where the data has them (its mask).
        supervised = range(a, length) if mask is None else np.nonzero(mask[off : off + length])[0]
        for t in supervised:
            keep.append((b, t - 1))
            targets.append(row_of[seq[t]])
        if args.attn_weight > 0:
            replies = np.zeros(length, dtype=bool)
            replies[list(supervised)] = True
            for (layer, head), pairs in zip((ATTN_A, ATTN_B), attention_targets(seq, replies)):
                sup += [(layer, head, b, q, k) for q, k in pairs]
    attn = None
    if args.attn_weight > 0:
        t = torch.tensor(sup, dtype=torch.long).reshape(-1, 5)
        attn = {layer: tuple(t[t[:, 0] == layer, j] for j in range(1, 5)) for layer in (ATTN_A[0], ATTN_B[0])}
    return (torch.from_numpy(rows), torch.from_numpy(positions), torch.from_numpy(valid), torch.tensor(keep), torch.tensor(targets), attn)


model = Model()


def save_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, t in tensors.items():
        arr = np.ascontiguousarray(t)
        dtype = {np.float32: "F32", np.int32: "I32"}[arr.dtype.type]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        blobs.append(arr.tobytes())
        offset += arr.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((8 - len(head) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def hf_parameters():
    """The model's parameters under their Hugging Face Llama names, in the order the file stores them."""
    named = {"model.embed_tokens.weight": model.embed.weight}
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        for name, mod in [("self_attn.q_proj", layer.q), ("self_attn.k_proj", layer.k), ("self_attn.v_proj", layer.v), ("self_attn.o_proj", layer.o),
                          ("mlp.gate_proj", layer.gate), ("mlp.up_proj", layer.up), ("mlp.down_proj", layer.down)]:
            named[pre + name + ".weight"] = mod.weight
        named[pre + "input_layernorm.weight"] = layer.ln1
        named[pre + "post_attention_layernorm.weight"] = layer.ln2
    named["model.norm.weight"] = model.norm
    named["lm_head.weight"] = model.lm_head.weight
    return named


def export(path, step, accuracy):
    t = {"vocab": vocab.astype(np.int32), **{name: p.detach().numpy() for name, p in hf_parameters().items()}}
    metadata = {
        "format": "ultralong-serve fixture model",
        "rows": "embed_tokens and lm_head rows are the token ids in `vocab`, then one row shared by every other id",
        "config": json.dumps(cfg),
        "seed": str(args.seed),
        "steps": str(step),
        "validation_accuracy": json.dumps(accuracy),
    }
    save_safetensors(path, t, metadata)


def load_init(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    get = lambda name: torch.from_numpy(np.frombuffer(data, dtype=np.float32, offset=header[name]["data_offsets"][0],
                                                      count=int(np.prod(header[name]["shape"]))).reshape(header[name]["shape"]).copy())
    with torch.no_grad():
        for name, p in hf_parameters().items():
            if name == "lm_head.weight" and args.tie:
                continue  # the same tensor as embed_tokens
            p.copy_(get(name))


if args.init:
    load_init(args.init)
    print(f"continuing from {args.init}")


def evaluate(gaps):
    """Teacher-forced exact match of whole answers on the held-out split, by task and filler length."""
    model.eval()
    correct, total = {}, {}
    with torch.no_grad():
        if args.eval_max_tokens == 0:
            order = np.argsort(eval_index[: args.eval_samples, 1])
        else:
            pool = np.nonzero(eval_index[:, 1] <= args.eval_max_tokens)[0][: args.eval_samples]
            order = pool[np.argsort(eval_index[pool, 1])]
        for start in range(0, len(order), 16):
            ids = order[start : start + 16]
            rows, positions, valid, keep, targets, _ = batch_from(eval_tokens, eval_index, eval_mask, ids, contiguous_share=0.0 if gaps else 1.0, gaps=gaps)
            predicted = model(rows, positions, valid, keep).argmax(-1)
            ok = (predicted == targets).numpy()
            at = 0
            for i in ids:
                off, length, q, a = eval_index[i]
                n = length - a
                kind = "passkey" if i % 2 == 0 else "multikey"
                bucket = f"{kind}@{'gap' if gaps else 'contig'}"
                correct[bucket] = correct.get(bucket, 0) + int(ok[at : at + n].all())
                total[bucket] = total.get(bucket, 0) + 1
                at += n
    model.train()
    return {k: round(correct[k] / total[k], 3) for k in sorted(total)}


# Batches: samples of similar length together, so padding stays small.
def bucket(sample_ids):
    lengths = train_index[:, 1]
    order = sample_ids[np.argsort(lengths[sample_ids], kind="stable")]
    out, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * lengths[order[end]] <= args.tokens_per_batch:
            end += 1
        out.append(order[start:end])
        start = end
    return out


all_ids = np.arange(len(train_index))
stages = []
for spec in args.stages.split(","):
    max_tokens, tasks, positions, steps = spec.split(":")
    ids = all_ids if int(max_tokens) == 0 else all_ids[train_index[:, 1] <= int(max_tokens)]
    if tasks in ("passkey", "multikey"):
        ids = ids[ids % 2 == (0 if tasks == "passkey" else 1)]  # samples alternate passkey, multikey
    stages.append({"batches": bucket(ids), "gaps": positions == "gaps", "steps": int(steps), "name": spec})
args.steps = sum(st["steps"] for st in stages)
schedule_steps = args.schedule_steps or args.steps
for st in stages:
    print(f"stage {st['name']}: {len(st['batches'])} batches")


def stage_at(step):
    end = 0
    for st in stages:
        end += st["steps"]
        if step <= end:
            return st
    return stages[-1]

decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
warmup = 100
schedule = lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / schedule_steps))))
sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

t0 = time.time()
best = None
running = 0.0
for step in range(1, args.steps + 1):
    stage = stage_at(step)
    ids = stage["batches"][rng.integers(len(stage["batches"]))]
    rows, positions, valid, keep, targets, attn = batch_from(train_tokens, train_index, train_mask, ids, gaps=stage["gaps"], refresh=bool(args.fresh_keys))
    if args.lm_weight > 0:
        answer_logits, logits = model(rows, positions, valid, keep, all_logits=True, attn_targets=attn)
        lm_mask = valid[:, 1:]
        lm = F.cross_entropy(logits[:, :-1][lm_mask], rows[:, 1:][lm_mask])
        answer_loss = F.cross_entropy(answer_logits, targets)
        loss = answer_loss + args.lm_weight * lm
    else:
        answer_loss = loss = F.cross_entropy(model(rows, positions, valid, keep, attn_targets=attn), targets)
    if args.attn_weight > 0:
        loss = loss + args.attn_weight * model.attn_loss
        attn_running = 0.98 * attn_running + 0.02 * model.attn_loss.item() if step > 1 else model.attn_loss.item()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    running = 0.98 * running + 0.02 * answer_loss.item() if step > 1 else answer_loss.item()
    if step % 50 == 0:
        attention = f" attention loss {attn_running:.4f}" if args.attn_weight > 0 else ""
        print(f"step {step} answer loss {running:.4f}{attention} (total {loss.item():.4f}) lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s", flush=True)
    if step % args.eval_every == 0 or step == args.steps:
        accuracy = {**evaluate(gaps=False), **evaluate(gaps=True)}
        print(f"step {step} validation {accuracy}", flush=True)
        export(args.out, step, accuracy)
print(f"done in {time.time() - t0:.0f}s; wrote {args.out}")
