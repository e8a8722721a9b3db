// lenet serve: draw, upload or pick an input; every served run answers side by side.
// Plain JS, no build step, nothing fetched from anywhere but this server.
"use strict";

const RAW = 28;  // raw inputs are 28x28 uint8, 0 = background (the API's octet-stream body)
const DEBOUNCE_MS = 40;  // while drawing: a request at most this often
const VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80",
                 "#5ec962", "#addc30", "#fde725"].map(h => [1, 3, 5].map(i => parseInt(h.substr(i, 2), 16)));

const $ = id => document.getElementById(id);
const pad = $("pad");
const ctx = pad.getContext("2d", { willReadFrequently: true });
let info = null;
let seq = 0;            // the newest input's number; older answers are dropped
let inflight = [];      // AbortControllers of the requests for older inputs
let timer = null;
let lightInk = false;   // drawing on a dark picture (an example, noise) uses white ink
let last = null;        // the previous pointer position while a stroke is drawn

function colour(t) {
  t = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}
const LUT = Array.from({ length: 256 }, (_, i) => colour(i / 255));

function bytes(b64) {
  const s = atob(b64), out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function say(text, isError = false) {
  const st = $("status");
  st.textContent = text;
  st.classList.toggle("error", isError);
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  e.append(...children);
  return e;
}

// ---- the columns, one per served run ----------------------------------------------------

// With more classes than MANY (EMNIST's 47 or 62), the bars show the TOP most likely only,
// most likely first; a column of 62 bars would push the feature maps off the screen.
const MANY = 12, TOP = 10;

function ranks(p) {
  const order = [...p.keys()].sort((a, b) => p[b] - p[a] || a - b), rank = [];
  order.forEach((k, r) => { rank[k] = r; });
  return rank;
}

function buildColumns() {
  const box = $("models");
  info.models.forEach((m, i) => {
    const acc = m.test_accuracy == null ? "" : `, test accuracy ${(100 * m.test_accuracy).toFixed(1)}%`;
    const bars = el("ol", { class: "bars", "aria-label": `class probabilities, ${m.run}` });
    m.classes.forEach((c, k) => bars.append(el("li", { "data-class": c },
      el("span", { text: c }), el("span", { class: "track" }, el("span", { class: "fill" })),
      el("span", { class: "p", text: "–" }))));
    const many = m.classes.length > MANY;
    if (many) bars.querySelectorAll("li").forEach((li, k) => { li.hidden = k >= TOP; });
    const sees = el("canvas", { width: m.image_size, height: m.image_size, role: "img",
                                "aria-label": `what ${m.run} sees: the ${m.image_size}x${m.image_size} input` });
    const col = el("section", { class: "model", id: `m${i}`, "aria-label": `run ${m.run}` },
      el("h2", { text: m.run }),
      el("p", { class: "meta", text: `${m.preset}, ${m.activation}, epoch ${m.epoch}${acc}` }),
      el("div", { class: "top" },
        el("figure", { class: "sees" }, sees, el("figcaption", { text: "what the network sees" })),
        el("div", { class: "result" }, el("p", { class: "answer", "aria-live": "polite", text: "…" }), bars,
           ...(many ? [el("p", { class: "more", text: `the ${TOP} most likely of ${m.classes.length} classes` })] : []))));
    for (const [name, shape] of Object.entries(m.feature_maps)) {
      const maps = el("div", { class: `maps ${name}${shape[0] > 8 ? " small" : ""}` });
      for (let c = 0; c < shape[0]; c++) {
        maps.append(el("canvas", { width: shape[2], height: shape[1], role: "img",
          "aria-label": `${name} channel ${c + 1} of ${shape[0]}`, title: `${name} channel ${c + 1}` }));
      }
      const bar = el("canvas", { width: 120, height: 1, "aria-hidden": "true" });
      const b = bar.getContext("2d"), img = b.createImageData(120, 1);
      for (let x = 0; x < 120; x++) img.data.set([...colour(x / 119), 255], 4 * x);
      b.putImageData(img, 0, 0);
      col.append(el("figure", { class: `fmaps ${name}` },
        el("h3", { text: `${name} after ${m.activation}: ${shape[0]} maps of ${shape[1]}x${shape[2]}` }),
        maps,
        el("figcaption", { class: "legend" }, el("span", { class: "lo" }), bar,
           el("span", { class: "hi" }), el("span", { class: "range" }))));
    }
    box.append(col);
  });
}

function grey(canvas, data) {
  const c = canvas.getContext("2d"), img = c.createImageData(canvas.width, canvas.height);
  data.forEach((v, i) => img.data.set([v, v, v, 255], 4 * i));
  c.putImageData(img, 0, 0);
}

function render(i, r) {
  const col = $(`m${i}`);
  grey(col.querySelector(".sees canvas"), bytes(r.input.data));
  col.querySelector(".answer").textContent =
    `${r.top.class}: ${(100 * r.top.probability).toFixed(1)}%`;
  const rank = r.probabilities.length > MANY ? ranks(r.probabilities) : null;
  col.querySelectorAll(".bars li").forEach((li, k) => {
    const p = r.probabilities[k];
    if (rank) { li.hidden = rank[k] >= TOP; li.style.order = rank[k]; }
    li.classList.toggle("best", k === r.top.index);
    li.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    li.querySelector(".p").textContent = `${(100 * p).toFixed(1)}%`;
  });
  col.dataset.probabilities = r.probabilities.join(",");
  for (const [name, fm] of Object.entries(r.feature_maps)) {
    const q = bytes(fm.data), [n, h, w] = fm.shape, [lo, hi] = fm.scale;
    const step = (fm.max - fm.min) / 255, span = hi - lo || 1;
    const lut = Array.from({ length: 256 }, (_, b) => LUT[Math.round(255 * Math.min(1, Math.max(0,
      (fm.min + b * step - lo) / span)))]);
    const fig = col.querySelector(`.fmaps.${name}`);
    fig.querySelectorAll(".maps canvas").forEach((cv, c) => {
      const g = cv.getContext("2d"), img = g.createImageData(w, h);
      for (let p = 0; p < h * w; p++) img.data.set([...lut[q[c * h * w + p]], 255], 4 * p);
      g.putImageData(img, 0, 0);
    });
    fig.querySelector(".lo").textContent = lo.toFixed(2);
    fig.querySelector(".hi").textContent = hi.toFixed(2);
    fig.querySelector(".range").textContent = `this input: min ${fm.min.toFixed(3)}, max ${fm.max.toFixed(3)}`;
  }
  col.dataset.seq = String(seq);
}

// ---- asking the server; the newest input wins -------------------------------------------

async function submit(body, type, label) {
  const mine = ++seq;
  inflight.forEach(c => c.abort());
  inflight = info.models.map(() => new AbortController());
  const asks = info.models.map(async (_, i) => {
    const res = await fetch(`/api/predict?model=${i}`, { method: "POST", body,
      headers: { "Content-Type": type }, signal: inflight[i].signal });
    const data = await res.json();
    if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
    if (mine === seq) render(i, data);
  });
  try {
    await Promise.all(asks);
    if (mine === seq) say(label);
  } catch (e) {
    if (e.name !== "AbortError" && mine === seq) say(e.message, true);
  }
}

// While drawing: at most one request in flight; strokes made meanwhile are sent when it
// returns, so the page never falls behind and the newest drawing is always the last answer.
let drawing = null;    // the drawing request in flight, if any
let redraw = false;    // the pad changed while it was in flight
let drawGen = 0;       // bumped when another input replaces the drawing

async function sendCanvas() {
  if (drawing) { redraw = true; return; }
  const gen = drawGen;
  drawing = new Promise(done => half().toBlob(done, "image/png"))
    // toBlob is asynchronous: a button pressed meanwhile has replaced the drawing
    .then(blob => gen === drawGen ? submit(blob, "image/png", "your drawing") : undefined);
  await drawing;
  drawing = null;
  if (redraw) { redraw = false; sendCanvas(); }
}

// The pad at half size: the server trims and scales to 28x28 anyway, and a quarter of the
// pixels is a quarter of the PNG decoding (most of a request's time).
const SEND = 140;
const small = Object.assign(document.createElement("canvas"), { width: SEND, height: SEND });
function half() {
  const c = small.getContext("2d");
  c.imageSmoothingEnabled = true;
  c.imageSmoothingQuality = "high";
  c.drawImage(pad, 0, 0, SEND, SEND);
  return small;
}

function later() {
  if (timer === null) timer = setTimeout(() => { timer = null; sendCanvas(); }, DEBOUNCE_MS);
}

function forgetDrawing() {  // another input replaces the drawing: drop its pending sends
  clearTimeout(timer);
  timer = null;
  redraw = false;
  drawGen++;
}

function sendRaw(pixels, label) {
  forgetDrawing();
  paintRaw(pixels);
  submit(pixels, "application/octet-stream", label);
}

// ---- the drawing pad ---------------------------------------------------------------------

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  lightInk = false;
}

function paintRaw(pixels) {  // a 28x28 input shown on the pad, drawn over in white ink
  const small = document.createElement("canvas");
  small.width = small.height = RAW;
  grey(small, pixels);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, 0, 0, pad.width, pad.height);
  lightInk = true;
}

function point(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}

function stroke(to) {
  ctx.strokeStyle = lightInk ? "#fff" : "#000";
  ctx.lineWidth = Number($("brush").value);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(...(last || to));
  ctx.lineTo(...to);
  ctx.stroke();
  last = to;
}

pad.addEventListener("pointerdown", e => {
  e.preventDefault();
  pad.setPointerCapture(e.pointerId);
  last = null;
  stroke(point(e));
  later();
});
pad.addEventListener("pointermove", e => {
  if (last === null) return;
  for (const ev of e.getCoalescedEvents ? e.getCoalescedEvents() : [e]) stroke(point(ev));
  later();
});
for (const end of ["pointerup", "pointercancel"]) {
  pad.addEventListener(end, () => {
    if (last === null) return;
    last = null;
    clearTimeout(timer);
    timer = null;
    sendCanvas();  // the finished stroke, at once
  });
}

// ---- the controls ------------------------------------------------------------------------

async function example(query, label) {
  try {
    const res = await fetch(`/api/example${query}`);
    const data = await res.json();
    if (!res.ok) throw new Error(data.error);
    sendRaw(bytes(data.image.data), `${label}: test image #${data.index}, a ${data.label}`);
  } catch (e) {
    say(e.message, true);
  }
}

const actions = {
  clear() { forgetDrawing(); clearPad(); submit(new Uint8Array(RAW * RAW), "application/octet-stream", "cleared"); },
  random() { example("", "random"); },
  example() {
    const c = $("class").value;
    example(`?class=${encodeURIComponent(c)}`, "example");
  },
  noise() { sendRaw(crypto.getRandomValues(new Uint8Array(RAW * RAW)), "uniform noise"); },
  blank() { sendRaw(new Uint8Array(RAW * RAW), "blank (all zeros)"); },
};
for (const [id, act] of Object.entries(actions)) $(id).addEventListener("click", act);

$("brush").addEventListener("input", () => { $("brush-size").textContent = $("brush").value; });

// An image file's type from its first bytes: a file saved without its suffix has no f.type,
// and one with the wrong suffix has the wrong one.
async function imageType(f) {
  const b = new Uint8Array(await f.slice(0, 12).arrayBuffer());
  const text = String.fromCharCode(...b);
  if (b[0] === 0x89 && text.slice(1, 4) === "PNG") return "image/png";
  if (b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return "image/jpeg";
  if (text.startsWith("GIF8")) return "image/gif";
  if (text.startsWith("BM")) return "image/bmp";
  if (text.startsWith("RIFF") && text.slice(8, 12) === "WEBP") return "image/webp";
  return f.type.startsWith("image/") ? f.type : null;  // the server says what it takes
}

// An image file (an upload, a photo): sent as it is, and shown on the pad to draw on.
async function sendPicture(f, label) {
  const type = await imageType(f);
  if (!type) {  // never sent as raw pixels: the pad and the answers would disagree
    say(`${f.name}: not a PNG, JPEG, GIF, BMP or WebP image`, true);
    return;
  }
  forgetDrawing();
  submit(f, type, label);
  try {
    const bmp = await createImageBitmap(f);
    clearPad();
    const s = Math.min(pad.width / bmp.width, pad.height / bmp.height);
    const w = bmp.width * s, h = bmp.height * s;
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(bmp, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    const d = ctx.getImageData(0, 0, pad.width, pad.height).data;
    let sum = 0;
    for (let p = 0; p < d.length; p += 4) sum += d[p] + d[p + 1] + d[p + 2];
    lightInk = sum / (d.length / 4 * 3) < 128;
  } catch (e) { /* the server's answer says what is wrong with the file */ }
}

$("file").addEventListener("change", async () => {
  const f = $("file").files[0];
  if (!f) return;
  await sendPicture(f, `uploaded ${f.name}`);
  $("file").value = "";
});

let lastPhoto = -1;
async function photo(name) {
  lastPhoto = info.samples.indexOf(name);
  try {
    const res = await fetch(`/samples/${name}.jpg`);
    if (!res.ok) throw new Error(`photo ${name}: ${res.status} ${res.statusText}`);
    await sendPicture(await res.blob(), `photo: ${name}`);
  } catch (e) {
    say(e.message, true);
  }
}
actions.photo = () => {
  if (info && info.samples.length) photo(info.samples[(lastPhoto + 1) % info.samples.length]);
};

document.addEventListener("keydown", e => {
  const t = e.target.tagName;
  if (e.ctrlKey || e.metaKey || e.altKey || t === "INPUT" || t === "SELECT" || t === "TEXTAREA") return;
  const act = { c: "clear", r: "random", e: "example", n: "noise", b: "blank", p: "photo" }[e.key];
  if (act && !($(act) && $(act).disabled)) { e.preventDefault(); actions[act](); }
});

async function start() {
  try {
    const res = await fetch("/api/info");
    info = await res.json();
  } catch (e) {
    say(`cannot reach the server: ${e.message}`, true);
    return;
  }
  $("runs").textContent = info.models.map(m => m.run).join(" vs ") +
    (info.examples ? ` · ${info.test_images.toLocaleString()} test images` : " · no test set loaded");
  for (const c of info.classes) $("class").append(el("option", { value: c, text: c }));
  for (const name of info.samples) {
    const b = el("button", { id: `photo-${name}`, type: "button", text: name });
    b.addEventListener("click", () => photo(name));
    $("photos").append(b);
  }
  if (!info.examples) for (const id of ["random", "example", "class"]) $(id).disabled = true;
  buildColumns();
  clearPad();
  if (info.examples) actions.random(); else actions.blank();
}

start();
