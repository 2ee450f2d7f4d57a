// ACE search page: POST /search, render results as image / audio / video / text cards.
// The search is in the address (?q=...&modality=...&k=...): links can be shared, back/forward re-run them.
"use strict";

const form = document.getElementById("search-form");
const queryInput = document.getElementById("query");
const modalitySelect = document.getElementById("modality");
const kInput = document.getElementById("k");
const keyInput = document.getElementById("api-key");
const statusBox = document.getElementById("status");
const resultsBox = document.getElementById("results");
const objectUrls = [];
const emptyState = document.getElementById("empty-state");
const errorState = document.getElementById("error-state");
const MODALITIES = Array.from(modalitySelect.options).map(o => o.value).filter(Boolean);
let lastRequest = null;   // {query, modality, k} of the search shown (for "Try again")
let searchSeq = 0;        // only the latest search may write the page

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
async function attachMedia(node, url, attr) {
  attr = attr || "src";
  if (!keyInput.value) { node.setAttribute(attr, url); return; }
  const resp = await fetch(url, { headers: headers() });
  if (!resp.ok) return;
  const blobUrl = URL.createObjectURL(await resp.blob());
  objectUrls.push(blobUrl);
  node.setAttribute(attr, blobUrl);
}

function mediaNode(hit) {
  const caption = hit.captions[0] || hit.item_id;
  if (!hit.media_url) return el("div", { class: "no-media" }, hit.modality === "text" ? caption : "no media file");
  let node;
  if (hit.modality === "image") node = el("img", { alt: caption, loading: "lazy" });
  else if (hit.modality === "audio") node = el("audio", { controls: "", preload: "none" });
  else if (hit.modality === "video") {
    node = el("video", { controls: "", preload: "metadata", "aria-label": caption });  // metadata: an unplayable format shows at once
    if (hit.poster_url) attachMedia(node, hit.poster_url, "poster");
    node.addEventListener("error", () => {
      if (node.parentNode && !node.parentNode.querySelector(".unplayable"))
        node.after(el("p", { class: "unplayable" }, "This browser cannot play this video's format; the still shows a frame of it."));
    });
  }
  else return el("div", { class: "no-media" }, caption);
  attachMedia(node, hit.media_url);
  return node;
}

function card(hit, rank) {
  const box = el("article", { class: "result result-" + hit.modality, "data-item-id": hit.item_id, tabindex: "0" });
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

// ---- the search in the address ----------------------------------------------------------------

function readAddress() {
  const p = new URLSearchParams(window.location.search);
  const req = { query: (p.get("q") || "").trim(), modality: p.get("modality") || "", k: 10, problem: null };
  if (p.has("k")) {
    const k = Number(p.get("k"));
    if (Number.isInteger(k) && k >= 1 && k <= 100) req.k = k;
    else req.problem = "The link asks for k=" + JSON.stringify(p.get("k")) + " results; k must be a whole number from 1 to 100.";
  }
  if (req.modality && !MODALITIES.includes(req.modality)) {
    req.problem = "The link asks for modality " + JSON.stringify(req.modality) + "; this page knows " + MODALITIES.join(", ") + ".";
    req.modality = "";
  }
  return req;
}

function addressOf(req) {
  const p = new URLSearchParams({ q: req.query });
  if (req.modality) p.set("modality", req.modality);
  if (req.k !== 10) p.set("k", String(req.k));
  return "?" + p.toString();
}

function fillForm(req) {
  queryInput.value = req.query;
  modalitySelect.value = req.modality;
  kInput.value = String(req.k);
}

// ---- page states: empty, searching, results / no results, error -------------------------------

function showEmpty() {
  lastRequest = null;
  errorState.hidden = true;
  emptyState.hidden = false;
  resultsBox.replaceChildren();
  setStatus("");
  document.title = "ACE search";
}

function showError(title, text) {
  emptyState.hidden = true;
  errorState.hidden = false;
  document.getElementById("error-title").textContent = title;
  document.getElementById("error-text").textContent = text;
  resultsBox.replaceChildren();
  setStatus(title, true);
}

// What a failed search means for the person at the page, from the HTTP status and the server's detail.
function explain(status, detail) {
  if (status === 401 || status === 403)
    return ["This server needs an API key", "Open “API key” under the search box and enter the key you were given (" + detail + ")."];
  if (status === 400 || status === 422)
    return ["The server could not use this search", detail + " — change the query or the settings and search again."];
  if (status === 503 || status === 504 || status === 429)
    return ["The server is busy", "It could not answer in time (" + detail + "). Wait a moment and try again."];
  return ["The server failed on this search", "Error " + status + ": " + detail + ". The server's log has the details."];
}

async function runSearch(req) {
  const seq = ++searchSeq;
  lastRequest = req;
  emptyState.hidden = true;
  errorState.hidden = true;
  document.title = req.query + " — ACE search";
  const body = { query: req.query, k: req.k };
  if (req.modality) body.modality = req.modality;
  setStatus("Searching…");
  resultsBox.setAttribute("aria-busy", "true");
  let resp, data;
  try {
    resp = await fetch("/search", { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
    const text = await resp.text();
    try { data = JSON.parse(text); } catch (err) { data = { detail: text.slice(0, 200) || resp.statusText }; }
  } catch (err) {
    if (seq !== searchSeq) return;
    resultsBox.removeAttribute("aria-busy");
    showError("Cannot reach the search server", "The page got no answer (" + err.message + "). Check that serve.py is still running, then try again.");
    return;
  }
  if (seq !== searchSeq) return;   // a newer search was started meanwhile
  resultsBox.removeAttribute("aria-busy");
  if (!resp.ok) {
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail || resp.statusText);
    const [title, text] = explain(resp.status, detail);
    showError(title, text);
    return;
  }
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
  if (!data.results.length) {
    resultsBox.replaceChildren(el("p", { class: "no-results" }, "Nothing found for “" + req.query + "”" +
      (req.modality ? " among " + req.modality + " items: try all modalities." : ": try other words.")));
    setStatus("0 results");
    return;
  }
  resultsBox.replaceChildren(...data.results.map((hit, i) => card(hit, i + 1)));
  setStatus(data.results.length + " result(s) in " + data.latency_ms.toFixed(1) + " ms");
}

// The address decides what the page shows: on load, and on back/forward.
function showAddress() {
  const req = readAddress();
  fillForm(req);
  if (req.problem) { showError("This link cannot be searched", req.problem); return; }
  if (!req.query) { showEmpty(); return; }
  runSearch(req);
}

function submit(event) {
  event.preventDefault();
  const k = Number(kInput.value);
  if (!Number.isInteger(k) || k < 1 || k > 100) {
    showError("The number of results is not valid", "k must be a whole number from 1 to 100.");
    kInput.focus();
    return;
  }
  const req = { query: queryInput.value.trim(), modality: modalitySelect.value, k: k };
  if (!req.query) { setStatus("Type a query first.", true); queryInput.focus(); return; }
  const target = addressOf(req);
  if (target !== window.location.search) history.pushState(null, "", target);
  runSearch(req);
}

// ---- keyboard -----------------------------------------------------------------------------------

function cards() { return Array.from(resultsBox.querySelectorAll("article.result")); }

function moveFocus(from, step) {
  const all = cards();
  if (!all.length) return;
  const perRow = Math.max(1, Math.round(resultsBox.clientWidth / all[0].getBoundingClientRect().width));
  const at = all.indexOf(from);
  const delta = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: perRow, ArrowUp: -perRow }[step];
  const next = at + delta;
  if (next < 0) { queryInput.focus(); return; }
  all[Math.min(next, all.length - 1)].focus();
}

function play(cardNode) {
  const media = cardNode.querySelector("audio, video");
  if (media) { if (media.paused) media.play().catch(() => {}); else media.pause(); return; }
  const img = cardNode.querySelector("img");
  if (img && img.src) window.open(img.src, "_blank", "noopener");
}

document.addEventListener("keydown", (event) => {
  const target = event.target;
  const typing = target instanceof HTMLInputElement || target instanceof HTMLSelectElement || target instanceof HTMLTextAreaElement;
  if (event.key === "/" && !typing) { event.preventDefault(); queryInput.focus(); queryInput.select(); return; }
  if (target === queryInput && event.key === "ArrowDown" && cards().length) { event.preventDefault(); cards()[0].focus(); return; }
  if (target === queryInput && event.key === "Escape") { queryInput.select(); return; }
  if (target instanceof HTMLElement && target.matches("article.result")) {
    if (["ArrowRight", "ArrowLeft", "ArrowDown", "ArrowUp"].includes(event.key)) { event.preventDefault(); moveFocus(target, event.key); }
    else if (event.key === "Enter" || event.key === " ") { event.preventDefault(); play(target); }
    else if (event.key === "Escape") { queryInput.focus(); }
  }
});

form.addEventListener("submit", submit);
modalitySelect.addEventListener("change", () => { if (queryInput.value.trim()) form.requestSubmit(); });
document.getElementById("retry").addEventListener("click", () => { if (lastRequest) runSearch(lastRequest); else showAddress(); });
window.addEventListener("popstate", showAddress);

// How many items this server searches, for the empty state (silently left out when /stats needs a key).
fetch("/stats", { headers: headers() }).then(r => r.ok ? r.json() : null).then(s => {
  if (s && typeof s.items === "number") document.getElementById("item-count").textContent = "This server searches " + s.items + " items.";
}).catch(() => {});

showAddress();
