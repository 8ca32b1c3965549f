// cinemae review page: plain JS, no build step, no third-party code. It uses the same API as any client
// (POST /v1/detect?explain=1) with the token in an Authorization header, kept in sessionStorage only.
// Everything a file says about itself is hostile input: it is only ever put in the page as text.
"use strict";

const TOKEN_KEY = "cinemae-token";
const INFERNO = [[0, [0, 0, 4]], [0.2, [66, 10, 104]], [0.4, [147, 38, 103]], [0.6, [221, 81, 58]],
                 [0.8, [252, 165, 10]], [1, [252, 255, 164]]];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function colour(u) {
  u = Math.min(1, Math.max(0, u));
  for (let i = 1; i < INFERNO.length; i++) {
    const [t1, c1] = INFERNO[i], [t0, c0] = INFERNO[i - 1];
    if (u <= t1) {
      const f = (u - t0) / (t1 - t0);
      return c0.map((v, j) => Math.round(v + f * (c1[j] - v)));
    }
  }
  return INFERNO[INFERNO.length - 1][1];
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function fmt(x, d = 4) { return (x === null || x === undefined) ? "—" : Number(x).toFixed(d); }

// the heatmap over the image: each patch box (original-image pixels) filled with its colour
function drawMap(canvas, img, heat, show) {
  const m = Math.max(img.naturalWidth, img.naturalHeight);
  const s = m > 480 ? 480 / m : Math.max(1, Math.floor(320 / m));  // small images enlarged, pixels kept
  canvas.width = Math.round(img.naturalWidth * s);
  canvas.height = Math.round(img.naturalHeight * s);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = s < 1;
  ctx.filter = heat && show ? "grayscale(1)" : "none";  // under the map, the map's colours carry meaning
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  ctx.filter = "none";
  if (!heat || !show) return;
  const fx = canvas.width / heat.image[0], fy = canvas.height / heat.image[1];
  const [lo, hi] = heat.range || [0, 1];
  const g = heat.grid[1];
  const thr = heat.kind === "tiles" ? heat.threshold_logit : null;  // a tile map: outline the cells at or above it
  const above = [];
  const strokeBox = b => ctx.strokeRect(b[0] * fx, b[1] * fy, (b[2] - b[0]) * fx, (b[3] - b[1]) * fy);
  ctx.save();
  heat.boxes.forEach((b, i) => {
    const v = heat.values[Math.floor(i / g)][i % g];
    if (v !== null && thr !== null && thr !== undefined && v >= thr) above.push(b);
    const x = b[0] * fx, y = b[1] * fy, w = (b[2] - b[0]) * fx, h = (b[3] - b[1]) * fy;
    if (v === null) {  // never masked: hatched, not coloured
      ctx.strokeStyle = "rgba(200,200,200,0.8)";
      ctx.beginPath(); ctx.moveTo(x, y); ctx.lineTo(x + w, y + h); ctx.moveTo(x + w, y); ctx.lineTo(x, y + h); ctx.stroke();
      return;
    }
    const c = colour(hi > lo ? (v - lo) / (hi - lo) : 0);
    ctx.fillStyle = `rgba(${c[0]},${c[1]},${c[2]},0.6)`;
    ctx.fillRect(x, y, w, h);
  });
  ctx.strokeStyle = "white";
  above.forEach(strokeBox);
  ctx.strokeStyle = "cyan";
  for (const hot of (heat.hottest || []).slice(0, 3)) strokeBox(hot.box);
  ctx.restore();
}

function provenanceList(p) {
  const ul = el("ul", {class: "prov"});
  if (!p) { ul.append(el("li", {}, "not read")); return ul; }
  const c = p.c2pa || {};
  if (c.present) {
    const sig = c.signature_valid ? (c.trusted ? "signature valid, signer trusted" : "signature valid, signer not in a trust list")
                                  : "signature NOT valid";
    ul.append(el("li", {class: c.ai && c.signature_valid ? "ai" : ""}, `C2PA manifest: ${c.state || "unreadable"} (${sig})`));
    if (c.claim_generator) ul.append(el("li", {}, `claim generator: ${c.claim_generator}`));
    if (c.signer) ul.append(el("li", {}, `signer: ${c.signer.common_name || "?"} / ${c.signer.issuer || "?"}`));
    for (const a of c.actions || []) {
      ul.append(el("li", {}, `action ${a.action}` + (a.digitalSourceType ? ` — source: ${a.digitalSourceType.split("/").pop()}` : "")
                       + (a.softwareAgent ? ` — by ${a.softwareAgent}` : "")));
    }
    for (const f of c.failures || []) ul.append(el("li", {class: "muted"}, `C2PA: ${f.code}`));
    if (c.error) ul.append(el("li", {}, `C2PA problem: ${c.error}`));
  } else {
    ul.append(el("li", {class: "muted"}, "no C2PA manifest"));
  }
  const dst = (p.xmp || {}).digital_source_type || [];
  for (const d of dst) ul.append(el("li", {class: /trainedAlgorithmicMedia/.test(d) ? "ai" : ""}, `IPTC DigitalSourceType: ${d.split("/").pop()}`));
  if ((p.xmp || {}).creator_tool) ul.append(el("li", {}, `XMP CreatorTool: ${p.xmp.creator_tool}`));
  for (const [k, v] of Object.entries(p.exif || {})) {
    if (k !== "UserComment") ul.append(el("li", {}, `EXIF ${k}: ${v}`));
  }
  if (p.generator) {
    ul.append(el("li", {class: "ai"}, `generator parameters (${p.generator.tool.join(", ")}: ${p.generator.keys.join(", ")})`));
    ul.append(el("li", {}, el("pre", {}, p.generator.parameters)));
  }
  for (const c2 of p.comments || []) ul.append(el("li", {}, `JPEG comment: ${c2}`));
  for (const e of p.errors || []) ul.append(el("li", {class: "muted"}, `metadata problem: ${e}`));
  if (p.unavailable) ul.append(el("li", {class: "muted"}, p.unavailable));
  return ul;
}

function card(file, rec, url) {
  const ok = !rec.error;
  const v = ok ? rec.verdict : "error";
  const head = el("div", {},
    el("span", {class: `verdict ${v}`, "data-testid": "verdict"}, v),
    ok && rec.reason === "provenance" ? el("span", {"data-testid": "reason"}, " by provenance (pixels alone: " + rec.pixel_verdict + ")") : null);
  const body = el("div", {class: "row"});
  if (ok) {
    const stats = rec.stats || [];
    body.append(el("table", {"data-testid": "scores"},
      el("tr", {}, el("th", {}, "p(AI)"), el("td", {"data-testid": "score"}, fmt(rec.score))),
      el("tr", {}, el("th", {}, "threshold"), el("td", {}, fmt(rec.model && rec.model.threshold))),
      el("tr", {}, el("th", {}, "s1 variability"), el("td", {}, fmt(stats[0]))),
      el("tr", {}, el("th", {}, "s2 mean anomaly"), el("td", {}, fmt(stats[1]))),
      el("tr", {}, el("th", {}, "s3 sensitivity"), el("td", {}, fmt(stats[2])))));
    if (rec.reship) {  // the re-shipping ensemble: each view's verdict; the answer is uncertain unless all agree
      body.append(el("table", {"data-testid": "views"},
        el("tr", {}, el("th", {}, "view"), el("th", {}, "p(AI)"), el("th", {}, "verdict")),
        ...rec.reship.map(x => el("tr", {}, el("td", {}, x.view), el("td", {}, fmt(x.score)),
                                  el("td", {class: `verdict ${x.verdict}`}, x.verdict)))));
    }
  } else {
    body.append(el("p", {"data-testid": "error"}, `${rec.error_code}: ${rec.error}`));
  }
  const c = el("div", {class: "card", "data-testid": "result"}, el("h2", {}, file.name), head, body);
  const heat = rec.heatmap;
  const canvas = el("canvas", {class: "map", "data-testid": "heatmap"});
  const toggle = el("input", {type: "checkbox", checked: ""});
  const img = new Image();
  img.onload = () => { drawMap(canvas, img, heat, toggle.checked); canvas.dataset.drawn = heat ? "heatmap" : "image"; };
  img.src = url;
  toggle.addEventListener("change", () => drawMap(canvas, img, heat, toggle.checked));
  const side = el("div", {}, canvas);
  if (heat) {
    side.append(el("div", {class: "row muted"}, el("label", {}, toggle, " heatmap"),
      el("span", {}, fmt(heat.range && heat.range[0], 2)), el("span", {class: "legend"}), el("span", {}, fmt(heat.range && heat.range[1], 2)),
      el("span", {}, heat.kind === "tiles"
        ? `crop logit of ${heat.tiles} crops; outlined white: cells at or above the threshold (logit ${fmt(heat.threshold_logit, 2)})`
        : `mean of ${heat.runs} runs, ${Math.round(100 * heat.covered)}% of patches covered`)));
  }
  c.append(el("div", {class: "row"}, side, el("div", {"data-testid": "provenance"}, el("b", {}, "Provenance"), provenanceList(rec.provenance))));
  return c;
}

async function detectFile(file) {
  const status = document.getElementById("status");
  const full = document.getElementById("full").checked;
  const form = new FormData();
  form.append("file", file, file.name);
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  const url = URL.createObjectURL(file);
  let rec;
  try {
    const resp = await fetch("/v1/detect?explain=1" + (full ? "&explain_k=8" : ""), {method: "POST", body: form, headers});
    const body = await resp.json();
    if (body.results && body.results.length) rec = body.results[0];
    else rec = {error: (body.error && body.error.message) || `HTTP ${resp.status}`, error_code: (body.error && body.error.code) || resp.status};
    if (body.model) document.getElementById("model").textContent = `${body.model.id || ""} ${body.model.version || ""}`;
    if (resp.status === 401) status.textContent = "The service refused the token: enter it above.";
  } catch (e) {
    rec = {error: String(e), error_code: "network"};
  }
  document.getElementById("results").prepend(card(file, rec, url));
}

async function handle(files) {
  const status = document.getElementById("status");
  const list = Array.from(files).filter(f => f.type.startsWith("image/") || f.type === "");
  let done = 0;
  status.textContent = `checking ${list.length} image(s)…`;
  for (const f of list) {  // one request each: results appear as they come
    await detectFile(f);
    done++;
    status.textContent = done === list.length ? `${done} image(s) checked` : `checking… ${done}/${list.length}`;
  }
}

window.addEventListener("DOMContentLoaded", () => {
  const input = document.getElementById("token");
  const state = document.getElementById("token-state");
  if (token()) state.textContent = "a token is set for this tab";
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value);
    input.value = "";
    state.textContent = "a token is set for this tab";
  });
  const drop = document.getElementById("drop");
  document.getElementById("files").addEventListener("change", (ev) => handle(ev.target.files));
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); handle(ev.dataTransfer.files); });
});
