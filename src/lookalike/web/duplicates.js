// The duplicates review page: groups of catalog images that are the same photo under
// different products, a page at a time from GET /duplicates; click an image to open its
// product. Plain JS, no build step; talks only to the API it is served by.

const PAGE = 12;
const $ = (id) => document.getElementById(id);
const state = { offset: 0, total: 0 };

function params() {
  const query = new URLSearchParams({ limit: PAGE, offset: state.offset });
  const threshold = $("threshold").value.trim();
  if (threshold !== "") query.set("threshold", threshold);
  if ($("within").checked) query.set("within_products", "true");
  return query;
}

async function getJson(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

function showError(message) {
  $("dup-error").hidden = !message;
  $("dup-error").textContent = message || "";
}

async function load() {
  showError("");
  $("dup-busy").hidden = false;
  $("groups").classList.add("stale");
  try {
    const page = await getJson(`/duplicates?${params()}`);
    state.total = page.total;
    render(page);
  } catch (err) {
    showError(`Could not load duplicates: ${err.message}`);
  } finally {
    $("dup-busy").hidden = true;
    $("groups").classList.remove("stale");
  }
}

function render(page) {
  const list = $("groups");
  list.replaceChildren(...page.groups.map((group, i) => groupItem(group, page.offset + i + 1)));
  $("dup-empty").hidden = page.total > 0;
  const last = Math.min(page.offset + page.groups.length, page.total);
  $("page-info").textContent = page.total
    ? `groups ${page.offset + 1}–${last} of ${page.total}`
    : "";
  $("prev").disabled = page.offset === 0;
  $("next").disabled = last >= page.total;
  $("dup-status").textContent =
    `${page.total} group${page.total === 1 ? "" : "s"} among ${page.images} images` +
    ` · threshold ${page.threshold.toFixed(3)}`;
  if ($("threshold").value === "") $("threshold").placeholder = page.threshold.toFixed(3);
}

function groupItem(group, number) {
  const item = document.createElement("li");
  item.className = "group";
  const products = new Set(group.images.map((image) => image.product_id));
  const head = document.createElement("p");
  head.className = "group-head";
  head.textContent =
    `${number}. ${group.images.length} images · ${products.size} products` +
    ` · score ${group.score.toFixed(3)}`;
  const row = document.createElement("div");
  row.className = "group-images";
  for (const image of group.images) row.append(imageTile(image));
  item.append(head, row);
  return item;
}

function imageTile(image) {
  const tile = document.createElement("button");
  tile.type = "button";
  tile.className = "dup-tile";
  tile.dataset.productId = image.product_id;
  tile.title = `Open product ${image.product_id}`;
  const img = document.createElement("img");
  img.src = `/images/${image.image_id}?size=256`;
  img.alt = `product ${image.product_id}, image ${image.image_id}`;
  img.loading = "lazy";
  const caption = document.createElement("span");
  caption.className = "dup-caption";
  caption.textContent = image.product_id;
  tile.append(img, caption);
  tile.addEventListener("click", () => openProduct(image.product_id));
  return tile;
}

async function openProduct(productId) {
  try {
    const product = await getJson(`/products/${encodeURIComponent(productId)}`);
    $("product-title").textContent = product.title || `Product ${product.product_id}`;
    const fields = [
      ["id", product.product_id],
      ["category", product.category],
      ["price", product.price == null ? null : product.price.toFixed(2)],
      ["in stock", product.in_stock ? "yes" : "no"],
      ...Object.entries(product.attributes || {}),
    ].filter(([, value]) => value != null && value !== "");
    $("product-fields").replaceChildren(
      ...fields.flatMap(([name, value]) => {
        const dt = document.createElement("dt");
        dt.textContent = name;
        const dd = document.createElement("dd");
        dd.textContent = String(value);
        return [dt, dd];
      }),
    );
    $("product-images").replaceChildren(
      ...product.images.map((image) => {
        const link = document.createElement("a");
        link.href = image.full_image_url;
        link.target = "_blank";
        link.rel = "noopener";
        const img = document.createElement("img");
        img.src = image.image_url;
        img.alt = `image ${image.image_id}`;
        link.append(img);
        return link;
      }),
    );
    $("product").showModal();
  } catch (err) {
    showError(`Could not open product ${productId}: ${err.message}`);
  }
}

$("dup-controls").addEventListener("submit", (event) => {
  event.preventDefault();
  state.offset = 0;
  load();
});
$("prev").addEventListener("click", () => {
  state.offset = Math.max(0, state.offset - PAGE);
  load();
});
$("next").addEventListener("click", () => {
  state.offset += PAGE;
  load();
});

load();
