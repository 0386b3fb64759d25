// The dashboard's three views (runs, compare, playground) over the JSON API of llmcycle/ui.py.
// Text from runs (outputs, ids, errors) is always set with textContent, never parsed as HTML, and its
// control characters are shown as symbols (TextSafe.visible, textsafe.js).
"use strict";

const $ = id => document.getElementById(id);
// `loads` numbers each request per view: an answer that arrives after a newer request was sent (fast
// typing in a filter, a quick second comparison) is dropped instead of overwriting the newer one.
const state = {runs: null, selected: new Set(), compare: null, models: null, abort: null,
               loads: {runs: 0, compare: 0}};

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(typeof c === "string" ? TextSafe.visible(c) : c);
  }
  return node;
}

async function getJSON(url) {
  let r;
  try {
    r = await fetch(url);
  } catch (e) {
    throw new Error(`the dashboard server does not answer (${e.message}); is \`llmcycle ui\` still running?`);
  }
  const data = await r.json().catch(() => null);
  if (!r.ok) throw new Error((data && data.error) || `${r.status} ${r.statusText}`);
  return data;
}

function say(node, text, kind = "info") {
  node.hidden = !text;
  node.textContent = TextSafe.visible(text || "");
  node.className = `message ${kind}`;
}

const short = key => (state.runs && state.runs.short[key]) || key;
const when = ts => ts ? new Date(ts * 1000).toLocaleString("sv-SE").slice(0, 16) : "";

// ---------------------------------------------------------------------------------------------- runs
function fillSelect(select, values, names = v => v, keepFirst = true) {
  const current = select.value;
  const first = keepFirst ? [...select.options].slice(0, 1) : [];
  select.replaceChildren(...first, ...values.map(v => h("option", {value: v}, names(v))));
  if ([...select.options].some(o => o.value === current)) select.value = current;
}

async function loadRuns() {
  const params = new URLSearchParams();
  for (const [key, id] of [["stage", "f-stage"], ["variant", "f-variant"], ["status", "f-status"],
                           ["sort", "f-sort"], ["order", "f-order"]]) {
    if ($(id).value) params.set(key, $(id).value);
  }
  const load = ++state.loads.runs;
  let data;
  try {
    data = await getJSON(`/api/runs?${params}`);
  } catch (e) {
    if (load === state.loads.runs) say($("runs-message"), e.message, "error");
    return;
  }
  if (load !== state.loads.runs) return;
  state.runs = data;
  $("store").textContent = data.store;
  fillSelect($("f-stage"), data.stages);
  fillSelect($("f-status"), data.statuses);
  fillSelect($("f-sort"), data.metrics, k => k === "headline_value" ? "headline" : short(k));
  if (!data.total) {
    say($("runs-message"),
        `No runs yet in ${data.store}. Run a stage (for example \`llmcycle run\`), then reload this page.`);
  } else if (!data.runs.length) {
    say($("runs-message"), `No run matches these filters (${data.total} runs in all).`);
  } else {
    say($("runs-message"), "");
  }
  renderRuns(data);
}

function renderRuns(data) {
  const sort = $("f-sort").value;
  const keys = [...data.table_keys];
  if (sort && sort !== "headline_value" && !keys.includes(sort)) keys.unshift(sort);
  const head = h("tr", {}, h("th", {}, ""), h("th", {}, "run"), h("th", {}, "stage"), h("th", {}, "variant"),
                 h("th", {}, "status"), h("th", {}, "created"),
                 h("th", {class: "num sortable", "data-key": "headline_value"}, "headline"),
                 ...keys.map(k => h("th", {class: "num sortable", "data-key": k, title: k}, short(k))));
  for (const th of head.querySelectorAll("th.sortable")) {
    if (th.dataset.key === sort) th.classList.add($("f-order").value === "asc" ? "asc" : "desc");
    th.addEventListener("click", () => sortBy(th.dataset.key));
  }
  $("runs-table").tHead.replaceChildren(head);
  $("runs-table").tBodies[0].replaceChildren(...data.runs.map(row => runRow(row, keys)));
  updateCompareButton();
}

// What a metric stands on: its examples, those skipped as too long, and a mark under evaluate.min_examples.
function examplesNote(row) {
  if (typeof row.n_examples !== "number") return "";
  return ` · n=${row.n_examples}` + (row.eval_skipped ? ` (${row.eval_skipped} skipped)` : "")
    + (row.too_few_examples ? " ⚠ few" : "");
}

// An iteration's paired Δ of its headline vs the run it started from and vs the best prompt-only run,
// on the examples both scored (* significant at 95%: evaluation/paired.py).
function deltaNote(row) {
  const part = (key, label) => typeof row[key] !== "number" ? ""
    : ` · Δ ${label} ${row[key] >= 0 ? "+" : ""}${row[key].toFixed(3)}${row[key + "_sig"] ? "*" : ""}`;
  return part("delta_parent", "parent") + part("delta_baseline", "baseline");
}

function runRow(row, keys) {
  const missing = row.status === "missing";
  const box = h("input", {type: "checkbox", "data-id": row.id, "aria-label": `choose ${row.id}`});
  box.checked = state.selected.has(row.id);
  box.disabled = missing;
  box.addEventListener("change", () => {
    box.checked ? state.selected.add(row.id) : state.selected.delete(row.id);
    updateCompareButton();
  });
  const status = h("td", {class: `status status-${row.status}`}, row.status);
  if (row.note || row.error) {
    status.title = row.note || row.error;
    status.append(h("div", {class: "note"}, row.note || row.error));
  }
  const headline = row.headline_value === undefined ? "" : `${row.headline} ${Charts.fmt(row.headline_value)}`
    + examplesNote(row) + deltaNote(row);
  return h("tr", {class: missing ? "missing" : "", "data-id": row.id},
           h("td", {}, box), h("td", {class: "id"}, row.id), h("td", {}, row.stage), h("td", {}, row.variant),
           status, h("td", {}, when(row.created)), h("td", {class: "num"}, headline),
           ...keys.map(k => h("td", {class: "num"}, typeof row[k] === "number" ? Charts.fmt(row[k]) : "")));
}

function sortBy(key) {
  if ($("f-sort").value === key) $("f-order").value = $("f-order").value === "desc" ? "asc" : "desc";
  $("f-sort").value = key;
  loadRuns();
}

function updateCompareButton() {
  const button = $("compare-btn");
  button.textContent = `Compare selected (${state.selected.size})`;
  button.disabled = state.selected.size === 0;
}

// ------------------------------------------------------------------------------------------- compare
async function loadCompare(ids) {
  const load = ++state.loads.compare;
  $("compare-body").hidden = true;
  $("view-compare").dataset.loaded = "";  // set to the runs' ids once everything is drawn
  if (!ids.length) {
    say($("compare-message"), "Choose runs in the Runs view (tick their boxes), then press Compare.");
    return;
  }
  let data;
  try {
    data = await getJSON(`/api/compare?ids=${encodeURIComponent(ids.join(","))}`);
  } catch (e) {
    if (load === state.loads.compare) say($("compare-message"), e.message, "error");
    return;
  }
  if (load !== state.loads.compare) return;
  state.compare = data;
  const gone = data.missing.map(m => `${m.id} is missing (${m.error})`).join("; ");
  say($("compare-message"), gone, "error");
  if (!data.runs.length) return;
  $("compare-body").hidden = false;
  data.runs.forEach((row, i) => { row.colour = Charts.colour(i); });
  renderFigures(data);
  const name = k => k === "headline_value" ? headlineName(data) : (data.short[k] || k);
  fillSelect($("bar-metric"), data.metrics, name, false);
  $("bar-metric").value = data.metrics.includes("headline_value") ? "headline_value" : data.metrics[0] || "";
  drawBars();
  renderExamples(data);
  await loadCurves(data.runs, load);
  if (load === state.loads.compare) $("view-compare").dataset.loaded = data.runs.map(r => r.id).join(",");
}

function headlineName(data) {
  const names = [...new Set(data.runs.map(r => r.headline).filter(Boolean))];
  return `headline (${names.join("/")})`;
}

function renderFigures(data) {
  const runs = data.runs;
  $("compare-table").tHead.replaceChildren(h("tr", {}, h("th", {}, "figure"),
    ...runs.map(r => h("th", {class: "num", title: r.id},
                       h("span", {class: "swatch", style: `background:${r.colour}`}), r.label))));
  const rows = [h("tr", {}, h("td", {}, "stage"), ...runs.map(r => h("td", {class: "num"}, r.stage)))];
  const more = data.metrics.filter(k => !data.main_metrics.includes(k));
  for (const key of [...data.main_metrics, ...more]) {
    const name = key === "headline_value" ? headlineName(data) : key;
    const hidden = more.includes(key) ? {class: "more", hidden: ""} : {};
    if (key === more[0]) {
      const toggle = h("button", {type: "button", id: "more-figures"}, `show ${more.length} more figures`);
      toggle.addEventListener("click", () => {
        const show = toggle.textContent.startsWith("show");
        for (const tr of $("compare-table").querySelectorAll("tr.more")) tr.hidden = !show;
        toggle.textContent = `${show ? "hide" : "show"} ${more.length} more figures`;
      });
      rows.push(h("tr", {}, h("td", {colspan: runs.length + 1}, toggle)));
    }
    rows.push(h("tr", hidden, h("td", {title: key}, name), ...runs.map(r => {
      const v = r[key];
      const best = data.best[key] !== undefined && v === data.best[key];
      let text = typeof v === "number" ? Charts.fmt(v) : "";
      if (key === "headline_value" && r.headline_ci_low !== undefined && v !== undefined) {
        text += ` [${Charts.fmt(r.headline_ci_low)}, ${Charts.fmt(r.headline_ci_high)}]`;
      }
      return h("td", {class: best ? "num best" : "num"}, best ? `${text} ★` : text);
    })));
  }
  $("compare-table").tBodies[0].replaceChildren(...rows);
}

function drawBars() {
  const data = state.compare, key = $("bar-metric").value;
  if (!data || !key) return $("bar-chart").replaceChildren(h("p", {class: "dim"}, "no figures to plot"));
  const isBest = r => data.best[key] !== undefined && r[key] === data.best[key];
  const items = data.runs.map(r => ({label: r.label, value: typeof r[key] === "number" ? r[key] : null,
                                     colour: r.colour, best: isBest(r)}));
  const title = key === "headline_value" ? headlineName(data) : key;
  $("bar-chart").replaceChildren(Charts.bars(items, title + (data.best[key] !== undefined ? "  (★ best)" : "")));
}

const CURVE_ORDER = ["loss", "val_loss", "reward_mean", "kl", "score_mean"];

async function loadCurves(runs, load) {
  $("curve-chart").replaceChildren(h("p", {class: "dim"}, "loading curves…"));
  const results = await Promise.all(runs.map(r => getJSON(`/api/runs/${encodeURIComponent(r.id)}/metrics`)
    .catch(e => ({id: r.id, error: e.message, curves: {}}))));
  if (load !== state.loads.compare) return;
  runs.forEach((r, i) => { r.curves = results[i].curves; });
  const keys = [...new Set(results.flatMap(res => Object.keys(res.curves)))];
  keys.sort((a, b) => (CURVE_ORDER.indexOf(a) + 1 || 99) - (CURVE_ORDER.indexOf(b) + 1 || 99) || a.localeCompare(b));
  fillSelect($("curve-key"), keys, k => k, false);
  $("curve-key").disabled = !keys.length;
  if (!keys.length) {
    $("curve-chart").replaceChildren(
      h("p", {class: "dim"}, "No curves: these runs logged no training metrics (metrics.jsonl)."));
    return;
  }
  drawCurves();
}

function drawCurves() {
  const key = $("curve-key").value, runs = state.compare ? state.compare.runs : [];
  const series = runs.filter(r => r.curves && r.curves[key])
    .map(r => ({label: r.label, colour: r.colour, x: r.curves[key].x, y: r.curves[key].y}));
  $("curve-chart").replaceChildren(Charts.lines(series, `${key} by step`));
}

function renderExamples(data) {
  if (!data.examples.length) {
    $("examples").replaceChildren(h("p", {class: "dim"},
      "No outputs to show: these runs share no evaluated example (artifacts/predictions.jsonl)."));
    return;
  }
  const field = (name, text) => h("div", {class: "field"}, h("b", {}, name), h("pre", {}, text));
  $("examples").replaceChildren(...data.examples.map(ex => h("article", {class: "example"},
    h("h3", {}, `example ${ex.index}`, h("span", {class: "dim"}, ` ${ex.where}`)),
    field("input", ex.input),
    ...ex.references.map((ref, i) => field(ex.references.length > 1 ? `reference ${i + 1}` : "reference", ref)),
    h("div", {class: "outputs"}, ...Object.entries(ex.outputs).map(([name, text]) => h("div", {class: "output"},
      h("b", {}, name), h("pre", {class: text ? "" : "dim"}, text || "(empty)")))))));
}

// ---------------------------------------------------------------------------------------- playground
async function loadModels() {
  const status = $("model-status");
  try {
    const data = await getJSON("/api/models");
    fillSelect($("model"), data.models, m => m, false);
    status.className = "dim";
    status.textContent = TextSafe.visible(`model server ${data.url}: ${data.models.join(", ") || "no model"}`);
    state.models = data.models;
  } catch (e) {
    status.className = "error";
    status.textContent = TextSafe.visible(e.message);
  }
}

function playError(text) {
  $("play-error").hidden = false;
  $("play-error").textContent = TextSafe.visible(text);
  $("answer").dataset.state = "error";
}

async function send(event) {
  event.preventDefault();
  const answer = $("answer");
  answer.textContent = "";
  answer.dataset.chunks = "0";
  answer.dataset.state = "streaming";
  $("play-error").hidden = true;
  $("play-stats").textContent = "";
  const prompt = $("prompt").value;
  if (!prompt.trim()) return playError("Write a prompt first.");
  const body = {prompt, max_tokens: +$("max-tokens").value, temperature: +$("temperature").value,
                top_p: +$("top-p").value, model: $("model").value || null};
  state.abort = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const start = performance.now();
  let finish = null;
  try {
    const r = await fetch("/api/playground", {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify(body), signal: state.abort.signal});
    if (!r.ok) {
      const data = await r.json().catch(() => null);
      return playError((data && data.error) || `${r.status} ${r.statusText}`);
    }
    if (!state.models) loadModels();  // the server was down when the page opened and is up now
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer = (buffer + decoder.decode(value, {stream: true})).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        finish = onEvent(buffer.slice(0, cut)) || finish;
        buffer = buffer.slice(cut + 2);
      }
    }
    if (answer.dataset.state === "streaming") answer.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") answer.dataset.state = "done";
    else playError(`the answer stopped: ${e.message}`);
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
    const seconds = (performance.now() - start) / 1000;
    $("play-stats").textContent = `${answer.dataset.chunks} chunks in ${seconds.toFixed(2)} s` +
      (finish ? `; finish reason: ${finish}` : state.abort.signal.aborted ? "; stopped" : "");
  }
}

// One server-sent event: appends its text to the answer; returns the finish reason when it has one.
function onEvent(event) {
  let finish = null;
  for (const line of event.split("\n")) {
    if (!line.startsWith("data:")) continue;
    const payload = line.slice(5).trim();
    if (payload === "[DONE]") continue;
    let obj;
    try { obj = JSON.parse(payload); } catch { continue; }
    if (obj.error) {
      playError(typeof obj.error === "string" ? obj.error : obj.error.message);
      continue;
    }
    const choice = (obj.choices || [])[0] || {};
    const text = choice.delta && choice.delta.content;
    if (text) {
      $("answer").append(TextSafe.visible(text));
      $("answer").dataset.chunks = String(+$("answer").dataset.chunks + 1);
    }
    finish = choice.finish_reason || finish;
  }
  return finish;
}

// -------------------------------------------------------------------------------------------- routing
// The view and the chosen runs live in the address (#compare?ids=a,b), so a comparison can be reloaded
// or shared.
function route() {
  const [view, query] = (location.hash.slice(1) || "runs").split("?");
  const name = ["runs", "compare", "playground"].includes(view) ? view : "runs";
  for (const v of ["runs", "compare", "playground"]) $(`view-${v}`).hidden = v !== name;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === name);
  if (name === "runs") loadRuns();
  if (name === "compare") {
    const fromHash = new URLSearchParams(query || "").get("ids");
    const ids = fromHash ? fromHash.split(",").filter(Boolean) : [...state.selected];
    ids.forEach(id => state.selected.add(id));
    loadCompare(ids);
  }
  if (name === "playground" && state.models === null) loadModels();
}

function start() {
  let typing = null;
  $("f-variant").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(loadRuns, 200); });
  for (const id of ["f-stage", "f-status", "f-sort", "f-order"]) $(id).addEventListener("change", loadRuns);
  $("filters").addEventListener("submit", e => e.preventDefault());
  $("compare-btn").addEventListener("click", () => {
    location.hash = `#compare?ids=${[...state.selected].join(",")}`;
  });
  $("bar-metric").addEventListener("change", drawBars);
  $("curve-key").addEventListener("change", drawCurves);
  $("play-form").addEventListener("submit", send);
  $("stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("prompt").addEventListener("keydown", e => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("play-form").requestSubmit();
  });
  window.addEventListener("hashchange", route);
  route();
}

start();
