// The "similar images" panel: shown only when the bundle has an index (GET /similar says so).
// It listens to the same file input as app.js and asks POST /similar for the nearest indexed images.
"use strict";

async function similarAvailable() {
  try {
    const response = await fetch("/similar", { cache: "no-store" });
    return response.ok && (await response.json()).available;
  } catch (error) {
    return false;
  }
}

function showNeighbours(list, neighbours) {
  list.replaceChildren();
  for (const n of neighbours) {
    const item = document.createElement("li");
    const picture = document.createElement("img");
    picture.src = n.thumbnail;
    picture.alt = n.name;
    const caption = document.createElement("span");
    caption.textContent = `${n.label ?? ""} ${n.similarity.toFixed(3)}`;
    caption.title = n.name;
    item.append(picture, caption);
    list.appendChild(item);
  }
}

async function setUpSimilar() {
  const panel = document.getElementById("similar");
  const input = document.getElementById("file");
  if (!panel || !input || !(await similarAvailable())) return;
  panel.hidden = false;
  const list = document.getElementById("similar-list");
  async function lookUp(file) {
    list.replaceChildren();
    const response = await fetch("/similar?top_k=8", { method: "POST", body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" } });
    if (response.ok) showNeighbours(list, (await response.json()).neighbours);
  }
  input.addEventListener("change", () => { if (input.files && input.files[0]) lookUp(input.files[0]); });
  document.getElementById("drop")?.addEventListener("drop", (event) => {
    if (event.dataTransfer.files.length) lookUp(event.dataTransfer.files[0]);
  });
}

setUpSimilar();
