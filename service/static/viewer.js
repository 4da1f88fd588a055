/* lorasae viewer: a page over the public API of the feature server (no build step, no dependencies).
 *
 * Run: POST /v1/features for the text with the chosen adapter, and, when an adapter is chosen, the
 * same request with adapter null, so base and adapter are compared on the same spliced SAEs. The
 * SAEs spliced are the adapter's own (what it was trained with) plus the SAE being viewed; without
 * an adapter only the viewed SAE. Tokens are coloured by one latent of the viewed SAE; a token's
 * details (top-k latents, next-token logits) come from the adapter's response (the base one when
 * no adapter is chosen).
 *
 * Latents: a latent's dashboard (GET /v1/saes/{sae}/latents/{index}) opens from a token panel's
 * latent, a search result (GET /v1/saes/{sae}/latents?q=...) or the Latent input; with an adapter
 * chosen, the base model's record and the adapter's are shown side by side.
 *
 * Drift: an adapter's drift report (GET /v1/adapters/{name}/drift, against the base model or another
 * adapter): per SAE how many latents drifted beyond noise, and the latents ranked, most drifted
 * first; a latent opens with its drift numbers and its reference and adapted dashboards side by
 * side. The view is in the URL: #drift?adapter=NAME[&against=NAME][&sae=SAE][&side=..][&offset=N]
 * [&latent_sae=SAE&latent=I] opens it (on load and when the hash changes).
 *
 * Steering: POST /v1/generate with stream: true and compare: true and one intervention on a latent
 * (set / add / scale, at the prompt's positions, the generated ones or both): the Server-Sent Events
 * body is read as it arrives (fetch + ReadableStream), the unsteered and steered continuations fill
 * side by side token by token, with the per-step KL of the steered one; Stop aborts the fetch (the
 * server frees the generation). A "steer" button next to a latent in a token's panel or on a latent's
 * dashboard opens it prefilled; so does #steer?sae=SAE&latent=I[&adapter=NAME].
 *
 * Every value shown is also in a data-* attribute (raw JSON number) for tests and copy/paste.
 */
"use strict";

const state = {
  saes: [],        // SaeInfo of the loaded SAEs (from /readyz)
  adapters: [],    // AdapterInfo (from /v1/adapters)
  run: null,       // {main, base, adapter, sae, splice}: the last successful run
  runs: 0,
  latent: null,    // {sae, index}: the latent whose dashboard is shown
  latentLoads: 0,  // dashboard loads started (a stale answer is dropped)
  searches: 0,     // searches started (likewise)
  drift: null,     // {params, report}: the drift report shown
  driftLoads: 0,   // drift loads started (likewise)
  driftLatentLoads: 0,  // drift latent views started (likewise)
  steerRuns: 0,    // generations started (a stale stream's events are dropped)
  steer: null,     // {controller, seq}: the generation streaming now
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
  const options = () => state.saes.map((s) => el("option", {value: s.id}, `${s.id} (layer ${s.layer}, ${s.d_sae} latents)`));
  $("sae").replaceChildren(...options());
  $("steer-sae").replaceChildren(...options());
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
  fillDriftPickers();
  fillSteerAdapters();
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
  $("run-warnings").replaceChildren();
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
  // the server's warnings (e.g. the adapter used with other SAEs than it was trained with)
  $("run-warnings").replaceChildren(...(main.warnings || []).map(
    (w) => el("p", {class: "warning", "data-code": w.code}, el("strong", {}, "warning: "), w.message)));
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
                                                title: "click: colour the tokens by this latent and open its dashboard"},
    el("td", {class: "num"}, String(f.index)),
    el("td", {class: "num"}, fmt(f.activation)),
    el("td", {class: "barcell"}, el("span", {class: "bar", style: `width:${percent(f.activation, top)}%`})),
    el("td", {class: "steercell"}, steerButton(sae, f.index, state.run.adapter))));
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
                      headRow("latent", "activation", "", ""),
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
  if (onSteerClick(event)) return;
  const row = event.target.closest("tr[data-index]");
  if (!row || !state.run) return;
  $("latent").value = row.dataset.index;
  clearError();
  renderTokens();
  openLatent(state.run.sae, Number(row.dataset.index), {scroll: true});
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

// ------------------------------------------------------------------ latent dashboards

// the SVG namespace, as the HTML parser gives it (the page holds no URL outside the server, not even this one)
const SVG = (() => {
  const template = document.createElement("template");
  template.innerHTML = "<svg></svg>";
  return template.content.firstChild.namespaceURI;
})();

/** An SVG element, like el(). */
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(key, String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

const latentPath = (sae, index) => `v1/saes/${encodeURIComponent(sae)}/latents/${index}`;
const withAdapter = (path, adapter) => (adapter ? `${path}?adapter=${encodeURIComponent(adapter)}` : path);

/** Open latent `index` of `sae`: the base record, and the adapter's beside it when one is chosen.
 * The server checks the index (404 unknown_latent), as it checks everything else. */
async function openLatent(sae, index, {scroll = false} = {}) {
  const adapter = $("adapter").value || null;
  const seq = ++state.latentLoads;
  state.latent = {sae, index};
  const view = $("latent-view");
  Object.assign(view.dataset, {state: "loading", sae, index: String(index), adapter: adapter || ""});
  if (scroll) view.scrollIntoView({block: "start"});
  const sides = adapter ? [null, adapter] : [null];
  const answers = await Promise.all(sides.map((name) =>
    api(withAdapter(latentPath(sae, index), name)).then((record) => ({record}), (error) => ({error}))));
  if (seq !== state.latentLoads) return;  // another latent was opened meanwhile
  const columns = answers.map((answer, i) => latentSide(sides[i], answer));
  const failed = answers.filter((a) => a.error);
  // "no dashboard" is said in place; anything else (unknown latent, SAE or adapter) also in #error
  const serious = failed.find((a) => a.error.code !== "no_dashboard");
  if (serious) showError(serious.error);
  view.replaceChildren(
    el("h3", {id: "latent-title"}, `Latent ${index} of ${sae}`,
       el("small", {}, adapter ? ` base model vs adapter ${adapter}` : " base model"), " ",
       steerButton(sae, index, adapter, "latent-steer")),
    el("div", {class: `latent-sides n${sides.length}`}, ...columns));
  view.dataset.state = failed.length === answers.length ? "error" : "done";
  view.dataset.seq = String(seq);
}

/** One column of the latent view: a record, or the message of its error in place. `side` names the
 * column (data-side): base / adapter here, reference / adapted in the drift view. */
function latentSide(adapter, {record, error}, side = adapter ? "adapter" : "base") {
  const label = adapter ? `adapter ${adapter}` : "base model";
  if (error) {
    return el("div", {class: "latent-side missing", "data-side": side, "data-state": "error",
                      "data-status": error.status ?? "", "data-code": error.code ?? ""},
      el("h4", {}, label),
      el("p", {class: "message"}, el("strong", {}, `${error.status || ""} ${error.code}`.trim()), ": ",
         el("span", {class: "text"}, error.message)));
  }
  const r = record;
  const d = r.dashboard;
  const badge = r.dead ? el("span", {class: "badge dead", title: "never fired on the dashboard's tokens"}, "dead") : "";
  const stat = (name, label, value, text, note = "") => [
    el("dt", {}, label),
    el("dd", {class: `stat-${name}`, "data-value": raw(value)}, el("span", {class: "value"}, text), note)];
  const share = r.density >= 0.01 ? ` ${(100 * r.density).toFixed(1)}% of tokens`
    : r.density > 0 ? ` 1 in ${Math.round(1 / r.density)} tokens` : "";
  const oneIn = share ? el("small", {}, share) : "";
  return el("div", {class: "latent-side", "data-side": side, "data-state": "done", "data-sae": r.sae,
                    "data-index": r.index, "data-adapter": r.adapter ?? "", "data-dead": String(r.dead)},
    el("h4", {}, label, " ", badge),
    el("p", {class: "source"}, `${r.sae} latent ${r.index} \u00b7 ${d.tokens} tokens of ${d.corpus} `
       + `(${d.split}), contexts of ${d.ctx}`),
    el("dl", {class: "stats"},
       ...stat("density", "density", r.density, fmt(r.density), oneIn),
       ...stat("fired", "fired (tokens)", r.fired, String(r.fired)),
       ...stat("mean", "mean activation", r.mean_activation, fmt(r.mean_activation)),
       ...stat("max", "max activation", r.max_activation, fmt(r.max_activation))),
    el("h5", {}, "Activation histogram ", el("small", {}, "(log bins, firing tokens)")),
    histogram(r.histogram),
    el("h5", {}, "Top contexts"),
    contextList("top", r.top_contexts, r.max_activation),
    el("h5", {}, "Quantile samples"),
    quantiles(r.quantile_contexts, r.max_activation),
    el("h5", {}, "Logit lens ", el("small", {}, "(decoder row through the unembedding)")),
    effects("lens", r.logit_lens),
    el("h5", {}, "Causal effect ", el("small", {}, `(\u0394 log-prob when removed, over ${r.causal_effect.contexts} top contexts)`)),
    effects("effect", r.causal_effect));
}

/** Inline SVG bars over the log bins: bin 0 is (0, edges[0]), bin i [edges[i-1], edges[i]), the last >= edges[-1].
 * The bins from the first to the last non-empty one are drawn (all counts are in data-counts). */
function histogram(h) {
  const counts = h.counts;
  const edges = h.edges;
  const low = (i) => (i === 0 ? 0 : edges[i - 1]);
  const high = (i) => (i < edges.length ? edges[i] : null);
  const nonzero = counts.map((c, i) => (c > 0 ? i : -1)).filter((i) => i >= 0);
  const W = 320, H = 90, PAD = 14;
  const root = svg("svg", {class: "histogram", viewBox: `0 0 ${W} ${H + PAD}`, role: "img",
                           "data-counts": JSON.stringify(counts), "data-edges": JSON.stringify(edges)});
  if (!nonzero.length) {
    root.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"}, "no activation"));
    return root;
  }
  const first = Math.max(0, nonzero[0] - 1);
  const last = Math.min(counts.length - 1, nonzero[nonzero.length - 1] + 1);
  const shown = last - first + 1;
  const top = Math.max(...counts);
  const bw = W / shown;
  root.append(svg("line", {x1: 0, y1: H, x2: W, y2: H, class: "axis"}));
  for (let i = first; i <= last; i++) {
    const h1 = top > 0 ? (H - 4) * (counts[i] / top) : 0;
    const range = high(i) === null ? `\u2265 ${fmt(low(i))}` : `[${fmt(low(i))}, ${fmt(high(i))})`;
    root.append(svg("rect", {class: "bin", x: ((i - first) * bw + 0.5).toFixed(2), y: (H - h1).toFixed(2),
                             width: Math.max(0.5, bw - 1).toFixed(2), height: h1.toFixed(2),
                             "data-bin": i, "data-count": counts[i], "data-low": raw(low(i)),
                             "data-high": raw(high(i))},
                    svg("title", {}, `${range}: ${counts[i]}`)));
  }
  root.append(svg("text", {x: 0, y: H + PAD - 2, class: "tick"}, fmt(low(first))),
              svg("text", {x: W, y: H + PAD - 2, class: "tick", "text-anchor": "end"},
                  high(last) === null ? `\u2265 ${fmt(low(last))}` : fmt(high(last))),
              svg("text", {x: W / 2, y: 10, class: "tick", "text-anchor": "middle"}, `max count ${top}`));
  return root;
}

/** Context windows, one row each: tokens coloured by their activation relative to the latent's max. */
function contextList(kind, contexts, max) {
  if (!contexts.length) return el("p", {class: "hint", "data-kind": kind}, "none");
  return el("ol", {class: "contexts", "data-kind": kind}, ...contexts.map((c) => contextRow(c, max)));
}

function contextRow(c, max) {
  const center = c.position - c.start;
  const tokens = c.tokens.map((t, i) => {
    const span = el("span", {class: `ctok${i === center ? " center" : ""}`, "data-id": t.id,
                             "data-activation": raw(t.activation),
                             title: `id ${t.id} \u00b7 activation ${fmt(t.activation)}`}, t.text);
    if (t.activation > 0 && max > 0) {
      const level = Math.max(0, Math.min(1, t.activation / max));
      span.style.backgroundColor = `rgba(234, 88, 12, ${(0.1 + 0.75 * level).toFixed(3)})`;
    }
    return span;
  });
  return el("li", {class: "context", "data-sequence": c.sequence, "data-position": c.position,
                   "data-start": c.start, "data-activation": raw(c.activation),
                   "data-interval": c.interval ?? null},
    el("span", {class: "act num", title: `sequence ${c.sequence}, position ${c.position}`}, fmt(c.activation)),
    el("span", {class: "window"}, ...tokens));
}

/** Quantile samples grouped by their interval label, in the order the record gives them. */
function quantiles(contexts, max) {
  if (!contexts.length) return el("p", {class: "hint quantiles"}, "none");
  const groups = new Map();
  for (const c of contexts) {
    const key = c.interval ?? "";
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(c);
  }
  return el("div", {class: "quantiles"}, ...[...groups].map(([interval, list]) =>
    el("div", {class: "quantile", "data-interval": interval},
       el("h6", {}, interval || "(no interval)"), contextList("quantile", list, max))));
}

/** Promoted and suppressed tokens with their values, side by side. */
function effects(kind, e) {
  const table = (which, list) => el("table", {class: "effects", "data-kind": kind, "data-which": which},
    headRow(which, "value"),
    el("tbody", {}, ...list.map((t) => el("tr", {"data-id": t.id, "data-value": raw(t.value)},
      el("td", {class: "tokcell"}, el("span", {class: "piece"}, t.text)),
      el("td", {class: "num"}, fmt(t.value))))));
  return el("div", {class: "effect-pair"}, table("promoted", e.promoted), table("suppressed", e.suppressed));
}

/** The Latent input: Enter or leaving it opens that latent of the chosen SAE. */
function onLatentChange() {
  const text = $("latent").value.trim();
  if (text === "") return;
  clearError();
  openLatent($("sae").value, Number(text));
}

/** Reopen the shown latent when the adapter changes (base alone, or base and adapter). */
function onAdapterLatents() {
  if (state.latent) openLatent(state.latent.sae, state.latent.index);
}

// ------------------------------------------------------------------ latent search

async function search(event) {
  event.preventDefault();
  clearError();
  const sae = $("sae").value;
  const adapter = $("adapter").value || null;
  const params = new URLSearchParams({sort: $("search-sort").value, order: $("search-order").value,
                                      include_dead: String($("search-dead").checked), limit: "50"});
  const q = $("search-q").value.trim();
  if (q) params.set("q", q);
  if (adapter) params.set("adapter", adapter);
  const seq = ++state.searches;
  const table = $("search-results");
  table.dataset.state = "loading";
  $("search-run").disabled = true;
  try {
    const found = await api(`v1/saes/${encodeURIComponent(sae)}/latents?${params}`);
    if (seq !== state.searches) return;
    renderSearch(found, q);
    table.dataset.state = "done";
  } catch (err) {
    if (seq !== state.searches) return;
    table.replaceChildren();
    $("search-info").textContent = "";
    table.dataset.state = "error";
    showError(err);
  } finally {
    if (seq === state.searches) {
      $("search-run").disabled = false;
      table.dataset.search = String(seq);
    }
  }
}

function renderSearch(found, q) {
  const pieces = (list) => el("span", {class: "pieces"}, ...list.map((t) => el("span", {class: "piece"}, t)));
  const rows = found.latents.map((h) => el("tr", {"data-index": h.index, "data-sae": found.sae,
                                                  title: "click: open its dashboard"},
    el("td", {class: "num"}, String(h.index), h.dead ? el("span", {class: "badge dead"}, "dead") : ""),
    el("td", {class: "num", "data-col": "density", "data-value": raw(h.density)}, fmt(h.density)),
    el("td", {class: "num", "data-col": "max", "data-value": raw(h.max_activation)}, fmt(h.max_activation)),
    el("td", {"data-col": "top-tokens"}, pieces(h.top_tokens)),
    el("td", {"data-col": "promoted"}, pieces(h.promoted)),
    ...(q ? [el("td", {class: "num", "data-col": "score", "data-value": raw(h.score)}, fmt(h.score))] : [])));
  $("search-results").replaceChildren(
    headRow("latent", "density", "max act.", "fires on", "promotes", ...(q ? ["score"] : [])),
    el("tbody", {}, ...rows));
  const where = found.adapter ? `adapter ${found.adapter}` : "base model";
  const info = $("search-info");
  info.dataset.total = String(found.total);
  info.textContent = `${found.latents.length} of ${found.total} latent(s) of ${found.sae} (${where})`
    + (q ? ` matching \u201c${q}\u201d` : "") + (found.latents.length ? "; click one for its dashboard" : "");
}

function onSearchClick(event) {
  const row = event.target.closest("tr[data-index]");
  if (!row) return;
  clearError();
  openLatent(row.dataset.sae, Number(row.dataset.index));
}

// ------------------------------------------------------------------ latent drift

const DRIFT_PAGE = 50;
const SIDE_LABELS = {any: "drifted on either side", input: "drifted on the input side",
                     output: "drifted on the output side", all: "all latents"};
const pct = (fraction) => `${(100 * fraction).toFixed(1)}%`;

function fillDriftPickers() {
  const ready = state.adapters.filter((a) => a.status === "ready").map((a) => a.name);
  const keep = (id, options) => {
    const current = $(id).value;
    $(id).replaceChildren(...options);
    if ([...$(id).options].some((o) => o.value === current)) $(id).value = current;
  };
  keep("drift-adapter", ready.map((name) => el("option", {value: name}, name)));
  keep("drift-against", [el("option", {value: ""}, "base model"),
                         ...ready.map((name) => el("option", {value: name}, `adapter ${name}`))]);
  keep("drift-sae", [el("option", {value: ""}, "all of the report's"),
                     ...state.saes.map((s) => el("option", {value: s.id}, s.id))]);
}

/** The form as drift parameters. */
function driftForm() {
  return {adapter: $("drift-adapter").value, against: $("drift-against").value || null,
          sae: $("drift-sae").value || null, side: $("drift-side").value};
}

/** The URL hash of a drift view (see the header comment). */
function driftHash(params, offset, latent) {
  const q = new URLSearchParams({adapter: params.adapter});
  if (params.against) q.set("against", params.against);
  if (params.sae) q.set("sae", params.sae);
  q.set("side", params.side);
  if (offset) q.set("offset", String(offset));
  if (latent) {
    q.set("latent_sae", latent.sae);
    q.set("latent", String(latent.latent));
  }
  return `#drift?${q}`;
}

/** Load a page of a drift report; resolves to whether it was shown. */
async function loadDrift(params, offset = 0) {
  clearError();
  const seq = ++state.driftLoads;
  const table = $("drift-results");
  table.dataset.state = "loading";
  $("drift-run").disabled = true;
  const q = new URLSearchParams({side: params.side, limit: String(DRIFT_PAGE), offset: String(offset)});
  if (params.against) q.set("against", params.against);
  if (params.sae) q.set("sae", params.sae);
  try {
    const report = await api(`v1/adapters/${encodeURIComponent(params.adapter)}/drift?${q}`);
    if (seq !== state.driftLoads) return false;
    if (!showing(params)) clearDriftLatent();  // another report: the latent shown was of the previous one
    state.drift = {params, report};
    renderDrift(report);
    history.replaceState(null, "", driftHash(params, offset, null));
    table.dataset.state = "done";
    return true;
  } catch (err) {
    if (seq !== state.driftLoads) return false;
    state.drift = null;
    clearDriftLatent();
    table.replaceChildren();
    $("drift-saes").replaceChildren();
    $("drift-info").textContent = "";
    $("drift-prev").disabled = $("drift-next").disabled = true;
    table.dataset.state = "error";
    showError(err);
    return false;
  } finally {
    if (seq === state.driftLoads) {
      $("drift-run").disabled = false;
      table.dataset.load = String(seq);
    }
  }
}

/** Whether the drift report shown is the one `params` name (any page of it). */
const showing = (params) => state.drift !== null && JSON.stringify(state.drift.params) === JSON.stringify(params);

function clearDriftLatent() {
  const view = $("drift-latent");
  view.replaceChildren(el("p", {class: "hint"},
    "Click a latent for its drift and its reference and adapted dashboards side by side."));
  view.dataset.state = "empty";
  for (const key of ["sae", "index", "missing"]) delete view.dataset[key];
}

function renderDrift(report) {
  const against = report.against ? `adapter ${report.against}` : "the base model";
  const first = report.latents.length ? report.offset + 1 : 0;
  const info = $("drift-info");
  info.dataset.total = String(report.total);
  info.dataset.offset = String(report.offset);
  info.textContent = `Adapter ${report.adapter} vs ${against}, over ${report.tokens} tokens of ${report.corpus} `
    + `(${report.split}): ${first}\u2013${report.offset + report.latents.length} of ${report.total} `
    + `latent(s) ${SIDE_LABELS[report.side]}, most drifted first`
    + (report.latents.length ? "; click one for its drift and dashboards" : "");
  $("drift-saes").replaceChildren(driftSaes(report));
  const several = report.saes.length > 1;
  const rows = report.latents.map((x) => el("tr", {"data-sae": x.sae, "data-layer": x.layer, "data-latent": x.latent,
                                                   "data-rank": x.rank, title: "click: its drift and dashboards"},
    el("td", {class: "num", "data-col": "rank"}, String(x.rank)),
    ...(several ? [el("td", {"data-col": "sae"}, x.sae)] : []),
    el("td", {class: "num", "data-col": "latent"}, String(x.latent)),
    el("td", {class: "num", "data-col": "score", "data-value": raw(x.score)}, fmt(x.score)),
    el("td", {"data-col": "sides"}, ...x.sides.map((s) => el("span", {class: `badge side ${s}`}, s))),
    el("td", {class: "evidence", "data-col": "evidence"}, x.evidence)));
  $("drift-results").replaceChildren(
    headRow("rank", ...(several ? ["SAE"] : []), "latent", "score", "drifted", "evidence"),
    el("tbody", {}, ...rows));
  $("drift-prev").disabled = report.offset === 0;
  $("drift-next").disabled = report.offset + report.latents.length >= report.total;
}

/** Per SAE: how many latents drifted beyond noise on each side, the thresholds, and whether its
 * input is identical by construction. */
function driftSaes(report) {
  const count = (side, n, fraction, of) => el("td", {class: "num", "data-col": `${side}-drifted`,
                                                     "data-value": n, "data-fraction": raw(fraction)},
                                              `${n} (${pct(fraction)} of ${of})`);
  const rows = report.saes.map((s) => {
    const t = s.thresholds;
    const note = s.input_identical_by_construction
      ? el("span", {class: "identical"}, "input identical by construction: the SAE reads the residual stream "
           + `before the first adapted layer (${s.first_adapted_layer}); only what its latents do can change`)
      : `first adapted layer ${s.first_adapted_layer ?? "\u2014"}`;
    return el("tr", {"data-sae": s.sae, "data-layer": s.layer,
                     "data-identical": String(s.input_identical_by_construction)},
      el("td", {}, s.sae),
      el("td", {class: "num", "data-col": "latents", "data-value": s.summary.latents}, String(s.summary.latents)),
      count("input", s.summary.input_drifted, s.summary.input_fraction, `${s.summary.alive} alive`),
      count("output", s.summary.output_drifted, s.summary.output_fraction, `${s.summary.measured} measured`),
      el("td", {class: "thresholds", "data-col": "thresholds", "data-density-log-ratio": t.density_log_ratio,
                "data-hist-js": t.hist_js, "data-pearson": t.pearson, "data-effect-cosine": t.effect_cosine},
         `|ln density ratio| > ${fmt(t.density_log_ratio)}, histogram JS > ${fmt(t.hist_js)}, `
         + `1 \u2212 Pearson > ${fmt(t.pearson)}; effect cosine < ${fmt(t.effect_cosine)}`),
      el("td", {class: "note", "data-col": "note"}, note));
  });
  return el("table", {id: "drift-sae-table"},
    headRow("SAE", "latents", "input drifted", "output drifted", "noise thresholds (drifted beyond)", ""),
    el("tbody", {}, ...rows));
}

function onDriftSubmit(event) {
  event.preventDefault();
  loadDrift(driftForm());
}

function onDriftPage(step) {
  if (!state.drift) return;
  const {params, report} = state.drift;
  loadDrift(params, Math.max(0, report.offset + step * DRIFT_PAGE));
}

function onDriftClick(event) {
  const row = event.target.closest("tr[data-latent]");
  if (!row || !state.drift) return;
  const item = state.drift.report.latents.find(
    (x) => x.sae === row.dataset.sae && x.latent === Number(row.dataset.latent));
  clearError();
  openDriftLatent(item.sae, item.latent);
}

/** One latent of the report shown: its drift numbers (when it is on the page) and the reference's and
 * the adapted model's dashboards side by side; a missing dashboard is said in place, with a note. */
async function openDriftLatent(sae, latent) {
  const {params, report} = state.drift;
  const item = report.latents.find((x) => x.sae === sae && x.latent === latent) || null;
  const seq = ++state.driftLatentLoads;
  const view = $("drift-latent");
  Object.assign(view.dataset, {state: "loading", sae, index: String(latent)});
  history.replaceState(null, "", driftHash(params, report.offset, {sae, latent}));
  const sides = [{role: "reference", adapter: params.against}, {role: "adapted", adapter: params.adapter}];
  const answers = await Promise.all(sides.map((s) => api(withAdapter(latentPath(sae, latent), s.adapter))
    .then((record) => ({record}), (error) => ({error}))));
  // another latent was opened meanwhile, or another report loaded (its latent view was cleared)
  if (seq !== state.driftLatentLoads || !showing(params)) return;
  const missing = sides.filter((s, i) => answers[i].error && answers[i].error.code === "no_dashboard");
  const serious = answers.find((a) => a.error && a.error.code !== "no_dashboard");
  if (serious) showError(serious.error);
  const label = (s) => (s.adapter ? `adapter ${s.adapter}` : "the base model");
  const shown = sides.filter((s) => !missing.includes(s)).map((s) => s.role);
  const notes = missing.map((s) => el("p", {class: "drift-note", "data-missing": s.role},
    el("strong", {}, `No dashboard of ${sae} through ${label(s)} is served`),
    `: ${shown.length ? `only the ${shown.join(" and ")} page is shown` : "no page to show"}. Make one with `,
    el("code", {}, s.adapter ? "lorasae dashboards --adapter DIR --out DIR" : "lorasae dashboards --out DIR"),
    " and start the server with ", el("code", {}, "--dashboards DIR"), "."));
  view.replaceChildren(
    el("h3", {id: "drift-latent-title"}, `Latent ${latent} of ${sae}`,
       el("small", {}, ` ${label(sides[0])} (reference) vs adapter ${params.adapter} (adapted)`)),
    item ? driftNumbers(item) : el("p", {class: "hint"}, "Not on the listed page: its drift numbers are not shown."),
    ...notes,
    el("div", {class: "latent-sides n2"}, ...answers.map((a, i) => latentSide(sides[i].adapter, a, sides[i].role))));
  view.dataset.missing = missing.map((s) => s.role).join(" ");
  view.dataset.state = answers.every((a) => a.error) ? "error" : "done";
  view.dataset.seq = String(seq);
}

/** A latent's drift: every number of its row (data-value: the raw JSON), its tokens, its evidence. */
function driftNumbers(x) {
  // counts as integers, statistics with fmt(); two values: reference -> adapted
  const show = (name, label, text, values) => [
    el("dt", {}, label),
    el("dd", {class: `drift-${name}`, "data-value": values.map(raw).join(" ")},
       values.map(text).join(" \u2192 "))];
  const stat = (name, label, ...values) => show(name, label, fmt, values);
  const count = (name, label, ...values) => show(name, label, String, values);
  const tokens = (name, label) => [
    el("dt", {}, label),
    el("dd", {class: `drift-${name} tokens`},
       ...[`${name}_reference`, `${name}_adapted`].map((key, i) => el("span", {class: "pieces", "data-which": key},
         i ? "\u2192 " : "", ...x[key].map((t) => el("span", {class: "piece", "data-id": t.id}, t.text)))))];
  return el("div", {class: "drift-numbers", "data-sae": x.sae, "data-latent": x.latent},
    el("dl", {class: "stats"},
       ...count("rank", "rank", x.rank),
       ...stat("score", "score (largest statistic / its threshold)", x.score),
       ...count("fired", "fired (reference \u2192 adapted)", x.fired_reference, x.fired_adapted),
       ...stat("density", "density", x.density_reference, x.density_adapted),
       ...stat("density_log_ratio", "|ln density ratio|", x.density_log_ratio),
       ...stat("pearson", "Pearson (same tokens)", x.pearson),
       ...stat("top_jaccard", "top contexts shared (Jaccard)", x.top_jaccard),
       ...stat("hist_js", "histogram JS divergence", x.hist_js),
       ...count("effect_contexts", "effect contexts", x.effect_contexts),
       ...stat("effect_cosine", "effect cosine", x.effect_cosine),
       ...stat("effect_norm_ratio", "effect norm ratio", x.effect_norm_ratio),
       ...stat("promoted_overlap", "promoted tokens shared", x.promoted_overlap),
       ...tokens("promoted", "promotes"),
       ...tokens("suppressed", "suppresses")),
    el("p", {class: "evidence"}, el("strong", {}, x.sides.length ? `drifted: ${x.sides.join(" and ")}. ` : "within noise. "),
       x.evidence));
}

/** Open the drift view the URL hash names, if it names one. */
async function route() {
  if (location.hash.startsWith("#steer?")) {
    const q = new URLSearchParams(location.hash.slice("#steer?".length));
    openSteering(q.get("sae") || "", Number(q.get("latent")) || 0, q.get("adapter") || null);
    return;
  }
  if (!location.hash.startsWith("#drift?")) return;
  const q = new URLSearchParams(location.hash.slice("#drift?".length));
  const params = {adapter: q.get("adapter") || "", against: q.get("against") || null, sae: q.get("sae") || null,
                  side: q.get("side") || "any"};
  const pick = (id, value) => {
    if ([...$(id).options].some((o) => o.value === value)) $(id).value = value;
  };
  pick("drift-adapter", params.adapter);
  pick("drift-against", params.against || "");
  pick("drift-sae", params.sae || "");
  pick("drift-side", params.side);
  const latent = q.get("latent");
  const shown = await loadDrift(params, Number(q.get("offset")) || 0);
  $("drift").scrollIntoView({block: "start"});
  if (shown && latent !== null && q.get("latent_sae")) openDriftLatent(q.get("latent_sae"), Number(latent));
}

// ------------------------------------------------------------------ steering

/** A "steer" button: opens the steering panel with this latent (and the adapter, when one is given). */
function steerButton(sae, index, adapter, id = null) {
  return el("button", {type: "button", class: "steer", id, "data-sae": sae, "data-index": index,
                       "data-adapter": adapter || "", title: `generate with latent ${index} of ${sae} steered`},
            "steer");
}

/** A click on a steer button (in the token panel or a latent view); true when it was one. */
function onSteerClick(event) {
  const button = event.target.closest("button.steer");
  if (!button) return false;
  event.stopPropagation();
  openSteering(button.dataset.sae, Number(button.dataset.index), button.dataset.adapter || null);
  return true;
}

function fillSteerAdapters() {
  const current = $("steer-adapter").value;
  const ready = state.adapters.filter((a) => a.status === "ready").map((a) => a.name);
  $("steer-adapter").replaceChildren(el("option", {value: ""}, "none (base model)"),
                                     ...ready.map((name) => el("option", {value: name}, name)));
  if (ready.includes(current)) $("steer-adapter").value = current;
}

/** Fill the steering form with latent `index` of `sae` (and `adapter`), show it, and name it in the URL. */
function openSteering(sae, index, adapter) {
  const pick = (id, value) => {
    if ([...$(id).options].some((o) => o.value === value)) $(id).value = value;
  };
  pick("steer-sae", sae);
  pick("steer-adapter", adapter || "");
  $("steer-latent").value = String(index);
  const q = new URLSearchParams({sae, latent: String(index)});
  if (adapter) q.set("adapter", adapter);
  history.replaceState(null, "", `#steer?${q}`);
  $("steering").scrollIntoView({block: "start"});
  $("steer-value").focus();
}

/** An <input type=number> as a number, or null when empty (the server reports what is invalid). */
function numberValue(id) {
  const text = $(id).value.trim();
  return text === "" || !Number.isFinite(Number(text)) ? null : Number(text);
}

/** The request the form describes: one intervention, both continuations (compare), streamed. */
function steerBody() {
  const adapter = $("steer-adapter").value || null;
  const sae = $("steer-sae").value;
  return {
    prompt: $("steer-prompt").value, adapter, saes: spliceFor(adapter, sae),
    max_new_tokens: intValue("steer-max"), temperature: numberValue("steer-temperature"),
    seed: intValue("steer-seed"), stream: true, compare: true,
    interventions: [{sae, latent: intValue("steer-latent"), op: $("steer-op").value,
                     value: numberValue("steer-value"), positions: $("steer-positions").value}],
  };
}

/** Server-Sent Events from a fetch body as it arrives: {event, data} per blank-line-terminated event
 * (data lines joined with "\n", ":" comment lines and other fields skipped, "\r\n" / "\r" / "\n"
 * line ends). An event the stream ends inside is incomplete: dropped. */
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let kind = "";
  let data = [];
  const lineEnd = /\r\n|\n|\r(?=[^\n])/;  // a "\r" at the end of the buffer may be half of "\r\n"
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value;
      for (let m = lineEnd.exec(buffer); m !== null; m = lineEnd.exec(buffer)) {
        const line = buffer.slice(0, m.index);
        buffer = buffer.slice(m.index + m[0].length);
        if (line === "") {
          if (data.length) yield {event: kind || "message", data: data.join("\n")};
          kind = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        let field = colon < 0 ? "" : line.slice(colon + 1);
        if (field.startsWith(" ")) field = field.slice(1);
        if (name === "event") kind = field;
        else if (name === "data") data.push(field);
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // left early (Stop, an error event): close the body
  }
}

const steerCols = () => ({unsteered: $("steer-output").querySelector('[data-variant="unsteered"]'),
                          steered: $("steer-output").querySelector('[data-variant="steered"]')});

function clearSteerOutput() {
  for (const col of Object.values(steerCols())) {
    col.querySelector(".steer-text").replaceChildren();
    const finish = col.querySelector(".finish");
    finish.textContent = "";
    delete finish.dataset.reason;
  }
  const steered = steerCols().steered;
  steered.querySelector(".kl-strip").replaceChildren();
  steered.querySelector(".kl-info").textContent = "";
}

/** One streamed token into its column; on the steered one, its KL (token colour + a bar). */
function addSteerToken(event) {
  const col = steerCols()[event.variant === "steered" ? "steered" : "unsteered"];
  const span = el("span", {class: "gtok", "data-index": event.index, "data-id": event.id, "data-kl": raw(event.kl),
                           title: `step ${event.index} \u00b7 id ${event.id}`
                                  + (event.kl === null || event.kl === undefined ? "" : ` \u00b7 KL ${fmt(event.kl)}`)},
                  event.text);
  col.querySelector(".steer-text").append(span);
  if (event.kl !== null && event.kl !== undefined) {
    col.querySelector(".kl-strip").append(el("span", {class: "klbar", "data-index": event.index,
                                                      "data-value": raw(event.kl),
                                                      title: `step ${event.index}: KL ${fmt(event.kl)} nats`}));
    scaleKl();
  }
}

/** Bars and token colours relative to the largest KL so far. */
function scaleKl() {
  const steered = steerCols().steered;
  const values = [...steered.querySelectorAll(".klbar")].map((b) => Number(b.dataset.value));
  const top = Math.max(0, ...values);
  for (const bar of steered.querySelectorAll(".klbar")) {
    bar.style.height = `${top > 0 ? Math.max(2, (100 * Number(bar.dataset.value)) / top).toFixed(1) : 2}%`;
  }
  for (const tok of steered.querySelectorAll(".gtok[data-kl]")) {
    if (tok.dataset.kl === "" || top <= 0) continue;
    tok.style.backgroundColor = `rgba(37, 99, 235, ${(0.05 + 0.5 * Number(tok.dataset.kl) / top).toFixed(3)})`;
  }
  const info = steered.querySelector(".kl-info");
  info.dataset.max = String(top);
  info.textContent = `KL per step (nats), steered vs unsteered model on the steered text: max ${fmt(top)}`;
}

/** The final answer: finish reasons, and the mean KL over the steps. */
function finishSteering(answer) {
  const cols = steerCols();
  for (const g of answer.generations) {
    const col = cols[g.variant === "steered" ? "steered" : "unsteered"];
    const finish = col.querySelector(".finish");
    finish.dataset.reason = g.finish_reason;
    finish.textContent = `\u00b7 ${g.tokens.length} tokens, finished: ${g.finish_reason}`;
    if (g.kl && g.kl.length) {
      const info = col.querySelector(".kl-info");
      info.dataset.mean = String(mean(g.kl));
      info.textContent = `KL per step (nats), steered vs unsteered model on the steered text: `
        + `mean ${fmt(mean(g.kl))}, max ${fmt(Math.max(...g.kl))}`;
    }
  }
  const u = answer.usage;
  $("steer-info").textContent = `${u.generated_tokens} tokens in ${u.steps} steps, ${u.seconds.toFixed(2)} s `
    + `(${u.tokens_per_second.toFixed(1)} tokens/s) \u00b7 spliced: ${answer.saes.map((s) => s.id).join(", ")}`;
}

/** Generate: stream the unsteered and steered continuations into the two columns. */
async function generateSteered(event) {
  event.preventDefault();
  clearError();
  if (state.steer) state.steer.controller.abort();
  const seq = ++state.steerRuns;
  const controller = new AbortController();
  state.steer = {controller, seq};
  const output = $("steer-output");
  clearSteerOutput();
  output.dataset.state = "streaming";
  $("steer-info").textContent = "generating\u2026";
  $("steer-run").disabled = true;
  $("steer-stop").disabled = false;
  let finished = false;
  try {
    let resp;
    try {
      resp = await fetch("v1/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify(steerBody()), signal: controller.signal});
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "network_error", `cannot reach the server (${err.message})`);
    }
    if (!resp.ok) {
      const text = await resp.text();
      let detail = null;
      try {
        detail = JSON.parse(text).error;
      } catch (_) {
        detail = null;
      }
      throw new ApiError(resp.status, detail ? detail.code : "http_error",
                         detail ? detail.message : (text.slice(0, 300) || resp.statusText));
    }
    for await (const {event: kind, data} of sseEvents(resp.body)) {
      if (seq !== state.steerRuns) return;
      if (kind === "token") {
        addSteerToken(JSON.parse(data));
      } else if (kind === "done") {
        finishSteering(JSON.parse(data));
        finished = true;
        break;
      } else if (kind === "error") {
        const detail = JSON.parse(data).error || {};
        throw new ApiError(0, detail.code || "stream_error", detail.message || data);
      }
    }
    if (!finished) throw new ApiError(0, "stream_ended", "the stream ended before the generation did");
    output.dataset.state = "done";
  } catch (err) {
    if (seq !== state.steerRuns) return;
    if (err.name === "AbortError") {
      output.dataset.state = "stopped";
      $("steer-info").textContent = "stopped: the request was aborted, and the server drops the generation";
    } else {
      output.dataset.state = "error";
      $("steer-info").textContent = "";
      showError(err);
    }
  } finally {
    if (seq === state.steerRuns) {
      state.steer = null;
      $("steer-run").disabled = false;
      $("steer-stop").disabled = true;
      output.dataset.run = String(seq);
    }
  }
}

function stopSteering() {
  if (state.steer) state.steer.controller.abort();
}

// ------------------------------------------------------------------ start

async function init() {
  $("controls").addEventListener("submit", run);
  $("adapter").addEventListener("change", onAdapterChange);
  $("adapter").addEventListener("change", onAdapterLatents);
  $("latent").addEventListener("change", onLatentChange);
  $("latent-search").addEventListener("submit", search);
  $("search-results").addEventListener("click", onSearchClick);
  $("latent").addEventListener("input", () => {
    if (!state.run) return;
    clearError();
    renderTokens();
  });
  for (const type of ["mouseover", "focusin", "click"]) $("tokens").addEventListener(type, onTokenEvent);
  $("panel").addEventListener("click", onPanelClick);
  $("drift-controls").addEventListener("submit", onDriftSubmit);
  $("drift-prev").addEventListener("click", () => onDriftPage(-1));
  $("drift-next").addEventListener("click", () => onDriftPage(1));
  $("drift-results").addEventListener("click", onDriftClick);
  $("steer-controls").addEventListener("submit", generateSteered);
  $("steer-stop").addEventListener("click", stopSteering);
  $("latent-view").addEventListener("click", onSteerClick);
  window.addEventListener("hashchange", route);
  try {
    const health = await waitReady();
    state.saes = health.saes;
    fillSaes();
    await loadAdapters();
    const ready = state.adapters.filter((a) => a.status === "ready").length;
    setStatus("ready", `${health.model} \u00b7 ${state.saes.length} SAE(s) \u00b7 ${ready} adapter(s)`);
    $("run").disabled = false;
    $("search-run").disabled = false;
    $("drift-run").disabled = false;
    $("steer-run").disabled = false;
    await route();
  } catch (err) {
    setStatus("error", "not ready");
    showError(err);
  }
}

init();
