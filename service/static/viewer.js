/* lorasae viewer: a page over the public API of the feature server (no build step, no dependencies).
 *
 * Run: POST /v1/features for the text with the chosen adapter, and, when an adapter is chosen, the
 * same request with adapter null, so base and adapter are compared on the same spliced SAEs. The
 * SAEs spliced are the adapter's own (what it was trained with) plus the SAE being viewed; without
 * an adapter only the viewed SAE. Tokens are coloured by one latent of the viewed SAE; a token's
 * details (top-k latents, next-token logits) come from the adapter's response (the base one when
 * no adapter is chosen).
 *
 * Every value shown is also in a data-* attribute (raw JSON number) for tests and copy/paste.
 */
"use strict";

const state = {
  saes: [],        // SaeInfo of the loaded SAEs (from /readyz)
  adapters: [],    // AdapterInfo (from /v1/adapters)
  run: null,       // {main, base, adapter, sae, splice}: the last successful run
  runs: 0,
};

const $ = (id) => document.getElementById(id);

/** A DOM element: el("td", {class: "num", "data-value": 1}, "text", child, ...). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(key, String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

/** Fixed formatting of every number on the page (4 decimals; an em dash for "none"). */
const fmt = (value) => (value === null || value === undefined ? "\u2014" : value.toFixed(4));
const raw = (value) => (value === null || value === undefined ? "" : String(value));

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** GET (no body) or POST JSON; a non-2xx answer becomes an ApiError from {"error": {code, message}}. */
async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network_error", `cannot reach the server (${err.message})`);
  }
  const text = await resp.text();
  let data = null;
  try {
    data = JSON.parse(text);
  } catch (_) {
    data = null;  // not JSON: reported below with the raw text
  }
  if (!resp.ok) {
    const detail = data && data.error;
    throw new ApiError(resp.status, detail ? detail.code : "http_error",
                       detail ? detail.message : (text.slice(0, 300) || resp.statusText));
  }
  return data;
}

function showError(err) {
  const box = $("error");
  box.hidden = false;
  box.dataset.status = err.status ?? "";
  box.dataset.code = err.code ?? "client_error";
  box.replaceChildren(el("strong", {}, err.status ? `${err.status} ${err.code}` : (err.code || "error")),
                      ": ", el("span", {class: "message"}, err.message));
}

function clearError() {
  const box = $("error");
  box.hidden = true;
  box.replaceChildren();
  delete box.dataset.code;
  delete box.dataset.status;
}

function setStatus(kind, text) {
  $("status").dataset.state = kind;
  $("status").textContent = text;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** /readyz until the model is loaded (503 + Retry-After while loading). */
async function waitReady() {
  for (;;) {
    let resp;
    try {
      resp = await fetch("readyz");
    } catch (err) {
      throw new ApiError(0, "network_error", `cannot reach the server (${err.message})`);
    }
    const data = await resp.json();
    if (resp.ok) return data;
    if (data.status === "error") throw new ApiError(503, "startup_failed", data.detail || "startup failed");
    setStatus("loading", `server ${data.status}\u2026`);
    await sleep(1000 * Number(resp.headers.get("Retry-After") || 2));
  }
}

// ------------------------------------------------------------------ pickers

function fillSaes() {
  $("sae").replaceChildren(...state.saes.map((s) =>
    el("option", {value: s.id}, `${s.id} (layer ${s.layer}, ${s.d_sae} latents)`)));
}

function fillAdapters() {
  const current = $("adapter").value;
  const options = [el("option", {value: ""}, "none (base model)")];
  for (const a of state.adapters) {
    const own = a.saes.map((s) => s.id).join(", ");
    const label = a.status === "ready" ? `${a.name} (rank ${a.rank ?? "?"}; ${own})` : `${a.name} (error)`;
    options.push(el("option", {value: a.name, disabled: a.status === "ready" ? null : ""}, label));
  }
  $("adapter").replaceChildren(...options);
  if (state.adapters.some((a) => a.name === current && a.status === "ready")) $("adapter").value = current;
}

async function loadAdapters() {
  state.adapters = (await api("v1/adapters")).adapters;
  fillAdapters();
}

/** Viewing an SAE the adapter was not trained with would change its splice: default to one of its own. */
function onAdapterChange() {
  const adapter = state.adapters.find((a) => a.name === $("adapter").value);
  if (!adapter) return;
  const own = adapter.saes.map((s) => s.id);
  if (!own.includes($("sae").value) && state.saes.some((s) => s.id === own[0])) $("sae").value = own[0];
}

/** The SAEs a run splices: the adapter's own plus the viewed one (only the viewed one without adapter). */
function spliceFor(adapterName, sae) {
  const adapter = state.adapters.find((a) => a.name === adapterName);
  const ids = adapter ? adapter.saes.map((s) => s.id) : [];
  if (!ids.includes(sae)) ids.push(sae);
  return ids;
}

// ------------------------------------------------------------------ run

/** An <input type=number> as an integer, or null (the server reports the validation error). */
function intValue(id) {
  const text = $(id).value.trim();
  return text === "" || !Number.isInteger(Number(text)) ? null : Number(text);
}

async function run(event) {
  event.preventDefault();
  clearError();
  const adapter = $("adapter").value || null;
  const sae = $("sae").value;
  const splice = spliceFor(adapter, sae);
  const body = {inputs: $("text").value, adapter, saes: splice, top_k: intValue("top-k"),
                logits: "top_k", logits_top_k: intValue("logits-top-k")};
  $("run").disabled = true;
  $("run").textContent = "Running\u2026";
  $("tokens").dataset.state = "loading";
  try {
    const [main, base] = await Promise.all(
      adapter ? [api("v1/features", body), api("v1/features", {...body, adapter: null})]
              : [api("v1/features", body)]);
    state.run = {main, base: base || main, adapter, sae, splice};
    state.runs += 1;
    render();
  } catch (err) {
    state.run = null;
    clearViews();
    showError(err);
    $("tokens").dataset.state = "error";
  } finally {
    $("run").disabled = false;
    $("run").textContent = "Run";
  }
}

function clearViews() {
  $("tokens").replaceChildren();
  $("run-info").textContent = "";
  $("latent-info").textContent = "";
  $("panel").replaceChildren(el("p", {class: "hint"}, "Run a text, then hover a token."));
  $("panel").dataset.position = "";
  $("compare-info").textContent = "";
  $("compare-table").replaceChildren();
}

function render() {
  const {main, adapter, sae, splice} = state.run;
  const tokens = main.results[0].tokens;
  $("run-info").textContent = `${tokens.length} tokens \u00b7 ${adapter ? `adapter ${adapter}` : "base model"}`
                              + ` \u00b7 spliced: ${splice.join(", ")} \u00b7 viewing ${sae}`;
  renderTokens();
  renderPanel(tokens.length > 1 ? 1 : 0);
  renderCompare();
  $("tokens").dataset.run = String(state.runs);
  $("tokens").dataset.state = "done";
}

// ------------------------------------------------------------------ tokens coloured by one latent

function activationOf(token, sae, latent) {
  const hit = (token.features[sae] || []).find((f) => f.index === latent);
  return hit ? hit.activation : null;
}

/** The latent with the highest activation on any token after position 0 (BOS keeps outlier norms). */
function mostActive(tokens, sae) {
  let best = null;
  for (const token of tokens.length > 1 ? tokens.slice(1) : tokens) {
    for (const f of token.features[sae] || []) {
      if (best === null || f.activation > best.activation) best = {...f, position: token.position};
    }
  }
  return best;
}

/** The latent to colour by: the input's value, or the most active one when the input is empty. */
function chosenLatent(tokens, sae) {
  const text = $("latent").value.trim();
  if (text === "") {
    const best = mostActive(tokens, sae);
    return best === null ? null : {index: best.index, auto: true};
  }
  const dSae = state.run.main.saes.find((s) => s.id === sae).d_sae;
  const index = Number(text);
  if (!Number.isInteger(index) || index < 0 || index >= dSae) {
    showError(new ApiError(0, "bad_latent", `latent must be an integer in [0, ${dSae}); got ${text}`));
    return null;
  }
  return {index, auto: false};
}

function renderTokens() {
  const {main, sae} = state.run;
  const tokens = main.results[0].tokens;
  const latent = chosenLatent(tokens, sae);
  const acts = tokens.map((t) => (latent === null ? null : activationOf(t, sae, latent.index)));
  // the colour scale ignores position 0, whose norm is an outlier in most models
  const scaleActs = (acts.length > 1 ? acts.slice(1) : acts).filter((a) => a !== null);
  const max = scaleActs.length ? Math.max(...scaleActs) : 0;
  const info = $("latent-info");
  info.dataset.latent = latent === null ? "" : String(latent.index);
  info.dataset.max = raw(max);
  const typed = $("latent").value.trim() !== "";
  const how = latent && latent.auto ? " (the most active on this text; type a latent to change)" : "";
  if (latent !== null) {
    info.textContent = `Colour: latent ${latent.index} of ${sae}${how} \u00b7 max ${fmt(max)} after position 0`;
  } else {
    info.textContent = typed ? "no latent to colour by" : `no active latent of ${sae} on this text`;
  }
  $("legend-max").textContent = fmt(max);
  const spans = tokens.map((token, i) => {
    const act = acts[i];
    const span = el("span", {
      class: `tok${act === null ? " absent" : ""}${i === 0 ? " bos" : ""}`, tabindex: 0,
      "data-position": token.position, "data-id": token.id, "data-activation": raw(act),
      title: `position ${token.position} \u00b7 id ${token.id} \u00b7 activation ${fmt(act)}`,
    }, token.text);
    if (act !== null && max > 0) {
      const level = Math.max(0, Math.min(1, act / max));
      span.style.backgroundColor = `rgba(234, 88, 12, ${(0.1 + 0.75 * level).toFixed(3)})`;
    }
    return span;
  });
  $("tokens").replaceChildren(...spans);
  markCurrent();
}

function markCurrent() {
  const position = $("panel").dataset.position;
  for (const span of $("tokens").children) span.classList.toggle("current", span.dataset.position === position);
}

// ------------------------------------------------------------------ the token panel

const headRow = (...labels) => el("thead", {}, el("tr", {}, ...labels.map((label) => el("th", {}, label))));
const percent = (value, top) => (top > 0 ? Math.max(0, Math.min(100, (100 * value) / top)).toFixed(1) : "0");

function renderPanel(position) {
  const {main, sae} = state.run;
  const token = main.results[0].tokens[position];
  const feats = token.features[sae] || [];
  const logits = token.top_logits || [];
  const top = feats.length ? feats[0].activation : 0;
  const latentRows = feats.map((f) => el("tr", {"data-index": f.index, "data-activation": raw(f.activation),
                                                title: "click: colour the tokens by this latent"},
    el("td", {class: "num"}, String(f.index)),
    el("td", {class: "num"}, fmt(f.activation)),
    el("td", {class: "barcell"}, el("span", {class: "bar", style: `width:${percent(f.activation, top)}%`}))));
  const logitRows = logits.map((l) => el("tr", {"data-id": l.id, "data-logprob": raw(l.logprob)},
    el("td", {class: "tokcell"}, el("span", {class: "piece"}, l.text)),
    el("td", {class: "num"}, fmt(l.logprob)),
    el("td", {class: "num"}, `${(100 * Math.exp(l.logprob)).toFixed(1)}%`)));
  const err = token.recon_error[sae];
  const panel = $("panel");
  panel.dataset.position = String(position);
  panel.replaceChildren(
    el("h3", {}, "Token ", el("span", {class: "piece", id: "panel-text"}, token.text)),
    el("dl", {},
       el("dt", {}, "position"), el("dd", {id: "panel-position"}, String(token.position)),
       el("dt", {}, "id"), el("dd", {id: "panel-id"}, String(token.id)),
       el("dt", {}, "next-token loss"),
       el("dd", {id: "panel-loss", "data-value": raw(token.loss)}, fmt(token.loss)),
       el("dt", {}, `recon error (${sae})`), el("dd", {id: "panel-recon", "data-value": raw(err)}, fmt(err))),
    el("h4", {}, `Top latents of ${sae}`),
    feats.length ? el("table", {id: "panel-latents"},
                      headRow("latent", "activation", ""),
                      el("tbody", {}, ...latentRows))
                 : el("p", {class: "hint", id: "panel-latents"}, "no active latent"),
    el("h4", {}, "Next-token logits"),
    el("table", {id: "panel-logits"},
       headRow("token", "logprob", "p"),
       el("tbody", {}, ...logitRows)));
  markCurrent();
}

function onTokenEvent(event) {
  const span = event.target.closest(".tok");
  if (span && state.run && span.dataset.position !== $("panel").dataset.position) {
    renderPanel(Number(span.dataset.position));
  }
}

function onPanelClick(event) {
  const row = event.target.closest("tr[data-index]");
  if (!row || !state.run) return;
  $("latent").value = row.dataset.index;
  clearError();
  renderTokens();
}

// ------------------------------------------------------------------ base vs adapter

const mean = (values) => {
  const kept = values.filter((v) => v !== null && v !== undefined);
  return kept.length ? kept.reduce((a, b) => a + b, 0) / kept.length : null;
};
const delta = (a, b) => (a === null || a === undefined || b === null || b === undefined ? null : b - a);

/** A number cell; `scale` > 0 draws a bar behind the number (value / scale of the width). */
function numCell(col, value, scale = 0, signed = false) {
  const cls = ["num"];
  if (signed && value < 0) cls.push("better");
  if (signed && value > 0) cls.push("worse");
  const td = el("td", {class: cls.join(" "), "data-col": col, "data-value": raw(value)},
                signed && value > 0 ? `+${fmt(value)}` : fmt(value));
  if (scale > 0 && value !== null) {
    td.classList.add("bar-bg");
    td.style.setProperty("--w", `${percent(value, scale)}%`);
  }
  return td;
}

function renderCompare() {
  const {main, base, adapter, sae} = state.run;
  const baseTokens = base.results[0].tokens;
  const adapterTokens = adapter ? main.results[0].tokens : null;
  const cols = adapter ? ["base-loss", "adapter-loss", "delta-loss",
                          "base-recon", "adapter-recon", "delta-recon"] : ["base-loss", "base-recon"];
  const heads = {"base-loss": "loss base", "adapter-loss": `loss ${adapter}`, "delta-loss": "\u0394 loss",
                 "base-recon": "recon error base", "adapter-recon": `recon error ${adapter}`,
                 "delta-recon": "\u0394 recon error"};
  const series = {
    "base-loss": baseTokens.map((t) => t.loss),
    "base-recon": baseTokens.map((t) => t.recon_error[sae] ?? null),
  };
  if (adapter) {
    series["adapter-loss"] = adapterTokens.map((t) => t.loss);
    series["adapter-recon"] = adapterTokens.map((t) => t.recon_error[sae] ?? null);
    series["delta-loss"] = series["base-loss"].map((v, i) => delta(v, series["adapter-loss"][i]));
    series["delta-recon"] = series["base-recon"].map((v, i) => delta(v, series["adapter-recon"][i]));
  }
  // means: loss over the predicted positions (null at the last), recon error after position 0
  const after0 = (values) => (values.length > 1 ? values.slice(1) : values);
  const means = {};
  for (const col of cols) means[col] = mean(col.endsWith("recon") ? after0(series[col]) : series[col]);
  const maxOf = (...names) => Math.max(0, ...names.flatMap((n) => after0(series[n] || []))
                                                     .filter((v) => v !== null));
  const lossScale = maxOf("base-loss", "adapter-loss");
  const reconScale = maxOf("base-recon", "adapter-recon");
  const scaleOf = (col) => (col.startsWith("delta") ? 0 : col.endsWith("loss") ? lossScale : reconScale);

  const rows = baseTokens.map((token, i) => el("tr", {"data-position": token.position},
    el("td", {class: "num"}, String(token.position)),
    el("td", {class: "tokcell"}, el("span", {class: "piece"}, token.text)),
    ...cols.map((col) => numCell(col, series[col][i], scaleOf(col), col.startsWith("delta")))));
  $("compare-table").replaceChildren(
    headRow("pos", "token", ...cols.map((c) => heads[c])),
    el("tbody", {}, ...rows),
    el("tfoot", {}, el("tr", {id: "compare-mean"}, el("th", {}, "mean"), el("th", {}, ""),
                       ...cols.map((col) => numCell(col, means[col], 0, col.startsWith("delta"))))));
  const info = $("compare-info");
  if (adapter) {
    info.textContent = `Next-token loss (nats) and squared L2 reconstruction error of ${sae}, `
      + `base model vs adapter ${adapter}; \u0394 = adapter \u2212 base (green: lower with the adapter). `
      + "Means: loss over predicted tokens, recon error after position 0.";
  } else {
    info.textContent = `Base model only: pick an adapter to compare it with the base model on the same splice. `
      + "Means: loss over predicted tokens, recon error after position 0.";
  }
}

// ------------------------------------------------------------------ start

async function init() {
  $("controls").addEventListener("submit", run);
  $("adapter").addEventListener("change", onAdapterChange);
  $("latent").addEventListener("input", () => {
    if (!state.run) return;
    clearError();
    renderTokens();
  });
  for (const type of ["mouseover", "focusin", "click"]) $("tokens").addEventListener(type, onTokenEvent);
  $("panel").addEventListener("click", onPanelClick);
  try {
    const health = await waitReady();
    state.saes = health.saes;
    fillSaes();
    await loadAdapters();
    const ready = state.adapters.filter((a) => a.status === "ready").length;
    setStatus("ready", `${health.model} \u00b7 ${state.saes.length} SAE(s) \u00b7 ${ready} adapter(s)`);
    $("run").disabled = false;
  } catch (err) {
    setStatus("error", "not ready");
    showError(err);
  }
}

init();
