// The labeling page: one pair at a time; a label is "saved" only when the server answered after its commit.
"use strict";

const $ = (id) => document.getElementById(id);
let labeler = new URLSearchParams(location.search).get("labeler") || localStorage.getItem("rlhflab.labeler") || "";
let pair = null;   // the pair on screen
let keys = {};     // key -> action, from the server (the terminal labeler's keys)
let busy = false;  // one request at a time: nothing moves on before the last label is acknowledged

function say(text, state) {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

function render(state) {
  keys = state.keys;
  pair = state.pair;
  const p = state.progress;
  const others = Object.entries(p.by_labeler).map(([name, n]) => `${name} ${n}`).join(", ") || "none yet";
  $("progress").textContent =
    `${p.labeler}: ${p.labeled} labeled, ${p.left} left of ${p.total} · by labeler: ${others}`;
  $("work").hidden = pair === null;
  $("done").hidden = pair !== null;
  if (pair !== null) {
    $("prompt").textContent = pair.prompt;  // textContent: model output is shown as text, never as HTML
    $("answer-a").textContent = pair.a;
    $("answer-b").textContent = pair.b;
  }
}

async function call(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

async function run(work, pending) {
  if (busy || !labeler) return;
  busy = true;
  document.querySelectorAll("button[data-action]").forEach((b) => { b.disabled = true; });
  if (pending) say(pending, "saving");
  try {
    await work();
  } catch (error) {
    say(`not saved: ${error.message}`, "error");
    await call(`api/state?labeler=${encodeURIComponent(labeler)}`).then(render).catch(() => {});
  } finally {
    busy = false;
    document.querySelectorAll("button[data-action]").forEach((b) => { b.disabled = false; });
  }
}

function act(action) {
  if (action === "undo") {
    run(async () => {
      const state = await call("api/undo", {labeler});
      render(state);
      const u = state.undone;
      say(u ? `undone: pair ${u.pair_id} = ${u.choice}` : "nothing to undo", "saved");
    }, "undoing…");
  } else if (pair !== null) {
    const shown = pair.id;
    run(async () => {
      const state = await call("api/label", {labeler, pair_id: shown, choice: action});
      say(`saved: pair ${state.saved.pair_id} = ${state.saved.choice}`, "saved");
      render(state);
    }, `saving pair ${shown} = ${action}…`);
  }
}

function start(name) {
  labeler = name.trim();
  if (!labeler) return;
  localStorage.setItem("rlhflab.labeler", labeler);
  $("labeler").value = labeler;
  $("labeler").blur();  // keys label from here on, they no longer type into the name
  run(async () => {
    render(await call(`api/state?labeler=${encodeURIComponent(labeler)}`));
    say(`labeling as ${labeler}`, "ready");
  });
}

$("name-form").addEventListener("submit", (event) => {
  event.preventDefault();
  start($("labeler").value);
});
document.querySelectorAll("button[data-action]").forEach((button) => {
  button.addEventListener("click", () => act(button.dataset.action));
});
document.addEventListener("keydown", (event) => {
  if (event.target.closest("input") || event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const action = keys[event.key.toLowerCase()];
  if (action) {
    event.preventDefault();
    act(action);
  }
});
if (labeler) start(labeler);
else $("labeler").focus();
