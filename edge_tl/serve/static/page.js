// edge_tl serve: the field engineer's page. Plain JS, no build step, nothing from the internet.
// It speaks the server's own API: the Open Inference Protocol v2 (/v2/...) for health,
// metadata and infer, and the learning endpoints under /v2/models/{name}/ with the bearer
// token. The token lives in sessionStorage (this tab only), never in a URL.
"use strict";

const TOKEN_KEY = "edge_tl.token";
const MODEL_KEY = "edge_tl.model";
const MAX_UPLOAD_BYTES = 1.5 * 1024 * 1024; // larger photos are scaled down before upload
const MAX_SIDE = 1600; // px, the longer side of a scaled-down photo
const TOP_K = 3;

const $ = (id) => document.getElementById(id);
const state = { meta: null, learn: [], good: [] };

// ---- talking to the server -------------------------------------------------------------
function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error("the server does not answer (" + e.message + ")");
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    const why = body && body.error ? body.error : text || response.statusText;
    const err = new Error(why);
    err.status = response.status;
    throw err;
  }
  return body;
}

function modelPath(suffix = "") {
  return "/v2/models/" + encodeURIComponent($("model").value) + suffix;
}

// ---- messages --------------------------------------------------------------------------
function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function say(id, message, done = false) {
  const el = $(id);
  el.textContent = message;
  el.classList.toggle("done", done);
}

function plural(n, word, many = word + "s") {
  return n + " " + (n === 1 ? word : many);
}

// ---- images ----------------------------------------------------------------------------
// A phone photo (several MB) is scaled down so its longer side is MAX_SIDE px (the model
// resizes to its own input size anyway); small files go as they are, byte for byte.
async function prepare(file) {
  if (file.size <= MAX_UPLOAD_BYTES || typeof createImageBitmap !== "function") return file;
  try {
    const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(bitmap.width * scale);
    canvas.height = Math.round(bitmap.height * scale);
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise((ok) => canvas.toBlob(ok, "image/jpeg", 0.92));
    return blob || file;
  } catch (e) {
    return file; // the server says what is wrong with it
  }
}

function base64Of(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error("could not read " + (blob.name || "a photo")));
    reader.readAsDataURL(blob);
  });
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("this browser cannot show " + file.name));
    img.src = URL.createObjectURL(file);
  });
}

// ---- models ----------------------------------------------------------------------------
async function waitReady() {
  const pill = $("server-state");
  for (;;) {
    try {
      await api("/v2/health/ready");
      pill.textContent = "ready";
      pill.className = "pill ok";
      return;
    } catch (e) {
      pill.textContent = e.status === 503 ? "loading models…" : "not reachable";
      pill.className = "pill bad";
      if (e.status === 503 && !e.message.startsWith("{")) showError(e.message); // a model failed to load
    }
    await new Promise((ok) => setTimeout(ok, 1000));
  }
}

async function loadModels() {
  const index = await api("/v2/repository/index", { method: "POST" });
  const select = $("model");
  select.textContent = "";
  for (const m of index) {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = m.state === "READY" ? m.name : m.name + " (" + m.state.toLowerCase() + ")";
    option.disabled = m.state !== "READY";
    select.appendChild(option);
  }
  const saved = sessionStorage.getItem(MODEL_KEY);
  if (saved && index.some((m) => m.name === saved && m.state === "READY")) select.value = saved;
  await loadModel();
}

async function loadModel() {
  const name = $("model").value;
  if (!name) {
    say("model-info", "no model is served");
    return;
  }
  sessionStorage.setItem(MODEL_KEY, name);
  const meta = await api(modelPath());
  state.meta = meta;
  const p = meta.parameters || {};
  let info;
  if (p.kind === "anomaly") {
    info = "anomaly bank v" + (p.bank_version ?? 0) + " · threshold " + fmt(p.threshold);
  } else {
    const classes = p.classes || [];
    info = "classifier · head v" + (p.head_version ?? 0) + " · " + plural(classes.length, "class", "classes");
    if (classes.length) info += ": " + classes.join(", ");
  }
  say("model-info", info);
  // a bundle with neither a head nor a bank may start either: both sections show
  const blank = p.kind !== "anomaly" && !(p.classes || []).length;
  for (const section of document.querySelectorAll("section[data-kind]")) {
    section.hidden = !blank && section.dataset.kind !== (p.kind || "classifier");
  }
  if (!$("versions").hidden) await showVersions();
}

function fmt(x) {
  if (x === undefined || x === null) return "–";
  return Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3);
}

// ---- predictions -----------------------------------------------------------------------
async function predict(files) {
  clearError();
  if (!files.length) return;
  const results = $("results");
  results.textContent = "";
  const kind = (state.meta && state.meta.parameters && state.meta.parameters.kind) || "classifier";
  say("predict-status", "checking " + plural(files.length, "photo") + "…");
  try {
    const blobs = await Promise.all(files.map(prepare));
    const data = await Promise.all(blobs.map(base64Of));
    const classes = (state.meta && state.meta.parameters.classes) || [];
    const parameters = kind === "anomaly" ? { map: true } : { top_k: Math.max(1, Math.min(TOP_K, classes.length || 1)) };
    const body = {
      inputs: [{ name: "image", datatype: "BYTES", shape: [data.length], data }],
      parameters,
    };
    const answer = await api(modelPath("/infer"), {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
    const out = {};
    for (const o of answer.outputs) out[o.name] = o;
    for (let i = 0; i < files.length; i++) {
      const card = kind === "anomaly" ? await anomalyCard(files[i], out, i) : classifierCard(files[i], out, i);
      card.id = "result-" + i;
      results.appendChild(card);
    }
    const what = kind === "anomaly" ? "bank" : "head";
    say("predict-status", plural(files.length, "photo") + " checked with " + what + " v" + answer.model_version, true);
  } catch (e) {
    say("predict-status", "");
    showError("Check failed: " + e.message);
  }
}

function card(file) {
  const div = document.createElement("div");
  div.className = "result";
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = file.name || "photo";
  return [div, name];
}

function labelLine(text, cls) {
  const el = document.createElement("div");
  el.className = "label " + cls;
  el.textContent = text;
  return el;
}

function classifierCard(file, out, i) {
  const [div, name] = card(file);
  const img = document.createElement("img");
  img.alt = file.name || "photo";
  img.src = URL.createObjectURL(file);
  const label = out.label.data[i];
  const score = out.score.data[i];
  const line = labelLine(label, label === "unknown" ? "unknown" : "");
  line.dataset.label = label;
  line.classList.add("prediction");
  const sub = document.createElement("div");
  sub.textContent = "score " + (100 * score).toFixed(1) + " %";
  div.append(img, name, line, sub);
  if (out.top_k_labels) {
    const k = out.top_k_labels.shape[1];
    const list = document.createElement("ul");
    list.className = "bars";
    list.setAttribute("aria-label", "top " + k + " classes");
    for (let j = 0; j < k; j++) {
      const s = out.top_k_scores.data[i * k + j];
      const li = document.createElement("li");
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = (100 * s).toFixed(1) + "%";
      const text = document.createElement("em");
      text.textContent = out.top_k_labels.data[i * k + j];
      bar.append(fill, text);
      const pct = document.createElement("span");
      pct.textContent = (100 * s).toFixed(0) + "%";
      li.append(bar, pct);
      list.appendChild(li);
    }
    div.appendChild(list);
  }
  return div;
}

// The same colours and opacity as the CLI's overlays (edge_tl/runtime/overlay.py): dark blue
// -> cyan -> yellow -> red for map / (1.5 x threshold) in [0, 1], 15 % to 75 % opaque.
const STOPS = [[0, 0, 128], [0, 160, 255], [255, 230, 0], [230, 0, 0]];

function heat(v) {
  const pos = Math.min(Math.max(v, 0), 1) * (STOPS.length - 1);
  const i = Math.min(Math.floor(pos), STOPS.length - 2);
  const f = pos - i;
  return STOPS[i].map((c, j) => c * (1 - f) + STOPS[i + 1][j] * f);
}

async function anomalyCard(file, out, i) {
  const [div, name] = card(file);
  const score = out.score.data[i];
  const threshold = out.threshold.data[i];
  const verdict = out.verdict.data[i];
  const canvas = document.createElement("canvas");
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", "anomaly map of " + (file.name || "the photo"));
  const img = await loadImage(file);
  const scale = Math.min(1, 640 / Math.max(img.naturalWidth, img.naturalHeight));
  canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  if (out.map) {
    const [, h, w] = out.map.shape;
    const grid = document.createElement("canvas");
    grid.width = w;
    grid.height = h;
    const g = grid.getContext("2d");
    const pixels = g.createImageData(w, h);
    const top = 1.5 * Math.max(threshold, 1e-6);
    for (let p = 0; p < h * w; p++) {
      const v = out.map.data[i * h * w + p] / top;
      const [r, gg, b] = heat(v);
      pixels.data.set([r, gg, b, 255 * (0.15 + 0.6 * Math.min(Math.max(v, 0), 1))], 4 * p);
    }
    g.putImageData(pixels, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(grid, 0, 0, canvas.width, canvas.height);
  }
  const line = labelLine(verdict, verdict === "good" ? "good" : "anomalous");
  line.dataset.label = verdict;
  line.classList.add("prediction");
  const sub = document.createElement("div");
  sub.textContent = "score " + fmt(score) + " / threshold " + fmt(threshold);
  const legend = document.createElement("div");
  legend.className = "legend";
  legend.innerHTML = "<span>0</span><i></i><span>1.5× threshold</span>";
  div.append(canvas, name, line, sub, legend);
  return div;
}

// ---- learning --------------------------------------------------------------------------
function pick(which, files) {
  state[which].push(...files);
  const box = $(which + "-picked");
  box.textContent = "";
  for (const f of state[which]) {
    const img = document.createElement("img");
    img.alt = f.name || "photo";
    img.src = URL.createObjectURL(f);
    box.appendChild(img);
  }
  say(which + "-status", state[which].length ? plural(state[which].length, "photo") + " picked" : "");
}

function unpick(which) {
  state[which] = [];
  $(which + "-picked").textContent = "";
  say(which + "-status", "");
}

function needToken() {
  if ($("token").value.trim()) return false;
  showError("Teaching and rolling back need the server's token: paste it in the Token field.");
  $("token").focus();
  return true;
}

async function upload(which, path, label) {
  const form = new FormData();
  if (label !== null) form.append("label", label);
  const blobs = await Promise.all(state[which].map(prepare));
  blobs.forEach((b, i) => form.append("images", b, state[which][i].name || "photo-" + i + ".jpg"));
  return api(modelPath(path), { method: "POST", headers: authHeaders(), body: form });
}

async function teach() {
  clearError();
  const label = $("learn-label").value.trim();
  if (!label) {
    showError("Give the class a name first.");
    $("learn-label").focus();
    return;
  }
  if (!state.learn.length) {
    showError("Pick a few photos of the class first.");
    return;
  }
  if (needToken()) return;
  const button = $("learn-button");
  button.disabled = true;
  say("learn-status", "teaching '" + label + "' from " + plural(state.learn.length, "photo") + "…");
  try {
    const record = await upload("learn", "/learn", label);
    const n = state.learn.length;
    unpick("learn");
    say("learn-status", "taught '" + label + "' from " + plural(n, "photo") + ": head v" + record.version, true);
    await loadModel();
  } catch (e) {
    say("learn-status", "");
    showError("Teaching failed: " + e.message);
  } finally {
    button.disabled = false;
  }
}

async function addGood() {
  clearError();
  if (!state.good.length) {
    showError("Pick photos of good parts first.");
    return;
  }
  if (needToken()) return;
  const button = $("good-button");
  button.disabled = true;
  say("good-status", "adding " + plural(state.good.length, "photo") + " to the bank…");
  try {
    const record = await upload("good", "/good", null);
    const n = state.good.length;
    unpick("good");
    say("good-status", "added " + plural(n, "good photo") + ": bank v" + record.version +
      ", threshold " + fmt(record.threshold), true);
    await loadModel();
  } catch (e) {
    say("good-status", "");
    showError("Adding good parts failed: " + e.message);
  } finally {
    button.disabled = false;
  }
}

// ---- versions --------------------------------------------------------------------------
function describe(v) {
  if (v.error) return "unreadable: " + v.error;
  const op = v.op || "";
  if (v.kind === "anomaly") return op + " · " + plural(v.images, "image") + " · threshold " + fmt(v.threshold);
  const labels = v.labels || [];
  return op + " · " + labels.join(", ");
}

async function showVersions() {
  clearError();
  if (needToken()) return;
  try {
    const listing = await api(modelPath("/versions"), { headers: authHeaders() });
    const table = $("versions");
    const body = table.querySelector("tbody");
    body.textContent = "";
    for (const v of listing.versions.slice().reverse()) {
      const row = document.createElement("tr");
      row.id = "version-" + v.version;
      if (v.current) row.className = "current";
      const cells = [String(v.version), describe(v), (v.created || "").replace("T", " ").slice(0, 19)];
      for (const text of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        row.appendChild(td);
      }
      const td = document.createElement("td");
      if (v.current) {
        td.textContent = "in force";
      } else if (!v.error) {
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = "Roll back";
        button.id = "rollback-" + v.version;
        button.setAttribute("aria-label", "Roll back to version " + v.version);
        button.addEventListener("click", () => rollback(v.version));
        td.appendChild(button);
      }
      row.appendChild(td);
      body.appendChild(row);
    }
    table.hidden = false;
    const what = listing.kind === "anomaly" ? "bank" : "head";
    say("versions-status", listing.versions.length
      ? plural(listing.versions.length, what + " version") + "; v" + listing.current + " in force"
      : "nothing learned on this device yet: the exported " + what + " is in force");
  } catch (e) {
    showError("Versions: " + e.message);
  }
}

async function rollback(to) {
  clearError();
  if (needToken()) return;
  try {
    await api(modelPath("/rollback"), {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ to }),
    });
    say("versions-status", "rolled back to v" + to, true);
    await loadModel();
    await showVersions();
    say("versions-status", "rolled back to v" + to, true);
  } catch (e) {
    showError("Roll back failed: " + e.message);
  }
}

// ---- wiring ----------------------------------------------------------------------------
function onFiles(id, handler) {
  $(id).addEventListener("change", (event) => {
    const files = Array.from(event.target.files || []);
    event.target.value = ""; // the same photo can be picked again
    if (files.length) handler(files);
  });
}

async function start() {
  const token = $("token");
  token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  token.addEventListener("input", () => sessionStorage.setItem(TOKEN_KEY, token.value.trim()));
  $("model").addEventListener("change", () => loadModel().catch((e) => showError(e.message)));
  onFiles("predict-camera", predict);
  onFiles("predict-files", predict);
  onFiles("learn-camera", (f) => pick("learn", f));
  onFiles("learn-files", (f) => pick("learn", f));
  onFiles("good-camera", (f) => pick("good", f));
  onFiles("good-files", (f) => pick("good", f));
  $("learn-button").addEventListener("click", teach);
  $("learn-clear").addEventListener("click", () => unpick("learn"));
  $("good-button").addEventListener("click", addGood);
  $("good-clear").addEventListener("click", () => unpick("good"));
  $("versions-button").addEventListener("click", showVersions);
  await waitReady();
  try {
    await loadModels();
  } catch (e) {
    showError(e.message);
  }
}

start();
