// The live page: one server-sent event stream of snapshots (a few per second, whatever the
// line's rate); each camera's picture is fetched only when a newer one exists and the last
// one has finished loading, so a slow screen shows fewer pictures instead of falling behind.
"use strict";

const cards = new Map(); // camera id -> {root, img, shown, loading, ...}

function cameraCard(id) {
  if (cards.has(id)) return cards.get(id);
  const img = el("img", { alt: "latest overlay of " + id });
  const badge = el("span", { class: "badge none", text: "–" });
  const fill = el("div", { class: "fill" });
  const mark = el("div", { class: "mark" });
  const score = el("div", { class: "score" });
  const counts = el("div", { class: "counts muted" });
  const health = el("div", { class: "health" });
  const caption = el("div", { class: "muted caption" });
  const root = el("div", { class: "panel camera", "data-camera": id },
    el("div", { class: "head" }, el("span", { class: "name", text: id }), badge),
    img, caption, el("div", { class: "scorebar" }, fill, mark), score, counts, health);
  document.getElementById("cameras").append(root);
  const card = { root, img, badge, fill, mark, score, counts, health, caption, shown: 0, loading: false };
  img.addEventListener("load", () => { card.loading = false; });
  img.addEventListener("error", () => { card.loading = false; });
  cards.set(id, card);
  return card;
}

function renderCamera(id, cam, health) {
  const card = cameraCard(id);
  const last = cam.last || {};
  const decision = last.decision || "none";
  card.badge.className = "badge " + decision;
  card.badge.textContent = decision === "none" ? "–" : decision;
  card.root.dataset.decision = decision;
  const thr = last.threshold;
  const sc = last.score;
  // The bar spans 0 .. 2 x threshold: the threshold mark sits in the middle.
  const top = thr ? Math.max(2 * thr, sc || 0) : 1;
  card.fill.style.width = sc === null || sc === undefined ? "0" : Math.min(100, (100 * sc) / top) + "%";
  card.fill.style.background = decision === "reject" ? "var(--reject)" : "var(--accept)";
  card.mark.style.left = thr ? Math.min(100, (100 * thr) / top) + "%" : "0";
  card.score.textContent = "score " + fmt.num(sc) + (sc >= thr ? " ≥ " : " < ") + "threshold " + fmt.num(thr) +
    "  ·  frame #" + (last.frame_id ?? "–") + (last.error ? "  ·  " + last.error : "");
  card.counts.textContent = fmt.int(cam.parts) + " parts, " + fmt.int(cam.rejects) + " rejects";
  const h = health || {};
  card.health.replaceChildren(
    el("span", { class: "state-" + (h.state || "unknown"), text: h.state || "no stats" }),
    " · " + (h.fps === undefined || h.fps === null ? "–" : h.fps.toFixed(1)) + " fps · last decision " +
    (cam.last_age_s === null || cam.last_age_s === undefined ? "–" : cam.last_age_s.toFixed(1) + " s ago") +
    (h.frame_age_s !== null && h.frame_age_s !== undefined ? " · last frame " + h.frame_age_s.toFixed(1) + " s ago" : "") +
    (h.dropped ? " · " + fmt.int(h.dropped) + " dropped" : ""));
  const over = cam.overlay;
  if (over && over.version !== card.shown && !card.loading) {
    card.loading = true;
    card.shown = over.version;
    card.img.src = "/api/live/overlay/" + encodeURIComponent(id) + "?v=" + over.version;
    card.caption.textContent = "picture: frame #" + over.frame_id + " " + (over.decision || "") + " at " + fmt.time(over.capture_ts);
  }
}

function drawChart(chart) {
  const canvas = document.getElementById("chart");
  const { ctx, width, height } = fitCanvas(canvas, 160);
  const buckets = chart.buckets;
  const pad = { l: 40, r: 8, t: 8, b: 20 };
  const w = width - pad.l - pad.r, h = height - pad.t - pad.b;
  const rates = buckets.map((b) => (b[1] ? b[2] / b[1] : null));
  const max = Math.min(1, Math.max(0.05, ...rates.filter((r) => r !== null)) * 1.1);
  ctx.clearRect(0, 0, width, height);
  ctx.strokeStyle = "#2a3540"; ctx.fillStyle = "#8b98a5"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + h - (h * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(pad.l + w, y); ctx.stroke();
    ctx.fillText(((100 * max * i) / 4).toFixed(0) + "%", 4, y + 4);
  }
  const bw = w / Math.max(1, buckets.length);
  rates.forEach((r, i) => {
    if (r === null) return;
    const bh = (h * r) / max;
    ctx.fillStyle = r > 0 ? "#f85149" : "#2ea043";
    ctx.fillRect(pad.l + i * bw + 1, pad.t + h - Math.max(bh, 1), Math.max(1, bw - 2), Math.max(bh, 1));
  });
  if (buckets.length) {
    ctx.fillStyle = "#8b98a5";
    ctx.fillText(fmt.time(buckets[0][0]), pad.l, height - 4);
    const end = fmt.time(buckets[buckets.length - 1][0] + chart.width_s);
    ctx.fillText(end, pad.l + w - ctx.measureText(end).width, height - 4);
  }
  const span = buckets.length * chart.width_s;
  document.getElementById("chart-span").textContent =
    "(last " + (span >= 120 ? Math.round(span / 60) + " min" : Math.round(span) + " s") +
    ", " + Math.round(chart.width_s) + " s per bar)";
}

function banner(s) {
  const b = document.getElementById("banner");
  let text = "", kind = "";
  if (s.bus_error) { text = "Bus: " + s.bus_error; kind = "quiet"; }
  else if (s.quiet) {
    text = s.quiet_s === null ? "No message from the bus yet: is the runtime running and publishing there?"
      : "The bus is quiet: no message for " + Math.round(s.quiet_s) + " s (runtime stopped or unreachable?)";
    kind = "quiet";
  } else if (s.paused) { text = "The runtime is PAUSED: no part is being inspected"; kind = "paused"; }
  b.className = "banner" + (text ? " show " + kind : "");
  b.textContent = text;
  b.dataset.state = text ? kind : "ok";
}

function render(s) {
  banner(s);
  document.getElementById("parts").textContent = fmt.int(s.parts);
  document.getElementById("rejects").textContent = fmt.int(s.rejects);
  document.getElementById("rate").textContent = "reject rate " + fmt.pct(s.reject_rate);
  document.getElementById("since").textContent = "since " + fmt.time(s.since);
  document.getElementById("hour-parts").textContent = fmt.int(s.hour.parts);
  document.getElementById("hour-rejects").textContent = fmt.int(s.hour.rejects);
  document.getElementById("hour-rate").textContent = "reject rate " + fmt.pct(s.hour.reject_rate);
  document.getElementById("latency").textContent =
    s.latency_ms.p50 === null || s.latency_ms.p50 === undefined ? "–" : fmt.num(s.latency_ms.p50, 1) + " / " + fmt.num(s.latency_ms.p99, 1);
  document.getElementById("threshold").textContent = fmt.num(s.threshold);
  document.getElementById("model").textContent = "model " + (s.model_id || "–");
  const rt = s.runtime || {};
  document.getElementById("runtime-state").textContent = s.paused ? "paused" : (rt.state || "–");
  document.getElementById("runtime-fps").textContent = rt.fps === undefined || rt.fps === null ? "" : rt.fps.toFixed(1) + " img/s, " + fmt.int(rt.frames) + " frames since its start";
  const missed = Object.values(s.missed || {}).reduce((a, b) => a + b, 0);
  document.getElementById("missed").textContent = fmt.int(missed);
  document.getElementById("errors").textContent = (s.errors ? fmt.int(s.errors) + " error decisions" : "") + (s.restarts ? " · runtime restarted " + s.restarts + "×" : "");
  const ids = new Set([...Object.keys(s.cameras), ...Object.keys(s.health)]);
  for (const id of [...ids].sort()) renderCamera(id, s.cameras[id] || { parts: 0, rejects: 0 }, s.health[id]);
  document.getElementById("waiting").hidden = s.parts > 0;
  drawChart(s.chart);
  document.body.dataset.parts = s.parts;  // for scripts and tests: the numbers as received
  document.body.dataset.rejects = s.rejects;
}

function connect() {
  const source = new EventSource("/api/live/stream");
  source.onmessage = (e) => render(JSON.parse(e.data));
  source.onerror = () => {
    const b = document.getElementById("banner");
    b.className = "banner show quiet";
    b.textContent = "Lost the connection to linegate view; reconnecting…";
    b.dataset.state = "disconnected";
  };
}

document.addEventListener("DOMContentLoaded", () => {
  whoAmI().catch(() => { window.location = "/login"; });
  connect();
});
