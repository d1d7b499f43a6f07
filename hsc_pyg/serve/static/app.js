// The explorer's page: search, results, and one explanation drawn over its photo. Plain JavaScript, no build step.
// What is drawn is also written into the overlay's data-* attributes (token, level, regions shaded, edges drawn), so
// that a browser test can check the drawing without reading pixels alone.
"use strict";

const $ = (id) => document.getElementById(id);
const HEAT = [255, 127, 14];                       // the pictures' shade colour (#ff7f0e)
const POSITIVE = "#d62728", NEGATIVE = "#1f77b4";  // the pictures' edge colours
let current = null;                                // {explanation, token, relation}

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `status ${response.status}`);
  return body;
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

async function loadInfo() {
  try {
    const info = await getJSON("/api/info");
    $("info").textContent = `${info.data} / ${info.split}: ${info.gallery_size} photos, ${info.captions} captions; ` +
      `first stage over all, the best ${info.shortlist} scored exactly` +
      (info.first_stage_trained ? "" : " (this model's first stage was never trained)");
    $("query").maxLength = info.limits.max_query_chars;
  } catch (e) {
    $("info").textContent = `cannot reach the server: ${e.message}`;
  }
}

async function search(event) {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) return;
  setStatus("searching ...");
  $("results").replaceChildren();
  try {
    const result = await getJSON(`/api/search?q=${encodeURIComponent(q)}&k=${$("k").value}`);
    const unknown = result.unknown_words.length ? `; not in the vocabulary: ${result.unknown_words.join(", ")}` : "";
    setStatus(`${result.results.length} of ${result.gallery_size} photos, ${result.shortlist} scored exactly, ` +
              `${(result.seconds * 1000).toFixed(0)} ms${unknown}. Click a photo to see why it matched.`);
    result.results.forEach((hit, i) => {
      const item = element("li");
      item.dataset.image = hit.id;
      const img = element("img");
      img.src = hit.photo;
      img.alt = hit.id;
      item.append(img, element("div", `#${i + 1}  score ${hit.score.toFixed(4)}`, "meta"),
                  element("div", `${hit.id}  (first stage ${hit.first_stage.toFixed(3)})`, "meta muted"));
      item.addEventListener("click", () => explain(q, hit.id, item));
      $("results").append(item);
    });
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function explain(q, image, item) {
  document.querySelectorAll("#results li").forEach((li) => li.classList.toggle("chosen", li === item));
  $("explanation").hidden = false;
  $("explanation-title").textContent = `explaining ${image} ...`;
  $("explanation-title").className = "";
  const rank = $("per-node").checked ? "per_node" : "global";
  try {
    const e = await getJSON(`/api/explain?q=${encodeURIComponent(q)}&image=${encodeURIComponent(image)}&rank=${rank}`);
    const keep = current && current.explanation.image_id === e.image_id && current.explanation.query === e.query;
    current = keep ? {...current, explanation: e}
                   : {explanation: e, token: e.default_token, relation: e.relations.length ? 0 : -1};
    current.item = item;
    $("explanation-title").textContent = `${e.image_id}: score ${e.score.toFixed(4)}`;
    showTokens();
    showLevels();
    showAlignment();
    showCaptions();
    $("photo").onload = draw;
    if ($("photo").getAttribute("src") === e.photo && $("photo").complete) draw();
    else $("photo").src = e.photo;
  } catch (err) {
    $("explanation-title").textContent = err.message;
    $("explanation-title").className = "error";
  }
}

function showTokens() {
  const e = current.explanation;
  const tokens = e.tokens.map((word, k) => {
    const chip = element("span", word, "chip" + (word === "<unk>" ? " unknown" : ""));
    chip.dataset.position = k;
    chip.classList.toggle("chosen", k === current.token);
    chip.title = `local cosine ${e.alignment[e.attention_level].local[k].toFixed(3)}`;
    chip.addEventListener("click", () => { current.token = k; showTokens(); showAlignment(); draw(); });
    return chip;
  });
  $("tokens").replaceChildren(...tokens);
}

function showLevels() {
  const e = current.explanation;
  const choices = e.relations.map((r, i) => ({label: `${r.level} (layer ${r.layer}/${r.num_layers})`, index: i}));
  choices.push({label: "none", index: -1});
  $("levels").replaceChildren(...choices.map(({label, index}) => {
    const chip = element("span", label, "chip" + (index === current.relation ? " chosen" : ""));
    chip.dataset.relation = index;
    chip.addEventListener("click", () => { current.relation = index; showLevels(); draw(); });
    return chip;
  }));
  if (!e.relations.length && e.relations_missing) $("levels").append(element("span", e.relations_missing, "muted"));
}

function showAlignment() {
  const e = current.explanation;
  const rows = [["level", "score", "global cosine", `local cosine of '${e.tokens[current.token]}'`]];
  for (const level of e.aligned_levels) {
    const a = e.alignment[level];
    rows.push([level, a.score.toFixed(4), a.global.toFixed(3), a.local[current.token].toFixed(3)]);
  }
  $("alignment").replaceChildren(...rows.map((cells, r) => {
    const tr = element("tr");
    cells.forEach((c) => tr.append(element(r ? "td" : "th", c)));
    return tr;
  }));
}

function showCaptions() {
  const e = current.explanation;
  $("captions").replaceChildren(...e.captions.map((c) => {
    const own = c.id === e.image_id ? "  (this photo's own caption)" : "";
    return element("li", `${c.score.toFixed(4)}  ${c.text}${own}`);
  }));
}

// Region r's box (or node position without boxes) in canvas pixels.
function regionGeometry(e, r, width, height, photo) {
  const region = e.regions[r];
  if (e.node_positions !== "box_centres") {   // circular layout: nodes only, on a circle over the photo
    const x = (0.5 + 0.42 * region.x) * width, y = (0.5 - 0.42 * region.y) * height;
    return {cx: x, cy: y, box: null};
  }
  const sx = e.box_units === "normalised" ? width : width / photo.naturalWidth;
  const sy = e.box_units === "normalised" ? height : height / photo.naturalHeight;
  return {cx: region.x * sx, cy: region.y * sy,
          box: [region.x1 * sx, region.y1 * sy, (region.x2 - region.x1) * sx, (region.y2 - region.y1) * sy]};
}

function draw() {
  if (!current) return;
  const e = current.explanation, photo = $("photo"), canvas = $("overlay");
  const width = photo.clientWidth, height = photo.clientHeight;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  const geometry = e.regions.map((_, r) => regionGeometry(e, r, width, height, photo));

  // word -> region attention of the chosen token, as a heat map (opacity relative to its strongest region)
  const attention = e.attention[e.attention_level][current.token];
  const peak = Math.max(...attention);
  let shaded = 0;
  attention.forEach((a, r) => {
    const alpha = peak > 0 ? 0.7 * a / peak : 0;
    if (alpha < 0.02) return;
    shaded += 1;
    ctx.fillStyle = `rgba(${HEAT.join(",")},${alpha.toFixed(3)})`;
    const g = geometry[r];
    if (g.box) ctx.fillRect(...g.box);
    else { ctx.beginPath(); ctx.arc(g.cx, g.cy, 10, 0, 2 * Math.PI); ctx.fill(); }
  });

  // the chosen layer's strongest relations, width growing with |weight| from the weakest drawn to the strongest
  const edges = current.relation >= 0 ? e.relations[current.relation].edges : [];
  const magnitudes = edges.map((x) => Math.abs(x.weight));
  const low = Math.min(...magnitudes), span = Math.max(...magnitudes) - low;
  edges.forEach((x, i) => {
    const s = geometry[x.source], t = geometry[x.target];
    const w = 1 + 4 * (span > 0 ? (magnitudes[i] - low) / span : 1);
    ctx.strokeStyle = ctx.fillStyle = x.weight >= 0 ? POSITIVE : NEGATIVE;
    ctx.lineWidth = w;
    ctx.beginPath(); ctx.moveTo(s.cx, s.cy); ctx.lineTo(t.cx, t.cy); ctx.stroke();
    const angle = Math.atan2(t.cy - s.cy, t.cx - s.cx), head = 6 + w;
    ctx.beginPath();
    ctx.moveTo(t.cx, t.cy);
    ctx.lineTo(t.cx - head * Math.cos(angle - 0.4), t.cy - head * Math.sin(angle - 0.4));
    ctx.lineTo(t.cx - head * Math.cos(angle + 0.4), t.cy - head * Math.sin(angle + 0.4));
    ctx.fill();
  });

  canvas.dataset.token = e.tokens[current.token];
  canvas.dataset.level = current.relation >= 0 ? e.relations[current.relation].level : "none";
  canvas.dataset.shaded = shaded;
  canvas.dataset.edges = edges.length;
  canvas.dataset.ranking = e.ranking;
  const relation = current.relation >= 0 ? e.relations[current.relation] : null;
  $("legend").textContent = `shade: attention of '${e.tokens[current.token]}' over the regions ` +
    `(${e.attention_level} level, relative to its strongest region); ` +
    (relation ? `arrows: ${e.ranking === "per_node" ? `${edges.length} regions' strongest incoming` :
                 `the ${edges.length} strongest`} learned relations of layer ${relation.layer} ` +
                `(${relation.weight_meaning}; red positive, blue negative)` : "no relations drawn");
}

$("search-form").addEventListener("submit", search);
$("per-node").addEventListener("change", () => {
  if (current) explain(current.explanation.query, current.explanation.image_id, current.item);
});
window.addEventListener("resize", draw);
loadInfo();
