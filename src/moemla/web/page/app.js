// The page: loads manifest.json, tokenizer.json and model.onnx from its own folder (no network beyond it), shows the
// model card, and writes stories with generate.js. `?prompt=TEXT&greedy=1&max=N` runs one generation without clicks
// and writes its token ids into #result (tests and benchmarks read it); `threads=N` and `memory_mb=M` override the
// thread count and the memory bound.
import * as ort from "./vendor/onnxruntime-web/ort.wasm.min.mjs";
import { Tokenizer } from "./vendor/tokenizers/tokenizers.min.mjs";
import { checkSampling, generate, OnnxSession, visibleText } from "./generate.js";

window.moemlaStarted = true; // every module loaded: index.html's watchdog stands down
const FORMAT = "moemla-onnx";
const VERSION = 2;
// WebAssembly (wasm32) addresses at most 4 GiB and onnxruntime-web copies the model file into that memory before
// it builds the session's weights from it, so a file above half of it cannot load.
const MEMORY_MB = 2048;
const EXPORT = "export it again with `moemla export RUN OUT --format web`";
const DRAW_EVERY_MS = 40;

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const MiB = (bytes) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const state = { session: null, tokenizer: null, manifest: null, running: false, stop: false };

// A task boundary without setTimeout's 4 ms clamp, so yielding after each token does not slow decoding.
function yieldToPage() {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });
}

function setStatus(text, kind = "info") {
  $("status").textContent = text;
  $("status").className = kind;
}

function fail(message) {
  setStatus(message, "error");
  $("result").dataset.state = "error";
  $("result").textContent = JSON.stringify({ error: message });
}

async function fetchOk(name) {
  let response;
  try {
    response = await fetch(name);
  } catch (err) {
    throw new Error(`cannot read ${name} (${err.message}); serve this folder with \`moemla web OUT\` or any static file server`);
  }
  if (!response.ok) throw new Error(`${name} is missing from this folder (HTTP ${response.status}): ${EXPORT}`);
  return response;
}

// The model file as bytes, with a progress line: a 35 MiB int8 model takes a moment on a slow disk or network.
async function fetchModel(name, size) {
  const response = await fetchOk(name);
  const bytes = new Uint8Array(size);
  let got = 0;
  const reader = response.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (got + value.length > size) throw new Error(`${name} is larger than manifest.json says (${size} bytes): ${EXPORT}`);
    bytes.set(value, got);
    got += value.length;
    setStatus(`loading ${name}: ${MiB(got)} of ${MiB(size)}`);
  }
  if (got !== size) throw new Error(`${name} has ${got} bytes, manifest.json says ${size}: ${EXPORT}`);
  return bytes;
}

function threadCount() {
  if (!self.crossOriginIsolated) return 1; // threads need SharedArrayBuffer, which needs `moemla web`'s headers
  const asked = Number(query.get("threads"));
  // onnxruntime-web's own default: half the cores, at most 4 (the page's main thread and the browser need the rest)
  return asked >= 1 ? Math.floor(asked) : Math.min(4, Math.ceil((navigator.hardwareConcurrency || 1) / 2));
}

function showCard(manifest, threads) {
  const cfg = manifest.config;
  const size = manifest.files["model.onnx"];
  const rows = [
    ["variant", manifest.variant || "custom"],
    ["parameters", `${(manifest.total_params / 1e6).toFixed(2)}M (${(manifest.active_params / 1e6).toFixed(2)}M active per token)`],
    ["attention / FFN", `${cfg.attention.toUpperCase()} (${cfg.positions} positions) / ${cfg.ffn === "moe" ? `MoE: ${cfg.n_shared_experts} shared + ${cfg.n_routed_experts} routed experts, top-${cfg.n_activated_experts}` : "dense"}`],
    ["layers / width / context", `${cfg.n_layers} / ${cfg.dim} / ${cfg.max_seq_len} tokens`],
    ["KV cache", `${manifest.kv_cache_bytes_per_token.toLocaleString()} bytes per token (fp32)`],
    ["weights", `${manifest.quantize === "none" ? "fp32" : manifest.quantize}, model.onnx ${MiB(size)}`],
    ["runs on", `onnxruntime-web ${ort.env.versions?.web ?? ""}: WebAssembly SIMD, ${threads} thread${threads > 1 ? "s" : ""}` +
      (self.crossOriginIsolated ? " (cross-origin isolated)" : " (not cross-origin isolated: serve with `moemla web OUT` for threads)")],
  ];
  $("card").replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr");
    tr.append(Object.assign(document.createElement("th"), { textContent: k }), Object.assign(document.createElement("td"), { textContent: v }));
    return tr;
  }));
}

function setDefaults(sampling) {
  $("temperature").value = sampling.temperature;
  $("top_k").value = sampling.top_k ?? "";
  $("top_p").value = sampling.top_p ?? "";
  $("max_new").value = sampling.max_new_tokens;
  $("seed").value = 0;
}

function readSettings() {
  const num = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  let seed;
  try {
    seed = BigInt($("seed").value.trim() || "0");
  } catch {
    throw new Error(`seed must be a whole number in [0, 2^63), got ${$("seed").value}`);
  }
  // an empty box or one that is not a number ("abc" reads as empty) is refused, never read as 0
  const maxNewTokens = num("max_new");
  if (maxNewTokens === null) throw new Error("max new tokens is empty or not a number; give a whole number, 0 or more");
  const settings = { temperature: num("temperature") ?? 0, topK: num("top_k"), topP: num("top_p"), maxNewTokens, seed };
  checkSampling(settings);
  return settings;
}

async function load() {
  setStatus("loading manifest.json");
  let manifest;
  try {
    manifest = await (await fetchOk("manifest.json")).json();
  } catch (err) {
    throw new Error(err instanceof SyntaxError ? `manifest.json is not valid JSON: ${EXPORT}` : err.message);
  }
  if (manifest.format !== FORMAT || manifest.version !== VERSION || !manifest.web) {
    throw new Error(`manifest.json is not a moemla web export (format ${manifest.format}, version ${manifest.version}): ${EXPORT}`);
  }
  const threads = threadCount();
  showCard(manifest, threads);
  setDefaults(manifest.sampling);
  const size = manifest.files["model.onnx"];
  const limit = Number(query.get("memory_mb")) || MEMORY_MB;
  if (size > limit * 2 ** 20) {
    throw new Error(`model.onnx is ${MiB(size)}; a browser can load at most ${limit.toLocaleString()} MiB (WebAssembly's 4 GiB holds the file and the weights built from it): export a smaller preset or with --quantize int4`);
  }
  const tokenizer = new Tokenizer(await (await fetchOk("tokenizer.json")).json(), { clean_up_tokenization_spaces: false });
  const bytes = await fetchModel("model.onnx", size);
  setStatus(`building the session (${threads} thread${threads > 1 ? "s" : ""})`);
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.wasmPaths = new URL("./vendor/onnxruntime-web/", import.meta.url).href;
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  } catch (err) {
    const text = String(err?.message ?? err);
    if (err instanceof RangeError || /memory|alloc/i.test(text)) {
      throw new Error(`the browser ran out of memory building the session for model.onnx (${MiB(size)}): close other tabs, or export a smaller preset or with --quantize int4`);
    }
    throw new Error(`onnxruntime-web cannot load model.onnx (${text.split("\n")[0].slice(0, 200)}): ${EXPORT}`);
  }
  const decoder = new OnnxSession(ort, session, manifest);
  setStatus("warming up");
  await decoder.prefill([0, 0]); // a first run of each path (prefill, one-token step) prepares its kernels, so
  await decoder.step(0); //          the reader's time to first token is the model's, not onnxruntime's set-up
  Object.assign(state, { session: decoder, tokenizer, manifest, threads });
  setStatus("ready");
  $("generate").disabled = false;
}

async function run() {
  if (state.running) return;
  const { tokenizer, manifest, session } = state;
  let settings;
  try {
    settings = readSettings();
  } catch (err) {
    return fail(err.message);
  }
  const prompt = $("prompt").value;
  const promptIds = tokenizer.encode(prompt, { add_special_tokens: false }).ids;
  Object.assign(state, { running: true, stop: false });
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("result").dataset.state = "running";
  $("story").textContent = prompt;
  $("ttft").textContent = $("speed").textContent = "-";
  setStatus("generating");
  let drawn = 0;
  try {
    const out = await generate(session, promptIds, settings, manifest.eos_token_id, {
      onToken: async (_, ids) => {
        // draw (and let the page see a click on Stop) about 25 times a second, not per token: decoding the story
        // so far and yielding after every token took a third of a small model's step
        const now = performance.now();
        if (now - drawn < DRAW_EVERY_MS) return;
        drawn = now;
        $("story").textContent = prompt + visibleText(tokenizer, ids);
        await yieldToPage();
      },
      shouldStop: () => state.stop,
    });
    const steps = out.ids.length - 1 + (out.reason === "stop" ? 1 : 0); // timed decode steps after the first token
    const tokS = steps > 0 && out.decodeMs > 0 ? (steps * 1000) / out.decodeMs : null;
    $("story").textContent = prompt + (out.ids.length ? tokenizer.decode(out.ids, { skip_special_tokens: true }) : "");
    $("ttft").textContent = out.ttftMs === null ? "-" : `${out.ttftMs.toFixed(0)} ms`;
    $("speed").textContent = tokS === null ? "-" : `${tokS.toFixed(1)} tokens/s`;
    setStatus(`done: ${out.ids.length} tokens (${out.reason})`);
    $("result").textContent = JSON.stringify({
      ids: out.ids, prompt_ids: promptIds, reason: out.reason, ttft_ms: out.ttftMs, decode_tokens_per_s: tokS, threads: state.threads,
      decode_ms: out.decodeMs, decode_ms_in_onnxruntime: out.runMs,
    });
    $("result").dataset.state = "done";
  } catch (err) {
    fail(err.message);
  } finally {
    Object.assign(state, { running: false });
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

$("generate").addEventListener("click", run);
$("stop").addEventListener("click", () => { state.stop = true; });

try {
  await load();
  if (query.has("prompt")) {
    $("prompt").value = query.get("prompt");
    if (query.get("greedy") === "1") $("temperature").value = 0;
    if (query.has("max")) {
      const max = query.get("max").trim();
      if (!/^\d+$/.test(max)) throw new Error(`?max=${max}: give a whole number of new tokens, 0 or more (e.g. max=50)`);
      $("max_new").value = max;
    }
    if (query.has("seed")) $("seed").value = query.get("seed");
    await run();
  }
} catch (err) {
  fail(err.message);
}
