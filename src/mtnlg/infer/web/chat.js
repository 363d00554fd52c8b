// mtnlg chat page: streams replies from the OpenAI-compatible API, keeps the conversation,
// shows tokens/s, and has a poem mode (two lines in, a couplet of the same form out, as `mtnlg poem`
// writes it: the server constrains every line to 5 or 7 characters and its punctuation). No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), stats = $("stats");
let history = [];          // [{role, content}] of the chat so far
let dropped = 0;           // its oldest messages, left out once the model's context no longer holds them
let busy = false;
let controller = null;
let seed = null;           // ?seed=N makes sampling reproducible

const keyBox = $("api-key");
keyBox.value = localStorage.getItem("mtnlg-api-key") || "";
keyBox.addEventListener("change", (e) => {
  localStorage.setItem("mtnlg-api-key", e.target.value);
  keyBox.classList.remove("needed");
  loadModel();
});

const KEY_NEEDED = "This server needs an API key: enter it in the \u201cAPI key\u201d box below, then send again.";

function askForKey() {
  keyBox.classList.add("needed");
  keyBox.focus();
}

// The model label: loaded at start, and again once a key is entered (no reload needed).
function loadModel() {
  return fetch("/v1/models", { headers: headers() }).then((r) => {
    if (r.status === 401) { $("model").textContent = "enter the API key to connect"; return null; }
    return r.json();
  }).then((j) => {
    if (j && j.data && j.data[0]) $("model").textContent = `${j.data[0].id} · context ${j.data[0].max_model_len}`;
  }).catch(() => {});
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function setMode(m) {
  document.querySelector(`input[name=mode][value=${m}]`).checked = true;
  $("poem-help").classList.toggle("hidden", m !== "poem");
  input.placeholder = m === "poem" ? "床前明月光，\n疑是地上霜。" : "Say something… (Enter sends, Shift+Enter for a new line)";
}
document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", () => setMode(mode())));

function bubble(role, text, extra) {
  const div = document.createElement("div");
  div.className = `msg ${role}` + (extra ? ` ${extra}` : "");
  div.textContent = text;
  log.appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = keyBox.value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

// Read an SSE stream of OpenAI chunks; call onDelta(text) for each piece of text.
async function streamSSE(resp, onDelta) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let idx;
    while ((idx = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, idx);
      buf = buf.slice(idx + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return usage;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          const text = c.delta ? c.delta.content : c.text;
          if (text) onDelta(text);
        }
      }
    }
  }
  return usage;
}

async function send(text) {
  if (busy || !text.trim()) return;
  busy = true;
  $("send").textContent = "Stop";
  const poem = mode() === "poem";
  const temperature = parseFloat($("temperature").value) || 0;
  const maxTokens = parseInt($("max-tokens").value, 10) || 128;
  let url, body;
  if (poem) {
    const lines = text.split("\n").map((l) => l.trim()).filter(Boolean).slice(-2);
    bubble("user", lines.join("\n"), "poem");
    url = "/v1/poem";  // the server keeps the form: the same line constraint as `mtnlg poem`
    body = { prompt: lines.join(""), lines: 2, temperature };
  } else {
    history.push({ role: "user", content: text });
    bubble("user", text);
    url = "/v1/chat/completions";
    // form "auto": a request for a poem (写一首关于秋天的诗) is answered in poem form, as `mtnlg chat` does
    body = { messages: history.slice(dropped), max_tokens: maxTokens, temperature, form: "auto" };
  }
  // ?seed=N: a reproducible chat, each reply with a seed of its own (one seed for all would make them echo)
  if (seed !== null) body.seed = poem ? seed : seed + history.filter((m) => m.role === "assistant").length;
  if (!poem) {
    body.stream = true;
    body.stream_options = { include_usage: true };
  }
  const out = bubble("assistant", "", "streaming" + (poem ? " poem" : ""));
  const t0 = performance.now();
  let first = null, pieces = 0, reply = "";
  controller = new AbortController();
  try {
    let resp;
    for (;;) {
      resp = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
      // too long for the context: leave out the oldest exchange and ask again (as `mtnlg chat` does), while
      // more than the new message is left
      if (poem || resp.status !== 400 || history.length - dropped <= 1) break;
      let err = null;
      try { err = (await resp.clone().json()).error; } catch (e) { break; }
      if (!err || err.code !== "context_length_exceeded") break;
      dropped = Math.min(dropped + 2, history.length - 1);
      body.messages = history.slice(dropped);
    }
    if (!resp.ok) {
      let msg = `HTTP ${resp.status}`;
      try { msg = (await resp.json()).error.message; } catch (e) { /* keep the status */ }
      if (resp.status === 401) { askForKey(); msg = KEY_NEEDED; }
      throw new Error(msg);
    }
    if (poem) {
      const j = await resp.json();
      first = performance.now();
      reply = j.lines.join("\n");
      out.textContent = reply;
      stats.textContent = `${j.lines.length} lines · ${((first - t0) / 1000).toFixed(2)} s`;
      return;
    }
    if (!$("model").textContent.includes("·")) loadModel();
    const usage = await streamSSE(resp, (delta) => {
      if (first === null) first = performance.now();
      pieces += 1;
      reply += delta;
      out.textContent = reply;
      out.scrollIntoView({ block: "end" });
      const secs = (performance.now() - first) / 1000;
      stats.textContent = `${pieces} tokens · ${secs > 0 ? (pieces / secs).toFixed(1) : "–"} tokens/s`;
    });
    const tokens = usage ? usage.completion_tokens : pieces;
    const secs = ((performance.now() - (first || t0)) / 1000) || 1e-3;
    const ttft = first ? ((first - t0) / 1000).toFixed(2) : "–";
    const left = dropped ? ` · the ${dropped} earliest messages left out to fit the context` : "";
    stats.textContent = `${tokens} tokens · ${(tokens / secs).toFixed(1)} tokens/s · first token after ${ttft} s${left}`;
    if (!poem) history.push({ role: "assistant", content: reply });
  } catch (err) {
    if (err.name === "AbortError") {
      stats.textContent = "stopped";
      if (!poem) history.push({ role: "assistant", content: reply });
    } else {
      if (!poem) history.pop();
      bubble("error", String(err.message || err));
      stats.textContent = "error";
    }
  } finally {
    out.classList.remove("streaming");
    if (!reply) out.textContent = reply || "(no text)";
    busy = false;
    controller = null;
    $("send").textContent = "Send";
    document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1);
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  if (busy) { if (controller) controller.abort(); return; }
  const text = input.value;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && mode() === "chat") { e.preventDefault(); $("composer").requestSubmit(); }
});
$("reset").addEventListener("click", () => { history = []; dropped = 0; log.textContent = ""; stats.textContent = "new chat"; });

loadModel();

// ?mode=poem&q=text sends a message on load (used by the browser test and for sharing links).
const params = new URLSearchParams(location.search);
if (params.get("mode") === "poem") setMode("poem");
if (params.get("temperature") !== null) $("temperature").value = params.get("temperature");
if (params.get("max_tokens") !== null) $("max-tokens").value = params.get("max_tokens");
if (params.get("seed") !== null) seed = parseInt(params.get("seed"), 10);
if (params.get("q")) send(params.get("q"));
