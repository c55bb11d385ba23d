"use strict";
// The demo page: it talks to the KServe v2 REST API of the server that served it (relative URLs, so it also
// works behind a path prefix). No build step, no CDN: this file, demo.css and index.html are all of it.

const DRAWS_SHOWN = 3; // random draws shown per image, each with its purified image
const TOP_K = 5;
const $ = (id) => document.getElementById(id);
const state = { model: "", input: "", images: [] }; // images: {name, base64, card}

function headers() {
  const token = $("token").value.trim();
  return token ? { "Content-Type": "application/json", Authorization: `Bearer ${token}` } : { "Content-Type": "application/json" };
}

// A REST call; the server's {"error": ...} becomes the thrown message.
async function api(path, body) {
  const init = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function status(text) {
  $("status").textContent = text;
}

async function connect() {
  try {
    const index = await api("v2/repository/index", {});
    $("model").replaceChildren(...index.map((m) => new Option(m.name, m.name)));
    await useModel(index[0].name);
  } catch (error) {
    status(`Cannot reach the server's API: ${error.message}`);
  }
}

async function useModel(name) {
  const base = `v2/models/${encodeURIComponent(name)}`;
  const [metadata, config] = await Promise.all([api(base), api(`${base}/config`)]);
  const encoded = metadata.inputs.find((i) => i.datatype === "BYTES");
  const outputs = metadata.outputs.map((o) => o.name);
  if (!encoded || !outputs.includes("PURIFIED")) {
    status(`Model ${name} takes no encoded images or has no purified output: export it with this atop-export`);
    return;
  }
  state.model = name;
  state.input = encoded.name;
  const maxDraws = Number(config.parameters?.max_draws?.string_value || 16);
  $("draws").max = String(maxDraws);
  $("draws").value = String(Math.min(Number($("draws").value), maxDraws));
  $("draws-value").textContent = $("draws").value;
  status(`Ready: ${name}, ${metadata.outputs[0].shape.at(-1)} classes, up to ${maxDraws} draws. Add images.`);
  state.images.forEach(classify);
}

function infer(image, copies, draws, outputs) {
  return api(`v2/models/${encodeURIComponent(state.model)}/infer`, {
    parameters: { draws },
    inputs: [{ name: state.input, shape: [copies, 1], datatype: "BYTES", data: Array(copies).fill(image.base64) }],
    outputs,
  });
}

function byName(response) {
  return Object.fromEntries(response.outputs.map((o) => [o.name, o]));
}

// Row `row` of an FP32 [N,3,H,W] tensor in [0,1] onto a canvas.
function paint(canvas, tensor, row) {
  const [, , height, width] = tensor.shape;
  const plane = height * width;
  const offset = row * 3 * plane;
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) pixels.data[4 * p + c] = Math.round(255 * tensor.data[offset + c * plane + p]);
    pixels.data[4 * p + 3] = 255;
  }
  context.putImageData(pixels, 0, 0);
  canvas.dataset.rendered = "true";
}

function parseClass(text) {
  const [score, index, ...label] = text.split(":");
  return { score: Number(score), index: Number(index), label: label.join(":") };
}

function figure(caption, canvas) {
  const element = document.createElement("figure");
  element.className = "draw";
  element.append(canvas, Object.assign(document.createElement("figcaption"), { textContent: caption }));
  return element;
}

// Each image is asked twice: DRAWS_SHOWN copies with one draw each (their RT'd and purified images and top-1),
// and once with K draws (the averaged answer and its stability).
async function classify(image) {
  const card = image.card;
  const draws = Number($("draws").value);
  card.dataset.state = "pending";
  card.querySelector(".error").textContent = "";
  try {
    const classification = (k) => ({ name: "PROBABILITIES", parameters: { classification: k } });
    const [shown, averaged] = await Promise.all([
      infer(image, DRAWS_SHOWN, 1, [classification(1), { name: "RT_IMAGE" }, { name: "PURIFIED" }]),
      infer(image, 1, draws, [classification(TOP_K), { name: "STABILITY" }]),
    ]);
    const drawn = byName(shown);
    const figures = [];
    for (let i = 0; i < DRAWS_SHOWN; i++) {
      const rt = Object.assign(document.createElement("canvas"), { className: "rt" });
      const purified = Object.assign(document.createElement("canvas"), { className: "purified" });
      paint(rt, drawn.RT_IMAGE, i);
      paint(purified, drawn.PURIFIED, i);
      figures.push(figure(`draw ${i + 1}: transformed`, rt));
      figures.push(figure(`purified → ${parseClass(drawn.PROBABILITIES.data[i]).label}`, purified));
    }
    card.querySelector(".draws").replaceChildren(...figures);
    const answer = byName(averaged);
    const top = answer.PROBABILITIES.data.map(parseClass);
    card.querySelector(".topk").replaceChildren(
      ...top.map(({ label, score }) => {
        const item = document.createElement("li");
        const bar = Object.assign(document.createElement("span"), { className: "bar" });
        bar.style.width = `${Math.round(score * 120)}px`;
        item.append(Object.assign(document.createElement("span"), { className: "label", textContent: label }));
        item.append(` ${score.toFixed(3)}`, bar);
        return item;
      }),
    );
    card.querySelector(".k").textContent = String(draws);
    card.querySelector(".stability").textContent = `${Math.round(answer.STABILITY.data[0] * 100)}% of the draws agree`;
    card.dataset.state = "done";
  } catch (error) {
    card.querySelector(".error").textContent = error.message;
    card.dataset.state = "error";
  }
}

function add(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const card = $("card").content.firstElementChild.cloneNode(true);
    card.querySelector("img").src = reader.result;
    card.querySelector(".name").textContent = file.name;
    $("results").prepend(card);
    const image = { name: file.name, base64: reader.result.split(",", 2)[1], card };
    state.images.push(image);
    if (state.model) classify(image);
  };
  reader.readAsDataURL(file);
}

const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  [...event.dataTransfer.files].forEach(add);
});
$("files").addEventListener("change", (event) => [...event.target.files].forEach(add));
$("model").addEventListener("change", (event) => useModel(event.target.value).catch((e) => status(e.message)));
let pending = 0;
$("draws").addEventListener("input", () => {
  $("draws-value").textContent = $("draws").value;
  clearTimeout(pending); // a slider drag asks once, when it rests
  pending = setTimeout(() => state.images.forEach(classify), 300);
});
$("token").addEventListener("change", connect);
connect();
