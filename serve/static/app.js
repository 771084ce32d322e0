// The page to try a served model: asks GET v1/info what the model is, then
// posts the inputs as multipart/form-data to v1/classify (a classifier) or
// v1/zero-shot (a pretrained model) and draws the answer. Everything stays
// on this server: no other URL is ever fetched.
"use strict";

const KEY_STORE = "mm-serve-api-key";
const $ = (id) => document.getElementById(id);
const state = { info: null, image: null, audio: null, recorder: null };

function apiUrl(path) {
  return new URL(path, document.baseURI).toString();
}

function authHeaders() {
  const key = $("key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = kind || "";
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (e) {
    // not JSON: fall through to the status line
  }
  return "HTTP " + response.status;
}

// -- what the model is ----------------------------------------------------------
async function loadInfo() {
  state.info = null;
  $("run").disabled = true;
  let response;
  try {
    response = await fetch(apiUrl("v1/info"), { headers: authHeaders(), cache: "no-store" });
  } catch (e) {
    $("model").textContent = "The server does not answer.";
    return;
  }
  if (response.status === 401) {
    $("model").textContent = "This server needs an API key: enter it above and press Use key.";
    $("key-row").classList.add("wanted");
    $("key").focus();
    return;
  }
  if (!response.ok) {
    $("model").textContent = "The server refused: " + (await errorOf(response));
    return;
  }
  $("key-row").classList.remove("wanted");
  state.info = await response.json();
  showModel(state.info);
}

function showModel(info) {
  const reads = info.modalities;
  const classifier = info.kind === "classifier";
  const fields = classifier ? info.endpoints["/v1/classify"] : info.endpoints["/v1/zero-shot"];
  $("image-box").hidden = !fields.includes("image");
  $("audio-box").hidden = !fields.includes("audio");
  $("text-box").hidden = !fields.includes("text");
  $("classes-box").hidden = classifier;
  $("run").textContent = classifier ? "Classify" : "Score the classes";
  let text;
  if (classifier) {
    const names = info.classes.slice(0, 12).join(", ") + (info.classes.length > 12 ? ", …" : "");
    text = `A classifier of ${info.classes.length} classes (${names})${info.multi_label ? ", multi-label" : ""}, ` +
      `reading ${reads.join(" + ")}.`;
  } else {
    text = "A pretrained model: type class names and it scores each against the image or the sound " +
      "(cosine similarity with the text of each name).";
  }
  $("model").textContent = text + " Model: " + info.export;
  $("run").disabled = false;
}

// -- inputs --------------------------------------------------------------------------
function showFile(which, blob, name) {
  state[which] = blob ? { blob: blob, name: name } : null;
  const preview = $(which + "-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  if (blob) {
    preview.src = URL.createObjectURL(blob);
    $(which + "-name").textContent = name + " (" + Math.ceil(blob.size / 1024) + " KiB)";
  } else {
    preview.removeAttribute("src");
    $(which).value = "";
  }
  $(which + "-shown").hidden = !blob;
}

function setupImage() {
  const drop = $("drop");
  $("image").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) showFile("image", file, file.name);
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) showFile("image", file, file.name);
  });
  $("image-clear").addEventListener("click", () => showFile("image", null));
}

function setupAudio() {
  $("audio").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) showFile("audio", file, file.name);
  });
  $("audio-clear").addEventListener("click", () => showFile("audio", null));
  const canRecord = window.MediaRecorder && navigator.mediaDevices && navigator.mediaDevices.getUserMedia;
  if (canRecord) {
    $("record").hidden = false;
    $("record").addEventListener("click", toggleRecording);
  } else {
    const note = $("record-note");
    note.hidden = false;
    note.textContent = "Recording needs a browser with MediaRecorder, on https or localhost; upload a file instead.";
  }
}

async function toggleRecording() {
  const button = $("record");
  if (state.recorder) {
    state.recorder.stop();
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    setStatus("The microphone is not available: " + e.message, "error");
    return;
  }
  const chunks = [];
  const recorder = new MediaRecorder(stream);
  const maxSeconds = Math.min(60, state.info ? state.info.limits.max_audio_s : 60);
  const stopper = setTimeout(() => recorder.state !== "inactive" && recorder.stop(), maxSeconds * 1000);
  recorder.addEventListener("dataavailable", (e) => e.data.size && chunks.push(e.data));
  recorder.addEventListener("stop", async () => {
    clearTimeout(stopper);
    stream.getTracks().forEach((t) => t.stop());
    state.recorder = null;
    button.textContent = "Record";
    button.classList.remove("recording");
    try {
      // The browser records WebM or Ogg Opus; the server reads WAV, FLAC, MP3 or Ogg
      // Vorbis: the recording is decoded here and sent as 16-bit WAV.
      const wav = await toWav(new Blob(chunks, { type: recorder.mimeType }));
      showFile("audio", wav, "recording.wav");
      setStatus("Recorded " + wav.seconds.toFixed(1) + " s.", "");
    } catch (e) {
      setStatus("The recording could not be decoded: " + e.message, "error");
    }
  });
  state.recorder = recorder;
  recorder.start();
  button.textContent = "Stop";
  button.classList.add("recording");
  setStatus("Recording… press Stop when done (at most " + maxSeconds + " s).", "");
}

async function toWav(blob) {
  const context = new AudioContext();
  let buffer;
  try {
    buffer = await context.decodeAudioData(await blob.arrayBuffer());
  } finally {
    context.close();
  }
  const n = buffer.length;
  const rate = buffer.sampleRate;
  const mono = new Float32Array(n);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const data = buffer.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += data[i] / buffer.numberOfChannels;
  }
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const ascii = (at, s) => [...s].forEach((ch, i) => view.setUint8(at + i, ch.charCodeAt(0)));
  ascii(0, "RIFF");
  view.setUint32(4, 36 + 2 * n, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  ascii(36, "data");
  view.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) {
    const s = Math.max(-1, Math.min(1, mono[i]));
    view.setInt16(44 + 2 * i, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  const wav = new Blob([view], { type: "audio/wav" });
  wav.seconds = n / rate;
  return wav;
}

function classNames() {
  return $("classes").value.split(/[\n,]/).map((s) => s.trim()).filter((s) => s.length > 0);
}

// -- asking the model ----------------------------------------------------------------
async function run(event) {
  event.preventDefault();
  const info = state.info;
  if (!info) return;
  const classifier = info.kind === "classifier";
  const fields = classifier ? info.endpoints["/v1/classify"] : info.endpoints["/v1/zero-shot"];
  const form = new FormData();
  if (state.image && fields.includes("image")) form.append("image", state.image.blob, state.image.name);
  if (state.audio && fields.includes("audio")) form.append("audio", state.audio.blob, state.audio.name);
  const text = $("text").value;
  if (fields.includes("text") && text.trim()) form.append("text", text);
  const given = [...form.keys()];
  if (!given.length) {
    const wanted = fields.filter((f) => ["image", "audio", "text"].includes(f));
    setStatus("Give " + wanted.join(" or ") + " first.", "error");
    return;
  }
  if (!classifier) {
    const names = classNames();
    if (!names.length) {
      setStatus("Type the class names to score first.", "error");
      return;
    }
    names.forEach((name) => form.append("classes", name));
  }
  const topK = parseInt($("top-k").value, 10);
  if (topK >= 1) form.append("top_k", String(topK));
  setStatus("Asking the model…", "busy");
  $("output").replaceChildren();
  const started = performance.now();
  let response;
  try {
    response = await fetch(apiUrl(classifier ? "v1/classify" : "v1/zero-shot"), {
      method: "POST",
      headers: authHeaders(),
      body: form,
    });
  } catch (e) {
    setStatus("The server does not answer: " + e.message, "error");
    return;
  }
  if (!response.ok) {
    const reason = await errorOf(response);
    setStatus((response.status === 401 ? "API key needed: " : "Refused (" + response.status + "): ") + reason, "error");
    return;
  }
  const answer = await response.json();
  const ms = Math.round(performance.now() - started);
  if (classifier) showClasses(answer, given);
  else showScores(answer);
  setStatus("Answered in " + ms + " ms.", "done");
}

function bar(name, value, width, shown) {
  const row = document.createElement("div");
  row.className = "result";
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = name;
  const track = document.createElement("span");
  track.className = "track";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = (100 * Math.max(0, Math.min(1, width))).toFixed(1) + "%";
  track.append(fill);
  const number = document.createElement("span");
  number.className = "value";
  number.textContent = shown;
  row.append(label, track, number);
  row.dataset.value = String(value);
  return row;
}

function heading(text) {
  const h = document.createElement("h2");
  h.textContent = text;
  return h;
}

function showClasses(answer, given) {
  const out = $("output");
  out.append(heading("Classes, most probable first"));
  if (!answer.classes.length) {
    const p = document.createElement("p");
    p.textContent = state.info.multi_label ? "No class is over the threshold." : "The model read none of its inputs.";
    out.append(p);
  }
  answer.classes.forEach((c, i) => {
    const row = bar(c.name, c.probability, c.probability, (100 * c.probability).toFixed(1) + "%");
    row.classList.toggle("top", i === 0);
    out.append(row);
  });
  if (answer.missing.length) {
    const p = document.createElement("p");
    p.className = "note";
    p.textContent = "Sent " + given.join(" + ") + "; the model also reads " + answer.missing.join(" + ") +
      ", which it did without here.";
    out.append(p);
  }
}

function showScores(answer) {
  const out = $("output");
  for (const modality of ["image", "audio"]) {
    const scores = answer.scores[modality];
    if (!scores) continue;
    out.append(heading((modality === "image" ? "Image" : "Audio") + ": cosine similarity, best first"));
    scores.forEach((s, i) => {
      const row = bar(s.name, s.score, s.score, s.score.toFixed(3));
      row.classList.toggle("top", i === 0);
      out.append(row);
    });
  }
}

// -- start -------------------------------------------------------------------------
function start() {
  $("key").value = localStorage.getItem(KEY_STORE) || "";
  $("key-use").addEventListener("click", () => {
    const key = $("key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    loadInfo();
  });
  $("key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      $("key-use").click();
    }
  });
  setupImage();
  setupAudio();
  $("form").addEventListener("submit", run);
  loadInfo();
}

start();
