// The imgclf page: pick or drop an image, POST it to /predict, draw the top-5 as bars; the "why?"
// toggle then asks POST /explain for the Grad-CAM heatmap of the same image.
// Plain browser JavaScript, no build step and no third-party code.
"use strict";

const $ = (id) => document.getElementById(id);

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  return { ok: response.ok, body: await response.json() };
}

async function showModel() {
  try {
    const { body } = await getJSON("/metadata");
    const size = body.preprocessing ? body.preprocessing.image_size : "?";
    $("model-info").textContent = `${body.backbone || "model"} · ${body.num_classes} classes · ${size} px`;
  } catch (err) {
    $("model-info").textContent = "model information unavailable";
  }
}

async function waitUntilReady() {
  for (;;) {
    try {
      const { ok, body } = await getJSON("/ready");
      if (ok && body.ready) {
        $("status").textContent = `ready (${body.runtime})`;
        $("status").classList.add("ready");
        return;
      }
      $("status").textContent = "warming up…";
    } catch (err) {
      $("status").textContent = "server unreachable, retrying…";
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function showResults(prediction) {
  const list = $("results");
  list.replaceChildren();
  // A multi-label model answers `labels`: every label over its threshold (possibly none).
  const items = prediction.labels ?? prediction.top_k;
  if (prediction.labels && prediction.labels.length === 0) {
    const li = document.createElement("li");
    li.textContent = "no label over its threshold";
    list.append(li);
  }
  for (const item of items) {
    const percent = (100 * item.probability).toFixed(1);
    const li = document.createElement("li");
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = item.label; // textContent, never innerHTML: labels are data
    const value = document.createElement("span");
    value.textContent = `${percent}%`;
    row.append(label, value);
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${percent}%`;
    bar.append(fill);
    li.append(row, bar);
    list.append(li);
  }
}

let currentFile = null; // the image last classified, for the "why?" toggle
let whyShownFor = null; // the image whose heatmap is loaded in #why-image

function resetWhy() {
  $("why").hidden = true;
  $("why-panel").hidden = true;
  $("why-toggle").setAttribute("aria-pressed", "false");
}

async function loadWhy(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  const response = await fetch("/explain?format=json", { method: "POST", body: form });
  const body = await response.json();
  if (!response.ok) throw new Error(`${response.status}: ${body.error || "request failed"}`);
  const item = body.explanations[0];
  $("why-image").src = `data:image/png;base64,${item.png_base64}`;
  const note = body.note ? ` · ${body.note}` : "";
  $("why-caption").textContent =
    `${item.method} heatmap for ${item.target} (layer ${item.layer}): red is where the model looked${note}`;
  whyShownFor = file;
}

async function toggleWhy() {
  const button = $("why-toggle");
  if (button.getAttribute("aria-pressed") === "true") {
    button.setAttribute("aria-pressed", "false");
    $("why-panel").hidden = true;
    return;
  }
  button.setAttribute("aria-pressed", "true");
  try {
    if (whyShownFor !== currentFile) {
      $("why-caption").textContent = "computing the heatmap…";
      await loadWhy(currentFile);
    }
    $("why-panel").hidden = false;
  } catch (err) {
    button.setAttribute("aria-pressed", "false");
    showError(`explanation failed: ${err.message || err}`);
  }
}

async function classify(file) {
  currentFile = file;
  resetWhy();
  $("error").hidden = true;
  $("results").replaceChildren();
  $("latency").textContent = "classifying…";
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;

  const form = new FormData();
  form.append("file", file, file.name);
  const started = performance.now();
  try {
    const response = await fetch("/predict", { method: "POST", body: form });
    const roundTrip = performance.now() - started;
    const body = await response.json();
    if (!response.ok) {
      $("latency").textContent = "";
      showError(`${response.status}: ${body.error || "request failed"}`);
      return;
    }
    showResults(body.predictions[0]);
    $("why").hidden = false;
    $("latency").textContent =
      `${roundTrip.toFixed(0)} ms round trip · ${body.model_ms.toFixed(1)} ms in the model (${body.runtime})`;
  } catch (err) {
    $("latency").textContent = "";
    showError(`request failed: ${err}`);
  }
}

function setUpInput() {
  const drop = $("drop");
  $("why-toggle").addEventListener("click", toggleWhy);
  $("file").addEventListener("change", (event) => {
    if (event.target.files.length) classify(event.target.files[0]);
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
  });
}

setUpInput();
showModel();
waitUntilReady();
