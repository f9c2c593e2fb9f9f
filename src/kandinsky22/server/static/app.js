// The page talks to the job API: POST /v1/jobs, then follows /v1/jobs/{id}/events (server-sent events) for progress.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// The tasks the page offers where the server runs them (mix, a list of texts and images, is the API's only).
const PAGE_TASKS = ["text2img", "img2img", "inpaint", "depth"];
// The image fields of POST /v1/jobs; each is a file input of the same name (sent as a data: URL).
const IMAGE_FIELDS = ["image", "mask_image", "hint_image"];
let defaults = null; // GET /v1/models "defaults"
let currentJob = null;
let events = null;

async function apiError(response) {
  try {
    const body = await response.json();
    const err = body.error || {};
    let message = err.message || response.statusText;
    if (response.status === 429) {
      message += ` (retry in ${response.headers.get("Retry-After") || "a few"} s)`;
    }
    return message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadServerInfo() {
  const response = await fetch("/v1/models");
  if (!response.ok) {
    $("server-info").textContent = `server: ${await apiError(response)}`;
    return;
  }
  const info = await response.json();
  // A model id is a hub id or a folder: its last part names it; the full ids are in the tooltip.
  const models = info.data.map((m) => m.id.split("/").filter(Boolean).pop()).join(" + ");
  // LoRAs loaded at start-up (serve --lora): a file's or folder's last part and the weight; the sources in the tooltip.
  const loras = info.loras || [];
  const loraText = loras.map((l) => `${l.source.split(/[\\/]/).filter(Boolean).pop()} ×${l.weight}`).join(", ");
  $("server-info").textContent =
    `${models}${loras.length ? ` + LoRA ${loraText}` : ""} · ${info.device} ${info.dtype} · ` +
    `tasks: ${info.tasks.join(", ")}`;
  $("server-info").title = [
    ...info.data.map((m) => `${m.role}: ${m.id}`),
    ...loras.map((l) => `LoRA (${l.adapts.join(" + ")}): ${l.source} ×${l.weight}`),
  ].join("\n");
  for (const name of info.tasks.filter((task) => PAGE_TASKS.includes(task) && task !== "text2img")) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    $("task").appendChild(option);
  }
  const scheduler = $("scheduler");
  for (const name of info.schedulers) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    scheduler.appendChild(option);
  }
  defaults = info.defaults;
  scheduler.value = defaults.scheduler;
  spacedSamplers = new Set(info.sigmas.samplers);
  for (const name of info.sigmas.spacings) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    $("sigmas").appendChild(option);
  }
  showSigmas();
  for (const field of ["width", "height", "steps", "prior_steps", "guidance_scale"]) {
    $(field).value = defaults[field];
  }
  const limits = info.limits;
  $("width").max = $("height").max = limits.max_side;
  $("width").min = $("height").min = limits.min_side;
  $("width").step = $("height").step = limits.size_multiple;
  $("steps").max = $("prior_steps").max = limits.max_steps;
  $("n").max = limits.max_n;
  $("mask_blur").max = limits.max_mask_blur;
  changeTask();
}

function describeProgress(job) {
  if (job.status === "queued") {
    return `queued — ${job.queue_position} ahead`;
  }
  const stages = Object.entries(job.progress.stages)
    .map(([name, s]) => `${name} ${s.step}/${s.steps}`)
    .join(", ");
  if (job.status === "running") {
    return `running — ${stages}`;
  }
  if (job.status === "succeeded") {
    const seconds = job.finished_at - job.created_at;
    return `done — ${job.images.length} image(s) in ${seconds.toFixed(1)} s (${stages})`;
  }
  return `${job.status}${job.error ? ": " + job.error.message : ""}`;
}

function fractionDone(job) {
  let done = 0;
  let total = 0;
  for (const s of Object.values(job.progress.stages)) {
    done += s.step;
    total += s.steps;
  }
  return total ? done / total : 0;
}

function addResults(job) {
  const results = $("results");
  for (const image of [...job.images].reverse()) {
    const figure = document.createElement("figure");
    figure.className = "result";
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = job.prompt;
    img.width = job.width;
    img.height = job.height;
    const caption = document.createElement("figcaption");
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = job.prompt;
    prompt.title = job.prompt;
    const seed = document.createElement("span");
    seed.className = "seed";
    seed.textContent = `seed ${image.seed}`;
    const link = document.createElement("a");
    link.href = image.url;
    // The URL ends in the job's format's suffix (.png, .jpg, .webp): the saved file keeps it.
    link.download = `kandinsky22-${image.seed}.${image.url.split(".").pop()}`;
    link.textContent = "download";
    caption.append(prompt, seed, link);
    figure.append(img, caption);
    results.prepend(figure);
  }
}

// Quality applies to the lossy formats only (the API refuses it with PNG): shown, and sent, for JPEG and WebP. A
// disabled input is left out of the form's data and of its validation.
function showQuality() {
  const lossy = $("output_format").value !== "png";
  $("quality-box").hidden = !lossy;
  $("quality").disabled = !lossy;
}

// The noise-level spacing applies to some samplers only (the API refuses it with the others): offered, and sent, for
// those. A disabled select is left out of the form's data.
let spacedSamplers = new Set();
function showSigmas() {
  $("sigmas").disabled = !spacedSamplers.has($("scheduler").value);
}

// Each box of task inputs (data-tasks: the tasks it serves) shows, and its inputs are sent, for its tasks only; the
// strength of depth only with an image (without one, depth makes a new image from the hint).
function showTaskInputs() {
  const task = $("task").value;
  for (const box of document.querySelectorAll("[data-tasks]")) {
    let shown = box.dataset.tasks.split(" ").includes(task);
    if (box.id === "strength-box" && task === "depth") {
      shown = $("image").files.length > 0;
    }
    box.hidden = !shown;
    for (const input of box.querySelectorAll("input")) {
      input.disabled = !shown;
    }
  }
  $("image-label").textContent = task === "depth" ? "Image (optional)" : "Image";
  // The image tasks' size is the input's (the API's default) where width and height are left blank.
  const imageTask = task !== "text2img";
  for (const field of ["width", "height"]) {
    $(field).required = !imageTask;
    $(field).placeholder = imageTask ? "input's" : "";
  }
}

let shownTask = "text2img";
function changeTask() {
  const task = $("task").value;
  const imageTask = task !== "text2img";
  if (imageTask !== (shownTask !== "text2img")) {
    // Into an image task: blank (the input's size); back to text2img: the server's defaults.
    for (const field of ["width", "height"]) {
      $(field).value = imageTask ? "" : defaults ? defaults[field] : "512";
    }
  }
  if (defaults && task in defaults.strength) {
    $("strength").value = defaults.strength[task];
  }
  shownTask = task;
  showTaskInputs();
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").hidden = !busy;
}

function follow(job) {
  currentJob = job;
  $("progress-box").hidden = false;
  events = new EventSource(`/v1/jobs/${job.id}/events`);
  events.onmessage = (message) => {
    const update = JSON.parse(message.data);
    $("progress").value = fractionDone(update);
    $("progress-text").textContent = describeProgress(update);
    if (TERMINAL.has(update.status)) {
      events.close();
      events = null;
      currentJob = null;
      setBusy(false);
      if (update.status === "succeeded") {
        addResults(update);
      } else if (update.status === "failed") {
        showError(update.error.message);
      }
    }
  };
  events.onerror = () => {
    // EventSource reconnects by itself; a closed stream after a terminal event is not an error.
    if (events && events.readyState === EventSource.CLOSED) {
      showError("lost the connection to the server");
      setBusy(false);
    }
  };
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const form = new FormData($("generate-form"));
  const request = {
    task: form.get("task"),
    prompt: form.get("prompt"),
    scheduler: form.get("scheduler"),
    output_format: form.get("output_format"),
  };
  if (form.get("negative_prompt")) {
    request.negative_prompt = form.get("negative_prompt");
  }
  for (const field of ["width", "height"]) {
    // blank (image tasks only; text2img's are required): the input's size
    if (form.get(field)) {
      request[field] = parseInt(form.get(field), 10);
    }
  }
  for (const field of ["n", "steps", "prior_steps"]) {
    request[field] = parseInt(form.get(field), 10);
  }
  request.guidance_scale = parseFloat(form.get("guidance_scale"));
  if (form.get("quality") !== null) {
    request.output_compression = parseInt(form.get("quality"), 10);
  }
  if (form.get("strength") !== null) {
    request.strength = parseFloat(form.get("strength"));
  }
  if (form.get("mask_blur") !== null) {
    request.mask_blur = parseFloat(form.get("mask_blur"));
  }
  if (!$("keep_unmasked").disabled) {
    request.keep_unmasked = $("keep_unmasked").checked;
  }
  if (form.get("sigmas")) {
    request.sigmas = form.get("sigmas");
  }
  if (form.get("seed") !== "") {
    request.seed = parseInt(form.get("seed"), 10);
  }
  // The server's LoRAs (their inputs are in the page only when it has some): each at the weight given here.
  const loraInputs = [...document.querySelectorAll("input.lora")];
  if (loraInputs.length) {
    request.loras = loraInputs.map((input) => ({ source: input.dataset.source, weight: parseFloat(input.value) }));
  }
  // The chosen files of the task's inputs (a file input with none gives an empty, nameless file); a missing one is the
  // API's to report, naming the field.
  for (const field of IMAGE_FIELDS) {
    const file = form.get(field);
    if (file && file.name) {
      try {
        request[field] = await dataUrl(file);
      } catch (err) {
        showError(`could not read the ${field} file ${file.name} (${err.message})`);
        return;
      }
    }
  }
  setBusy(true);
  $("progress").value = 0;
  $("progress-text").textContent = "submitting…";
  $("progress-box").hidden = false;
  let response;
  try {
    response = await fetch("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
  } catch (err) {
    // No answer at all (server down, network lost): say so, and give the form back.
    showError(`could not reach the server (${err.message})`);
    $("progress-box").hidden = true;
    setBusy(false);
    return;
  }
  if (!response.ok) {
    showError(await apiError(response));
    $("progress-box").hidden = true;
    setBusy(false);
    return;
  }
  follow(await response.json());
}

async function cancel() {
  if (currentJob) {
    await fetch(`/v1/jobs/${currentJob.id}`, { method: "DELETE" });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("output_format").addEventListener("change", showQuality);
  $("scheduler").addEventListener("change", showSigmas);
  $("task").addEventListener("change", changeTask);
  $("image").addEventListener("change", showTaskInputs);
  showQuality();
  showTaskInputs();
  loadServerInfo().catch((err) => showError(String(err)));
});
