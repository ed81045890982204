// The decode loop of a moemla ONNX export in the browser: the same graph, cache and rules as the Python ONNX
// engine (moemla/inference/onnx/engine.py). The graph takes the whole past cache and returns it grown by the new
// tokens (present = past + new); MLA layers carry only their latents (c_k, c_v, k_pe), so what moves between steps
// is MLA's small cache (paper, Sec. 3.2). No DOM here: app.js draws the page.

// The one fit rule (moemla.inference.sampling.fit): a prompt must leave room for one new token.
export function fit(promptLen, context, maxNew) {
  if (promptLen < 1) throw new Error("the prompt is empty; give a non-empty prompt (at least one token)");
  if (promptLen > context || (maxNew > 0 && promptLen === context)) {
    throw new Error(`the prompt has ${promptLen} tokens but the model's context is ${context} tokens; shorten the prompt`);
  }
  return Math.min(maxNew, context - promptLen);
}

// SamplingConfig's checks (moemla.inference.sampling), with the same words.
export function checkSampling({ temperature, topK, topP, maxNewTokens, seed }) {
  if (!Number.isFinite(temperature) || temperature < 0) throw new Error(`temperature must be a finite number >= 0 (0 = greedy), got ${temperature}`);
  if (topK !== null && !(Number.isInteger(topK) && topK >= 1)) throw new Error(`top-k must be at least 1 (or empty for no limit), got ${topK}`);
  if (topP !== null && !(topP > 0 && topP <= 1)) throw new Error(`top-p must be in (0, 1] (1 = no nucleus cut), got ${topP}`);
  if (!(Number.isInteger(maxNewTokens) && maxNewTokens >= 0)) throw new Error(`max new tokens must be at least 0, got ${maxNewTokens}`);
  if (!(typeof seed === "bigint" && seed >= 0n && seed < 2n ** 63n)) throw new Error(`seed must be in [0, 2^63), got ${seed}`);
}

// A small seeded generator (mulberry32): the same seed draws the same story in every browser. Its draws are not
// torch's, so a seed gives a different story here than in `moemla generate`; greedy decoding gives the same one.
export function rng(seed) {
  let state = Number(BigInt.asUintN(32, seed ^ (seed >> 32n))) >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i; // the first of ties, like numpy
  return best;
}

// The candidates sampling draws from (moemla.inference.sampling's rule): token ids most likely first (ties by id)
// and their probabilities at this temperature, 0 outside the top-k and outside the top-p nucleus, summing to 1.
export function candidates(logits, { temperature, topK, topP }) {
  let order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a] || a - b);
  if (topK !== null) order = order.slice(0, topK);
  const top = logits[order[0]];
  let probs = order.map((i) => Math.exp((logits[i] - top) / temperature));
  let total = probs.reduce((a, b) => a + b, 0);
  probs = probs.map((p) => p / total);
  if (topP !== null && topP < 1) {
    let before = 0;
    probs = probs.map((p) => { const keep = before < topP; before += p; return keep ? p : 0; });
    total = probs.reduce((a, b) => a + b, 0);
    probs = probs.map((p) => p / total);
  }
  return { order, probs };
}

// One token id from logits (V,): greedy at temperature 0, else drawn from the candidates.
export function sample(logits, settings, random) {
  if (settings.temperature === 0) return argmax(logits);
  const { order, probs } = candidates(logits, settings);
  let u = random();
  for (let j = 0; j < order.length; j++) {
    u -= probs[j];
    if (u < 0 && probs[j] > 0) return order[j];
  }
  return order[probs.findLastIndex((p) => p > 0)];
}

const int64 = (ort, values, dims) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);

// The graph and the cache it grows, batch 1: prefill the prompt, then one token per step.
export class OnnxSession {
  constructor(ort, session, manifest) {
    this.ort = ort;
    this.session = session;
    this.cache = manifest.cache; // [{past, present, shape: ["batch", ..., "past", ...]}]
    this.context = manifest.config.max_seq_len;
    this.vocab = manifest.config.vocab_size;
    this.past = [];
    this.length = 0;
    this.runMs = 0; // time inside onnxruntime-web's session.run (the rest of a step is this page's JavaScript)
  }

  // ids (T,) after the cache -> logits (V,) of the last new position; the cache grows by T.
  async run(ids) {
    const ort = this.ort;
    const feed = {
      input_ids: int64(ort, ids, [1, ids.length]),
      attention_mask: int64(ort, new Array(this.length + ids.length).fill(1), [1, this.length + ids.length]),
      logits_at: int64(ort, [ids.length - 1], [1, 1]),
    };
    this.cache.forEach((c, i) => { feed[c.past] = this.past[i]; });
    const start = performance.now();
    const out = await this.session.run(feed);
    this.runMs += performance.now() - start;
    this.past = this.cache.map((c) => out[c.present]);
    this.length += ids.length;
    return out.logits.data; // (1, 1, V) -> (V,)
  }

  prefill(ids) {
    const empty = (c) => {
      const dims = c.shape.map((d) => (d === "batch" ? 1 : d === "past" ? 0 : d));
      return new this.ort.Tensor("float32", new Float32Array(0), dims);
    };
    this.past = this.cache.map(empty);
    this.length = 0;
    return this.run(ids);
  }

  step(token) {
    if (this.length >= this.context) throw new Error(`the context holds ${this.context} tokens; ${this.length + 1} requested`);
    return this.run([token]);
  }
}

// Generate up to settings.maxNewTokens tokens after the prompt's ids; onToken(id, ids) after each; stops at eos,
// at the budget, or when shouldStop() says so. Returns {ids, ttftMs, decodeMs, runMs (of decodeMs, the time inside
// onnxruntime-web), reason}.
export async function generate(session, promptIds, settings, eos, { onToken = () => {}, shouldStop = () => false } = {}) {
  const budget = fit(promptIds.length, session.context, settings.maxNewTokens);
  const random = rng(settings.seed);
  const ids = [];
  const start = performance.now();
  let logits = budget > 0 ? await session.prefill(promptIds) : null;
  let firstAt = null;
  let runAtFirst = 0;
  let reason = "length";
  while (ids.length < budget) {
    const token = sample(logits, settings, random);
    if (firstAt === null) [firstAt, runAtFirst] = [performance.now(), session.runMs];
    if (token === eos) { reason = "stop"; break; }
    ids.push(token);
    await onToken(token, ids);
    if (shouldStop()) { reason = "cancelled"; break; }
    if (ids.length === budget) break;
    logits = await session.step(token);
  }
  const end = performance.now();
  const decodeMs = firstAt === null ? 0 : end - firstAt;
  return { ids, ttftMs: firstAt === null ? null : firstAt - start, decodeMs, runMs: session.runMs - runAtFirst, reason };
}

// Text of ids with an unfinished multi-byte character held back (it is shown once it is whole).
export function visibleText(tokenizer, ids) {
  if (ids.length === 0) return "";
  const text = tokenizer.decode(ids, { skip_special_tokens: true });
  return text.replace(/\uFFFD+$/u, "");
}
