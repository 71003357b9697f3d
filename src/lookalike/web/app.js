// The lookalike search page: pick/drop/paste/shoot a photo, optionally drag a box
// around one item, type words, filter, and see the best products: like the photo, matching
// the words, or both. Plain JS, no build step. Talks only to the API it is served by:
// POST /search, GET /search?q=, GET /products/{id}/similar, GET /categories, GET /readyz.

const MAX_UPLOAD_SIDE = 2048; // bigger photos are scaled down in the browser before upload
const MIN_SELECTION_PX = 8; // a drag smaller than this (on screen) is a click, not a box

const $ = (id) => document.getElementById(id);
const els = {
  zone: $("drop-zone"),
  hint: $("drop-hint"),
  file: $("file-input"),
  camera: $("camera-input"),
  preview: $("preview"),
  stage: $("stage"),
  img: $("preview-img"),
  selection: $("selection"),
  cropInfo: $("crop-info"),
  clearCrop: $("clear-crop"),
  form: $("filters"),
  q: $("q"),
  wordsNote: $("words-note"),
  category: $("category"),
  priceMin: $("price-min"),
  priceMax: $("price-max"),
  inStock: $("in-stock"),
  k: $("k"),
  searchButton: $("search-button"),
  error: $("error"),
  heading: $("results-heading"),
  back: $("back"),
  timing: $("timing"),
  busy: $("busy"),
  empty: $("empty"),
  grid: $("grid"),
  status: $("catalog-status"),
};

const state = {
  file: null, // the photo as picked (File/Blob)
  upload: null, // what is sent: the photo, or a scaled-down copy of it
  uploadScale: 1, // upload pixels per natural pixel
  natural: null, // {w, h} of the photo as displayed (EXIF-rotated), when the browser can show it
  crop: null, // {x, y, w, h} in natural pixels, or null for the whole photo
  mode: "photo", // "photo" (photo and/or words) or "similar"
  similarTo: null, // {product_id, title} in "similar" mode
  request: 0, // id of the newest request; older answers are dropped
  revealResults: false, // on a phone, scroll to the results once they arrive
  controller: null,
  objectUrl: null,
};

const priceFormat = new Intl.NumberFormat(undefined, {
  minimumFractionDigits: 2,
  maximumFractionDigits: 2,
});

// ---------------------------------------------------------------- catalog status

async function loadStatus(attempt = 0) {
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    if (response.ok) {
      const products = Number(body.products || 0).toLocaleString();
      const tuned = body.tuned ? `, tuned on ${body.tuned_on || body.tuned}` : "";
      const calibrated = body.calibrated_on
        ? `, calibrated on ${Number(body.calibrated_on).toLocaleString()} photos`
        : "";
      els.status.textContent =
        `${products} products · ${body.model || "model ready"}${tuned}${calibrated}`;
      await loadCategories();
      return;
    }
    if (body.status === "failed") {
      els.status.textContent = "The catalog could not be opened; see the server log.";
      return;
    }
    els.status.textContent = "Loading the model…";
  } catch {
    els.status.textContent = "Cannot reach the server; retrying…";
  }
  setTimeout(() => loadStatus(attempt + 1), Math.min(5000, 1000 + attempt * 500));
}

async function loadCategories() {
  try {
    const response = await fetch("/categories");
    if (!response.ok) return;
    const { categories } = await response.json();
    const current = els.category.value;
    els.category.length = 1; // keep "All categories"
    for (const { name, count } of categories) {
      const option = new Option(`${name} (${count.toLocaleString()})`, name);
      els.category.add(option);
    }
    els.category.value = current;
  } catch {
    /* the filter still works as "All categories" */
  }
}

// ---------------------------------------------------------------- choosing a photo

function setPhoto(file) {
  if (!file) return;
  state.file = file;
  state.upload = file;
  state.uploadScale = 1;
  state.crop = null;
  state.natural = null;
  state.mode = "photo";
  state.similarTo = null;
  state.revealResults = true;
  hideError();
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = URL.createObjectURL(file);
  els.zone.classList.add("has-image");
  els.hint.hidden = true;
  els.preview.hidden = false;
  els.selection.hidden = true;
  els.clearCrop.hidden = true;
  els.searchButton.disabled = false;
  els.img.onload = async () => {
    state.natural = { w: els.img.naturalWidth, h: els.img.naturalHeight };
    els.stage.classList.remove("no-preview");
    els.cropInfo.textContent = "Drag on the photo to search just one item.";
    await prepareUpload();
    runSearch();
  };
  els.img.onerror = () => {
    // The browser cannot show it (HEIC, or not an image at all): the server decides.
    els.img.removeAttribute("src");
    els.stage.classList.add("no-preview");
    els.cropInfo.textContent = `This browser cannot preview ${file.name || "this file"}.`;
    runSearch();
  };
  els.img.src = state.objectUrl;
}

async function prepareUpload() {
  const { w, h } = state.natural;
  const side = Math.max(w, h);
  if (side <= MAX_UPLOAD_SIDE) return;
  const scale = MAX_UPLOAD_SIDE / side;
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(w * scale));
  canvas.height = Math.max(1, Math.round(h * scale));
  canvas.getContext("2d").drawImage(els.img, 0, 0, canvas.width, canvas.height);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
  if (blob) {
    state.upload = blob;
    state.uploadScale = canvas.width / w;
  }
}

els.file.addEventListener("change", () => {
  setPhoto(els.file.files[0]);
  els.file.value = ""; // picking the same file again still fires "change"
});
els.camera.addEventListener("change", () => {
  setPhoto(els.camera.files[0]);
  els.camera.value = "";
});

// drag and drop anywhere on the page
let dragDepth = 0;
document.addEventListener("dragenter", (event) => {
  if (!hasFiles(event)) return;
  dragDepth += 1;
  els.zone.classList.add("dragging");
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) els.zone.classList.remove("dragging");
});
document.addEventListener("dragover", (event) => {
  if (hasFiles(event)) event.preventDefault();
});
document.addEventListener("drop", (event) => {
  if (!hasFiles(event)) return;
  event.preventDefault();
  dragDepth = 0;
  els.zone.classList.remove("dragging");
  setPhoto(event.dataTransfer.files[0]);
});
function hasFiles(event) {
  return Array.from(event.dataTransfer?.types || []).includes("Files");
}

// paste an image from the clipboard
document.addEventListener("paste", (event) => {
  const items = Array.from(event.clipboardData?.items || []);
  const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (!item) return;
  event.preventDefault();
  const file = item.getAsFile();
  const name = file.name && file.name !== "image.png" ? file.name : "pasted image";
  setPhoto(new File([file], name, { type: file.type }));
});

// ---------------------------------------------------------------- selecting a region

let drag = null;

function stagePoint(event) {
  const rect = els.stage.getBoundingClientRect();
  return {
    x: Math.min(Math.max(event.clientX - rect.left, 0), rect.width),
    y: Math.min(Math.max(event.clientY - rect.top, 0), rect.height),
  };
}

els.stage.addEventListener("pointerdown", (event) => {
  if (!state.natural || event.button > 0) return;
  event.preventDefault();
  els.stage.setPointerCapture(event.pointerId);
  const start = stagePoint(event);
  drag = { start, rect: { x: start.x, y: start.y, w: 0, h: 0 } };
});

els.stage.addEventListener("pointermove", (event) => {
  if (!drag) return;
  const p = stagePoint(event);
  const x = Math.min(p.x, drag.start.x);
  const y = Math.min(p.y, drag.start.y);
  drag.rect = { x, y, w: Math.abs(p.x - drag.start.x), h: Math.abs(p.y - drag.start.y) };
  showSelection(drag.rect);
});

function endDrag() {
  if (!drag) return;
  const { rect } = drag;
  drag = null;
  if (rect.w < MIN_SELECTION_PX || rect.h < MIN_SELECTION_PX) {
    if (state.crop) clearCrop();
    else els.selection.hidden = true;
    return;
  }
  const sx = state.natural.w / els.stage.clientWidth;
  const sy = state.natural.h / els.stage.clientHeight;
  state.crop = {
    x: Math.round(rect.x * sx),
    y: Math.round(rect.y * sy),
    w: Math.max(1, Math.round(rect.w * sx)),
    h: Math.max(1, Math.round(rect.h * sy)),
  };
  renderCrop();
  state.mode = "photo";
  runSearch();
}
els.stage.addEventListener("pointerup", endDrag);
els.stage.addEventListener("pointercancel", endDrag);

function showSelection(rect) {
  Object.assign(els.selection.style, {
    left: `${rect.x}px`,
    top: `${rect.y}px`,
    width: `${rect.w}px`,
    height: `${rect.h}px`,
  });
  els.selection.hidden = false;
}

function renderCrop() {
  if (!state.crop || !state.natural) {
    els.selection.hidden = true;
    els.clearCrop.hidden = true;
    els.cropInfo.textContent = state.natural
      ? "Drag on the photo to search just one item."
      : els.cropInfo.textContent;
    return;
  }
  const sx = els.stage.clientWidth / state.natural.w;
  const sy = els.stage.clientHeight / state.natural.h;
  const c = state.crop;
  showSelection({ x: c.x * sx, y: c.y * sy, w: c.w * sx, h: c.h * sy });
  els.clearCrop.hidden = false;
  els.cropInfo.textContent = `Searching the selected area (${c.w} × ${c.h} px).`;
}

function clearCrop() {
  state.crop = null;
  renderCrop();
  state.mode = "photo";
  runSearch();
}
els.clearCrop.addEventListener("click", clearCrop);
window.addEventListener("resize", renderCrop);

// ---------------------------------------------------------------- searching

function filterParams() {
  const params = [["k", els.k.value]];
  if (els.category.value) params.push(["category", els.category.value]);
  if (els.priceMin.value !== "") params.push(["price_min", els.priceMin.value]);
  if (els.priceMax.value !== "") params.push(["price_max", els.priceMax.value]);
  if (els.inStock.checked) params.push(["in_stock", "true"]);
  return params;
}

function validFilters() {
  const min = els.priceMin.value === "" ? null : Number(els.priceMin.value);
  const max = els.priceMax.value === "" ? null : Number(els.priceMax.value);
  if ((min !== null && !(min >= 0)) || (max !== null && !(max >= 0))) {
    showError("Check the price range", "Prices must be numbers of 0 or more.");
    return false;
  }
  if (min !== null && max !== null && min > max) {
    showError("Check the price range", "The minimum price is higher than the maximum.");
    return false;
  }
  return true;
}

function words() {
  return els.q.value.trim();
}

function runSearch() {
  if (state.mode === "similar" && state.similarTo) return runSimilar(state.similarTo);
  const q = words();
  if (!state.upload && !q) return;
  if (!validFilters()) return;
  if (!state.upload) {
    const query = new URLSearchParams([["q", q], ...filterParams()]).toString();
    return send(`/search?${query}`, { method: "GET" }, `Products matching “${q}”`);
  }
  const form = new FormData();
  if (q) form.append("q", q);
  const name = state.file.name || "photo.jpg";
  form.append("image", state.upload, state.upload === state.file ? name : "photo.jpg");
  for (const [key, value] of filterParams()) form.append(key, value);
  if (state.crop) {
    const s = state.uploadScale;
    const c = state.crop;
    const box = [c.x * s, c.y * s, c.w * s, c.h * s].map((v) => Math.round(v));
    box[2] = Math.max(1, box[2]);
    box[3] = Math.max(1, box[3]);
    form.append("crop", box.join(","));
  }
  let heading = state.crop ? "Products like the selected area" : "Products like your photo";
  if (q) heading += `, with “${q}”`;
  return send("/search", { method: "POST", body: form }, heading);
}

function runSimilar(product) {
  if (!validFilters()) return;
  state.mode = "similar";
  state.similarTo = product;
  const query = new URLSearchParams(filterParams()).toString();
  const url = `/products/${encodeURIComponent(product.product_id)}/similar?${query}`;
  const title = product.title || `product ${product.product_id}`;
  return send(url, { method: "GET" }, `More like “${title}”`);
}

async function send(url, options, heading) {
  const id = ++state.request;
  if (state.controller) state.controller.abort();
  state.controller = new AbortController();
  hideError();
  els.busy.hidden = false;
  els.grid.classList.add("stale");
  els.back.hidden = !(state.mode === "similar" && state.file);
  const started = performance.now();
  let response;
  let body;
  try {
    response = await fetch(url, { ...options, signal: state.controller.signal });
    body = await response.json().catch(() => null);
  } catch (error) {
    if (error.name === "AbortError") return;
    if (id !== state.request) return;
    finish();
    showError("Cannot reach the server", "Check that lookalike is still running, then try again.");
    return;
  }
  if (id !== state.request) return; // a newer search is on its way
  finish();
  if (!response.ok) {
    const { title, detail } = describeError(response.status, body);
    clearResults();
    showError(title, detail);
    return;
  }
  const total = Math.round(performance.now() - started);
  els.heading.textContent = heading;
  render(body.results, body.mode || "photo");
  showWordsNote(body);
  const count = body.results.length;
  els.timing.textContent =
    `${count} result${count === 1 ? "" : "s"} · ${formatMs(body.took_ms)} on the server · ` +
    `${total} ms in all`;
  if (state.revealResults && window.matchMedia("(max-width: 760px)").matches) {
    els.heading.scrollIntoView({ behavior: "smooth", block: "start" });
  }
  state.revealResults = false;
}

function showWordsNote(body) {
  let text = "";
  if (body.note) text = body.note.charAt(0).toUpperCase() + body.note.slice(1) + ".";
  else if (body.unmatched && body.unmatched.length)
    text = `No result has the word${body.unmatched.length === 1 ? "" : "s"}: ${body.unmatched.join(", ")}.`;
  els.wordsNote.textContent = text;
  els.wordsNote.hidden = !text;
}

function clearResults() {
  els.wordsNote.hidden = true;
  els.grid.replaceChildren();
  els.heading.textContent = "Results";
  els.timing.textContent = "";
  els.empty.hidden = false;
  els.empty.textContent = "Your matches will appear here.";
}

function finish() {
  els.busy.hidden = true;
  els.grid.classList.remove("stale");
}

function formatMs(ms) {
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
}

function describeError(status, body) {
  const detail = (body && body.detail) || `The server answered ${status}.`;
  const titles = {
    400: "That request could not be read",
    401: "Not allowed",
    403: "Not allowed",
    404: "Not found",
    413: "That photo is too large",
    415: "That file is not an image we can read",
    422: "Please check your search",
    503: "The search engine is still starting",
  };
  const title = titles[status] || "Something went wrong";
  return { title, detail: status >= 500 && status !== 503 ? "Please try again." : detail };
}

function showError(title, detail) {
  els.error.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = title;
  const text = document.createElement("span");
  text.textContent = detail;
  els.error.append(strong, text);
  els.error.hidden = false;
}

function hideError() {
  els.error.hidden = true;
}

// ---------------------------------------------------------------- results

const SCORE_LABELS = {
  photo: ["similarity", "Cosine similarity to your photo (1 = identical)"],
  words: ["words match", "How well the product's title, category and attributes match your words"],
  both: ["score", "The photo's similarity and the words' match, combined"],
};

function render(results, mode = "photo") {
  els.grid.replaceChildren(...results.map((result) => card(result, mode)));
  els.empty.hidden = results.length > 0;
  els.empty.textContent = "No products match. Try fewer filters or a different area.";
}

function card(result, mode = "photo") {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.dataset.productId = result.product_id;
  button.title = "More like this";

  const thumb = document.createElement("div");
  thumb.className = "thumb";
  const img = document.createElement("img");
  img.src = result.image_url;
  img.alt = result.title || `Product ${result.product_id}`;
  thumb.append(img);

  const body = document.createElement("div");
  body.className = "body";
  const title = document.createElement("p");
  title.className = "title";
  title.textContent = result.title || `Product ${result.product_id}`;
  body.append(title);
  if (result.category) {
    const category = document.createElement("span");
    category.className = "category";
    category.textContent = result.category;
    body.append(category);
  }

  const meta = document.createElement("div");
  meta.className = "meta";
  const price = document.createElement("span");
  price.className = "price";
  price.textContent = result.price == null ? "—" : priceFormat.format(result.price);
  const stock = document.createElement("span");
  stock.className = `badge ${result.in_stock === false ? "out" : "in"}`;
  stock.textContent = result.in_stock === false ? "Out of stock" : "In stock";
  meta.append(price, stock);

  if (result.matched && result.matched.length) {
    const matched = document.createElement("p");
    matched.className = "matched";
    matched.textContent = `words: ${result.matched.join(", ")}`;
    body.append(matched);
  }

  const score = document.createElement("div");
  score.className = "score";
  const [scoreName, scoreHelp] = SCORE_LABELS[mode] || SCORE_LABELS.photo;
  score.title = scoreHelp;
  const label = document.createElement("span");
  label.textContent = `${scoreName} ${result.score.toFixed(2)}`;
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("i");
  fill.style.width = `${Math.round(Math.max(0, Math.min(1, result.score)) * 100)}%`;
  bar.append(fill);
  score.append(label, bar);

  body.append(meta, score);
  button.append(thumb, body);
  button.addEventListener("click", () => {
    state.revealResults = true;
    runSimilar({ product_id: result.product_id, title: result.title });
    els.heading.scrollIntoView({ behavior: "smooth", block: "nearest" });
  });
  li.append(button);
  return li;
}

els.back.addEventListener("click", () => {
  state.mode = "photo";
  state.similarTo = null;
  els.back.hidden = true;
  runSearch();
});

// ---------------------------------------------------------------- filters

els.form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (words()) {
    state.mode = "photo"; // new words: a new search, not "more like" a product
    state.similarTo = null;
  }
  runSearch();
});
els.q.addEventListener("input", () => {
  els.searchButton.disabled = !state.upload && !words();
});
for (const el of [els.category, els.inStock, els.k, els.priceMin, els.priceMax]) {
  el.addEventListener("change", () => {
    if (state.upload || state.similarTo) runSearch();
  });
}

loadStatus();
