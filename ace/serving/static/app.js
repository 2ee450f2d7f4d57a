// ACE search page: POST /search, render results as image / audio / video / text cards.
"use strict";

const form = document.getElementById("search-form");
const queryInput = document.getElementById("query");
const modalitySelect = document.getElementById("modality");
const kInput = document.getElementById("k");
const keyInput = document.getElementById("api-key");
const statusBox = document.getElementById("status");
const resultsBox = document.getElementById("results");
const objectUrls = [];

// The key stays in this page's memory; it is kept in localStorage only when "remember" is ticked
// (a script served from this origin could read it there).
const rememberKey = document.getElementById("remember-key");
keyInput.value = localStorage.getItem("ace-api-key") || "";
rememberKey.checked = !!keyInput.value;
function saveKey() {
  if (rememberKey.checked && keyInput.value) localStorage.setItem("ace-api-key", keyInput.value);
  else localStorage.removeItem("ace-api-key");
}
keyInput.addEventListener("change", saveKey);
rememberKey.addEventListener("change", saveKey);

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (keyInput.value) h["X-API-Key"] = keyInput.value;
  return h;
}

function setStatus(text, isError) {
  statusBox.textContent = text;
  statusBox.classList.toggle("error", !!isError);
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Media are plain URLs, unless a key is set: then fetch with the key header and use a blob URL.
async function attachMedia(node, url) {
  if (!keyInput.value) { node.src = url; return; }
  const resp = await fetch(url, { headers: headers() });
  if (!resp.ok) return;
  const blobUrl = URL.createObjectURL(await resp.blob());
  objectUrls.push(blobUrl);
  node.src = blobUrl;
}

function mediaNode(hit) {
  const caption = hit.captions[0] || hit.item_id;
  if (!hit.media_url) return el("div", { class: "no-media" }, hit.modality === "text" ? caption : "no media file");
  let node;
  if (hit.modality === "image") node = el("img", { alt: caption, loading: "lazy" });
  else if (hit.modality === "audio") node = el("audio", { controls: "", preload: "none" });
  else if (hit.modality === "video") node = el("video", { controls: "", preload: "metadata" });
  else return el("div", { class: "no-media" }, caption);
  attachMedia(node, hit.media_url);
  return node;
}

function card(hit, rank) {
  const box = el("article", { class: "result result-" + hit.modality, "data-item-id": hit.item_id });
  box.appendChild(mediaNode(hit));
  const head = el("div", { class: "head" });
  head.appendChild(el("span", { class: "rank" }, "#" + rank));
  head.appendChild(el("span", { class: "badge" }, hit.modality));
  head.appendChild(el("span", { class: "badge " + hit.source }, hit.source));
  box.appendChild(head);
  if (hit.captions.length) box.appendChild(el("p", { class: "caption" }, hit.captions[0]));
  const score = hit.score === null ? "n/a" : hit.score.toFixed(3);
  box.appendChild(el("div", { class: "meta" },
    "id " + hit.item_id + " · score " + score + " · identifier (" + hit.identifier.join(", ") + ")"));
  return box;
}

async function search(event) {
  event.preventDefault();
  const query = queryInput.value.trim();
  if (!query) { setStatus("Type a query first.", true); return; }
  const body = { query: query, k: parseInt(kInput.value, 10) || 10 };
  if (modalitySelect.value) body.modality = modalitySelect.value;
  setStatus("Searching...");
  let resp, data;
  try {
    resp = await fetch("/search", { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
    data = await resp.json();
  } catch (err) {
    setStatus("Search failed: " + err, true);
    return;
  }
  if (!resp.ok) { setStatus("Error " + resp.status + ": " + (data.detail || resp.statusText), true); return; }
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
  resultsBox.replaceChildren(...data.results.map((hit, i) => card(hit, i + 1)));
  setStatus(data.results.length + " result(s) in " + data.latency_ms.toFixed(1) + " ms");
}

form.addEventListener("submit", search);
modalitySelect.addEventListener("change", () => { if (queryInput.value.trim()) form.requestSubmit(); });
