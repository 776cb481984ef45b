// SynthMRI web page: one request form over the public HTTP API (no build step, no CDN).
// Every call sends the API key as a Bearer token, so result files are fetched as
// blobs and shown/saved through object URLs rather than plain <img src>/<a href>.
"use strict";

const KEY_STORAGE = "synthmri.apiKey";
// The API's long poll answers on a state change; progress within `running` shows at this pace.
const POLL_WAIT_S = 2;
// Step counts applied when a sampler is picked by hand: DDIM and DPM-Solver++ as in
// model/samplers.py; DDPM respaced to 250 steps, a quarter of the full 1000 network calls.
// With "recommended" the form sends neither sampler nor steps and the server applies the
// model card's recommendation (GET /v1/models, `recommended`).
const DEFAULT_STEPS = { ddpm: 250, ddim: 50, "dpm++": 20, "dpm++sde": 20 };
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "canceled", "done", "error"]);

const $ = (id) => document.getElementById(id);
const state = { job: null, models: [], polling: false, objectUrls: [] };

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// A problem+json body becomes one readable line; anything else falls back to the status.
async function problemMessage(resp) {
  try {
    const body = await resp.json();
    if (body.detail && typeof body.detail === "string") return body.detail;
    if (body.title) return body.title;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    return JSON.stringify(body);
  } catch {
    return `${resp.status} ${resp.statusText}`;
  }
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  if (!resp.ok) {
    const msg = await problemMessage(resp);
    const hint = resp.status === 401 || resp.status === 403 ? " — check the API key above" : "";
    throw new Error(`${msg}${hint}`);
  }
  return resp;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// ---------------------------------------------------------------- service + models
async function checkHealth() {
  const pill = $("health");
  try {
    const resp = await fetch("/readyz");
    pill.textContent = resp.ok ? "ready" : "starting…";
    pill.className = resp.ok ? "pill ok" : "pill warn";
  } catch {
    pill.textContent = "offline";
    pill.className = "pill bad";
  }
}

function modelList(body) {
  if (Array.isArray(body)) return body;
  return body.models || body.items || body.data || [];
}

function channelSetOf(model) {
  if (model.channel_set) return model.channel_set;
  if (Array.isArray(model.channels)) return model.channels.join("+");
  return model.channels || model.name;
}

// The channel sets of synthmri/channels.py. A model serves its own set and every
// subset of its channels (the server picks the smallest model that has them).
const CHANNEL_SETS = ["t1ce", "t1ce+seg", "t1+t1ce+t2+flair+seg"];

function modelFor(channelSet) {
  const wanted = channelSet.split("+");
  const able = state.models.filter((m) => wanted.every((c) => m.channels.includes(c)));
  able.sort((a, b) => a.channels.length - b.channels.length);
  return able.find((m) => m.channel_set === channelSet) || able[0];
}

async function loadModels() {
  const select = $("channels");
  try {
    const body = await (await api("/v1/models")).json();
    state.models = modelList(body).map((m) => ({ ...m, channels: m.channels || channelSetOf(m).split("+") }));
    const sets = CHANNEL_SETS.filter((cs) => modelFor(cs));
    for (const m of state.models) if (!sets.includes(channelSetOf(m))) sets.push(channelSetOf(m));
    select.innerHTML = "";
    for (const cs of sets) {
      const opt = document.createElement("option");
      opt.value = cs;
      opt.textContent = cs;
      select.appendChild(opt);
    }
    if (!sets.length) select.innerHTML = '<option value="">no models installed</option>';
    select.value = sets.includes("t1ce+seg") ? "t1ce+seg" : sets[0] || "";
    describeModel();
    showError("");
  } catch (e) {
    select.innerHTML = '<option value="">(could not list models)</option>';
    showError(`Could not list models: ${e.message}`);
  }
}

function describeModel() {
  const cs = $("channels").value;
  const m = cs ? modelFor(cs) : undefined;
  if (!m) {
    $("model-info").textContent = "";
    return;
  }
  const size = m.image_size ? `${m.image_size}×${m.image_size} px` : "";
  const trained = m.provenance && m.provenance.steps ? `${m.provenance.steps} training steps` : "";
  const parts = [`served by model “${m.name}”`, `channels ${m.channel_set}`, size, trained].filter(Boolean);
  $("model-info").textContent = parts.join(" · ");
  $("model-card").textContent = cardSummary(m);
  syncSteps();
  renderGivenInputs(m);
  // An nnU-Net dataset needs the mask (labels) and at least one image channel.
  const requested = cs.split("+");
  $("nnunet-option").hidden = !(requested.includes("seg") && requested.length > 1);
}

// One optional file input per channel of the model that serves the request: a known channel
// may be any channel of that model, also one the request does not ask back.
function renderGivenInputs(m) {
  const box = $("given-inputs");
  const kept = {};
  for (const input of box.querySelectorAll("input[type=file]")) kept[input.name] = input;
  box.innerHTML = "";
  for (const ch of m.channels) {
    const label = document.createElement("label");
    label.textContent = ch;
    const input = kept[ch] || document.createElement("input");
    input.type = "file";
    input.multiple = true;
    input.name = ch;
    input.id = `given-${ch}`;
    input.accept = ".nii,.nii.gz,.gz,.png,image/png";
    label.appendChild(input);
    box.appendChild(label);
  }
}

// The files chosen for known channels, as [channel, File] in the order they were picked.
function givenFiles() {
  const files = [];
  for (const input of $("given-inputs").querySelectorAll("input[type=file]")) {
    for (const f of input.files) files.push([input.name, f]);
  }
  return files;
}

// One line from the model card: the recommendation and the headline figures against real data.
function cardSummary(m) {
  if (!m.recommended) return "Not evaluated yet: requests use DPM-Solver++ with 20 steps.";
  const rec = `recommended: ${m.recommended.sampler} with ${m.recommended.steps} steps`;
  const h = (m.card && m.card.headline) || {};
  const real = (m.card && m.card.real) || {};
  const figures = [];
  if (h.frechet_ratio_to_floor != null) {
    figures.push(`Fréchet distance ${h.frechet_ratio_to_floor.toFixed(1)}× the real-vs-real floor`);
  }
  if (h.background_fraction != null && real.background_fraction != null) {
    figures.push(`background ${h.background_fraction.toFixed(2)} (real ${real.background_fraction.toFixed(2)})`);
  }
  if (h.isolated_tumour_pixels != null && real.isolated_tumour_pixels != null) {
    figures.push(`${h.isolated_tumour_pixels.toFixed(2)} isolated tumour px per slice ` +
      `(real ${real.isolated_tumour_pixels.toFixed(2)})`);
  }
  return [rec, ...figures].join(" · ");
}

// Steps follow the sampler: blank (server decides) for "recommended", else that sampler's default.
function syncSteps() {
  const sampler = $("sampler").value;
  const cs = $("channels").value;
  const m = cs ? modelFor(cs) : undefined;
  if (!sampler) {
    $("steps").value = "";
    $("steps").placeholder = m && m.recommended ? `${m.recommended.steps} (recommended)` : "recommended";
  } else {
    $("steps").value = String(DEFAULT_STEPS[sampler] || $("steps").value);
  }
}

// ---------------------------------------------------------------- jobs
function progressOf(job) {
  const p = job.progress;
  if (p == null) return { fraction: 0, text: job.state };
  if (typeof p === "number") return { fraction: p > 1 ? p / 100 : p, text: job.state };
  const done = p.done ?? p.completed ?? p.samples_done ?? 0;
  const total = p.total ?? p.samples_total ?? job.count ?? 1;
  const fraction = p.fraction ?? (total ? done / total : 0);
  return { fraction, text: `${job.state} · ${done} / ${total} samples` };
}

function renderProgress(job) {
  const { fraction: reported, text } = progressOf(job);
  const fraction = job.state === "succeeded" ? 1 : reported;
  const pct = Math.max(0, Math.min(100, Math.round(fraction * 100)));
  $("progress-bar").style.width = `${pct}%`;
  $("progress-bar").parentElement.setAttribute("aria-valuenow", String(pct));
  $("progress-text").textContent = `${text} (${pct}%)`;
  $("progress-bar").classList.toggle("failed", job.state === "failed");
}

function jobUrl(job, suffix) {
  const links = job.links || {};
  const named = { "grid.png": links.grid, "manifest.json": links.manifest, "archive.zip": links.archive };
  return named[suffix] || `/v1/jobs/${encodeURIComponent(job.id)}/${suffix}`;
}

async function submitJob(event) {
  event.preventDefault();
  showError("");
  const body = {
    channels: $("channels").value,
    count: Number($("count").value),
    seed: Number($("seed").value),
  };
  if ($("sampler").value) body.sampler = $("sampler").value;
  if ($("steps").value) body.steps = Number($("steps").value);
  if ($("guidance").value) body.guidance = Number($("guidance").value);
  if ($("nnunet").checked && !$("nnunet-option").hidden) body.formats = ["nifti", "png", "nnunet"];
  if (!body.channels) {
    showError("Choose a channel set (enter the API key first if the list is empty).");
    return;
  }
  // Known channels go as multipart/form-data: the same JSON in `request`, files named after channels.
  const files = givenFiles();
  let request = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  if (files.length) {
    const form = new FormData();
    form.append("request", JSON.stringify(body));
    for (const [channel, file] of files) form.append(channel, file, file.name);
    request = { method: "POST", body: form }; // the browser sets the multipart boundary
  }
  $("submit").disabled = true;
  $("result-card").hidden = true;
  try {
    const job = await (await api("/v1/jobs", request)).json();
    state.job = job;
    $("job-id").textContent = job.id;
    $("progress-card").hidden = false;
    $("cancel").hidden = false;
    renderProgress(job);
    await poll(job.id);
  } catch (e) {
    showError(e.message);
  } finally {
    $("submit").disabled = false;
    $("cancel").hidden = true;
  }
}

async function poll(id) {
  state.polling = true;
  while (state.polling) {
    const job = await (await api(`/v1/jobs/${encodeURIComponent(id)}?wait=${POLL_WAIT_S}`)).json();
    state.job = job;
    renderProgress(job);
    if (TERMINAL.has(job.state)) {
      state.polling = false;
      if (job.state === "succeeded" || job.state === "done") await showResult(job);
      else showError(`Job ${job.state}: ${job.error || job.message || "no details"}`);
    }
  }
}

async function cancelJob() {
  if (!state.job) return;
  state.polling = false;
  try {
    await api(`/v1/jobs/${encodeURIComponent(state.job.id)}/cancel`, { method: "POST" });
    $("progress-text").textContent = "cancelled";
  } catch (e) {
    showError(e.message);
  }
}

// ---------------------------------------------------------------- results
async function blobUrl(path) {
  const blob = await (await api(path)).blob();
  const url = URL.createObjectURL(blob);
  state.objectUrls.push(url);
  return url;
}

async function download(path, filename) {
  try {
    const a = document.createElement("a");
    a.href = await blobUrl(path);
    a.download = filename;
    document.body.appendChild(a);
    a.click();
    a.remove();
  } catch (e) {
    showError(`Download failed: ${e.message}`);
  }
}

function channelsOfJob(job) {
  if (Array.isArray(job.channels)) return job.channels;
  const cs = job.channel_set || (job.request && (job.request.channels || job.request.channel_set)) || "";
  return cs ? cs.split("+") : [];
}

function sampleCount(job) {
  return job.count ?? (job.request && job.request.count) ?? (job.progress && job.progress.total) ?? 0;
}

async function showResult(job) {
  for (const url of state.objectUrls.splice(0)) URL.revokeObjectURL(url);
  const img = $("grid");
  img.src = await blobUrl(jobUrl(job, "grid.png"));
  await img.decode().catch(() => undefined);
  $("result-card").hidden = false;

  const tbody = $("sample-links");
  tbody.innerHTML = "";
  const channels = channelsOfJob(job);
  for (let i = 0; i < sampleCount(job); i++) {
    const tr = document.createElement("tr");
    const cells = [document.createElement("td"), document.createElement("td"), document.createElement("td")];
    cells[0].textContent = String(i);
    for (const ch of channels) {
      for (const [cell, ext] of [[cells[1], "nii.gz"], [cells[2], "png"]]) {
        const a = document.createElement("a");
        a.href = "#";
        a.textContent = ch;
        a.className = "chip";
        const name = `${job.id}_${String(i).padStart(4, "0")}_${ch}.${ext}`;
        a.addEventListener("click", (ev) => {
          ev.preventDefault();
          download(`/v1/jobs/${encodeURIComponent(job.id)}/samples/${i}/${ch}.${ext}`, name);
        });
        cell.appendChild(a);
      }
    }
    cells.forEach((c) => tr.appendChild(c));
    tbody.appendChild(tr);
  }
  $("dl-zip").onclick = () => download(jobUrl(job, "archive.zip"), `${job.id}.zip`);
  $("dl-manifest").onclick = () => download(jobUrl(job, "manifest.json"), `${job.id}_manifest.json`);
  const nnunet = (job.links || {}).nnunet;
  $("dl-nnunet").hidden = !nnunet;
  $("dl-nnunet").onclick = () => download(nnunet, `${job.id}_nnunet.zip`);
}

// ---------------------------------------------------------------- wiring
function init() {
  $("api-key").value = apiKey();
  $("key-status").textContent = apiKey()
    ? "Key saved in this browser (localStorage)."
    : "The key is kept in this browser only (localStorage).";
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("key-status").textContent = "Key saved in this browser (localStorage).";
    loadModels();
  });
  $("job-form").addEventListener("submit", submitJob);
  $("cancel").addEventListener("click", cancelJob);
  $("channels").addEventListener("change", describeModel);
  $("sampler").addEventListener("change", syncSteps);
  $("random-seed").addEventListener("click", () => {
    $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
  });
  checkHealth();
  setInterval(checkHealth, 15000);
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
