// The page of `vistra serve`: pick or drop an image, POST it to /v1/predict, draw the
// top classes as bars. Plain JavaScript, no libraries, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const TOPK = 5;
const TITLES = {
  400: "This image cannot be read",
  413: "Too large",
  415: "Not an image",
  503: "The service is busy",
  504: "No answer in time",
};

let model = null;
let current = null;      // the File on show
let originalUrl = null;  // its object URL
let overlayUrl = null;   // the heat map overlay of the latest answer, if any

async function loadModel() {
  try {
    const response = await fetch("v1/model");
    model = await response.json();
  } catch (error) {
    setStatus("offline", "bad");
    return;
  }
  $("model-name").textContent = model.name;
  $("model-meta").textContent =
    `${model.classes.length} classes · ${model.input_size.slice(1).join("×")} · ${model.backend}`;
  $("limit").textContent = `up to ${model.max_upload_mb} MB`;
  if (model.explain_methods.length) {
    // The model's default (the method its card records as most faithful) is preselected.
    for (const method of model.explain_methods) {
      const isDefault = method === model.explain_default;
      $("method").add(new Option(isDefault ? `${method} (default)` : method, method,
                                 isDefault, isDefault));
    }
    $("explain-box").hidden = false;
  } else {
    $("explain-off").textContent = `Heat maps off: ${model.explain_unavailable}.`;
    $("explain-off").hidden = false;
  }
  pollReady();
}

async function pollReady() {
  try {
    const response = await fetch("readyz");
    if (response.ok) return setStatus("ready", "good");
    setStatus("warming up", "");
  } catch (error) {
    setStatus("offline", "bad");
  }
  setTimeout(pollReady, 1000);
}

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").className = `pill ${kind}`;
}

function choose(file) {
  if (!file) return;
  current = file;
  overlayUrl = null;
  if (originalUrl) URL.revokeObjectURL(originalUrl);
  originalUrl = URL.createObjectURL(file);
  $("file-name").textContent = `${file.name} · ${formatBytes(file.size)}`;
  $("preview-box").hidden = false;
  showPreview();
  if (model && file.size > model.max_upload_mb * 1024 * 1024) {
    showError(413, `${file.name} is ${formatBytes(file.size)}; the service takes up to ` +
              `${model.max_upload_mb} MB.`);
    return;
  }
  classify();
}

function showPreview() {
  const preview = $("preview");
  preview.src = $("heatmap").checked && overlayUrl ? overlayUrl : originalUrl;
}

async function classify() {
  const file = current;
  const params = new URLSearchParams({ topk: TOPK });
  if ($("heatmap").checked) params.set("explain", $("method").value);
  const body = new FormData();
  body.append("file", file, file.name);
  $("result").classList.add("stale");
  const started = performance.now();
  let response, answer;
  try {
    response = await fetch(`v1/predict?${params}`, { method: "POST", body });
    answer = await response.json().catch(() => null);
  } catch (error) {
    return showError(0, `The service did not answer (${error.message}). Is it still running?`);
  }
  if (file !== current) return;  // a newer image was chosen meanwhile
  if (!response.ok) {
    const detail = answer && typeof answer.detail === "string" ? answer.detail
      : `HTTP ${response.status}`;
    return showError(response.status, detail);
  }
  render(answer, performance.now() - started);
}

function render(answer, roundTrip) {
  $("error").hidden = true;
  $("placeholder").hidden = true;
  const [best] = answer.classes;
  $("top1").textContent = best.class;
  $("top1-prob").textContent = percent(best.probability);
  const list = $("classes");
  list.replaceChildren(...answer.classes.map((entry, rank) => {
    const item = document.createElement("li");
    item.className = rank === 0 ? "bar first" : "bar";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.class;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0.5, 100 * entry.probability)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(entry.probability);
    item.append(name, track, value);
    return item;
  }));
  $("latency").textContent =
    `server ${answer.ms.toFixed(1)} ms · round trip ${roundTrip.toFixed(1)} ms`;
  overlayUrl = answer.explanation
    ? `data:image/png;base64,${answer.explanation.overlay_png}` : null;
  $("explain-note").textContent = answer.explanation
    ? `explains “${answer.explanation.label}”` : "";
  showPreview();
  $("result").classList.remove("stale");
  $("result").hidden = false;
}

function showError(status, detail) {
  $("error-title").textContent = TITLES[status] || (status ? `Error ${status}` : "No answer");
  $("error-detail").textContent = detail;
  $("error").hidden = false;
  $("result").hidden = true;
  $("placeholder").hidden = true;
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

$("file").addEventListener("change", (event) => choose(event.target.files[0]));
const zone = $("dropzone");
for (const name of ["dragenter", "dragover"]) {
  zone.addEventListener(name, (event) => { event.preventDefault(); zone.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  zone.addEventListener(name, () => zone.classList.remove("over"));
}
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  choose(event.dataTransfer.files[0]);
});
$("heatmap").addEventListener("change", () => {
  if (!current) return;
  if ($("heatmap").checked && !overlayUrl) classify(); else showPreview();
});
$("method").addEventListener("change", () => {
  overlayUrl = null;
  if (current && $("heatmap").checked) classify();
});
$("preview").addEventListener("load", (event) => {
  event.target.classList.toggle("pixelated", event.target.naturalWidth < 128);
});

loadModel();
