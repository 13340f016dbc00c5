// Threshold what-if: the record's recent scores as a histogram with the threshold in force;
// the slider counts, in the browser, how many of those parts the new value would reject
// (rule as in the runtime: reject when score >= threshold). Nothing reaches the line until an
// operator presses Apply, and the server checks the role again.
"use strict";

let scores = [];        // [score, threshold, decision], newest first
let inForce = null;     // threshold in force (control status, else the newest record row)
let me = null;

function wouldReject(value) {
  let n = 0;
  for (const [s, , d] of scores) if (d !== "error" && s !== null && s >= value) n++;
  return n;
}

function drawHistogram(proposed) {
  const canvas = document.getElementById("histogram");
  const { ctx, width, height } = fitCanvas(canvas, 220);
  ctx.clearRect(0, 0, width, height);
  const values = scores.map((r) => r[0]).filter((s) => s !== null);
  if (!values.length) { ctx.fillStyle = "#8b98a5"; ctx.fillText("no scores in the record yet", 20, 30); return; }
  let lo = Math.min(...values, inForce ?? Infinity, proposed ?? Infinity);
  let hi = Math.max(...values, inForce ?? -Infinity, proposed ?? -Infinity);
  if (hi === lo) { hi += 1e-6; lo -= 1e-6; }
  const pad = { l: 36, r: 8, t: 8, b: 20 }, w = width - pad.l - pad.r, h = height - pad.t - pad.b;
  const bins = 50, counts = new Array(bins).fill(0), rej = new Array(bins).fill(0);
  for (const [s, , d] of scores) {
    if (s === null) continue;
    const i = Math.min(bins - 1, Math.floor(((s - lo) / (hi - lo)) * bins));
    counts[i]++; if (d === "reject") rej[i]++;
  }
  const max = Math.max(...counts);
  const x = (v) => pad.l + ((v - lo) / (hi - lo)) * w;
  for (let i = 0; i < bins; i++) {
    const bh = (h * counts[i]) / max, rh = (h * rej[i]) / max, bx = pad.l + (i * w) / bins;
    ctx.fillStyle = "#2ea043"; ctx.fillRect(bx + 1, pad.t + h - bh, w / bins - 2, bh - rh);
    ctx.fillStyle = "#f85149"; ctx.fillRect(bx + 1, pad.t + h - rh, w / bins - 2, rh);
  }
  ctx.fillStyle = "#8b98a5"; ctx.font = "11px sans-serif";
  ctx.fillText(lo.toFixed(3), pad.l, height - 4);
  ctx.fillText(hi.toFixed(3), pad.l + w - 40, height - 4);
  ctx.fillText(String(max), 4, pad.t + 10);
  const line = (v, colour, label) => {
    if (v === null || v === undefined) return;
    ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.setLineDash(label === "new" ? [6, 4] : []);
    ctx.beginPath(); ctx.moveTo(x(v), pad.t); ctx.lineTo(x(v), pad.t + h); ctx.stroke();
    ctx.fillStyle = colour; ctx.fillText(label + " " + v.toFixed(4), Math.min(x(v) + 4, width - 90), pad.t + (label === "new" ? 24 : 12));
  };
  ctx.setLineDash([]);
  line(inForce, "#ffffff", "in force");
  line(proposed, "#58a6ff", "new");
  ctx.setLineDash([]);
}

function update(fromSlider) {
  const slider = document.getElementById("slider"), input = document.getElementById("value");
  if (fromSlider) input.value = Number(slider.value).toFixed(6).replace(/0+$/, "");
  else slider.value = input.value;
  const v = parseFloat(input.value);
  const now = scores.filter((r) => r[2] === "reject").length;
  const text = document.getElementById("whatif");
  if (!Number.isFinite(v)) { text.textContent = "–"; drawHistogram(null); return; }
  const would = wouldReject(v);
  text.replaceChildren("At threshold ", el("b", { id: "whatif-value", text: v.toString() }), ": ",
    el("b", { id: "whatif-count", text: String(would) }), " of ", el("b", { id: "whatif-n", text: String(scores.length) }),
    " recent parts" + (document.getElementById("camera").value.trim() ? " of " + document.getElementById("camera").value.trim() : "") + " would have been rejected (they were: ", el("b", { id: "whatif-now", text: String(now) }),
    ", " + (scores.length ? (100 * now / scores.length).toFixed(1) : "–") + " % → " +
    (scores.length ? (100 * would / scores.length).toFixed(1) : "–") + " %)");
  text.dataset.count = would;
  drawHistogram(v);
}

async function loadScores() {
  const q = new URLSearchParams({ n: document.getElementById("n").value });
  const camera = document.getElementById("camera").value.trim();
  if (camera) q.set("camera", camera);
  try {
    scores = (await api("/api/record/scores?" + q)).scores;
  } catch (e) { say(e.message, false); scores = []; }
  if (inForce === null && scores.length) inForce = scores[0][1];
  const values = scores.map((r) => r[0]).filter((s) => s !== null);
  const slider = document.getElementById("slider");
  if (values.length) {
    const lo = Math.min(...values, inForce ?? Infinity), hi = Math.max(...values, inForce ?? -Infinity);
    slider.min = lo; slider.max = hi; slider.step = (hi - lo) / 1000 || 0.0001;
  }
  const input = document.getElementById("value");
  if (!input.value && inForce !== null) input.value = inForce;
  update(false);
  document.body.dataset.scores = scores.length;
}

async function loadStatus() {
  if (!me.control) return;
  try {
    const status = (await api("/api/control/status")).result;
    inForce = status.threshold;
    document.getElementById("in-force").textContent = "· in force: " + fmt.num(status.threshold) + " · model " + status.model_id + (status.paused ? " · PAUSED" : "");
    const b = document.getElementById("banner");
    b.className = "banner" + (status.paused ? " show paused" : "");
    b.textContent = status.paused ? "The runtime is PAUSED: no part is being inspected" : "";
  } catch (e) { document.getElementById("in-force").textContent = "· control: " + e.message; }
}

async function loadEvents() {
  let events = [];
  try { events = (await api("/api/live/snapshot")).events; } catch (e) { /* shown elsewhere */ }
  if (me.record) {
    try {
      const recorded = (await api("/api/record/events")).events;
      const seen = new Set(events.map((e) => e.seq + "/" + e.publish_ts));
      for (const e of recorded) if (!seen.has(e.seq + "/" + e.publish_ts)) events.push(e);
    } catch (e) { /* the record may not keep events */ }
  }
  events.sort((a, b) => (b.publish_ts || 0) - (a.publish_ts || 0));
  const body = document.getElementById("events");
  body.replaceChildren(...events.slice(0, 20).map((e) => el("tr", {},
    el("td", { text: fmt.datetime(e.publish_ts) }), el("td", { text: e.who ?? "" }),
    el("td", { text: e.what ?? "" }), el("td", { text: JSON.stringify(e.before) ?? "" }),
    el("td", { text: JSON.stringify(e.after) ?? "" }))));
}

function say(text, good) {
  const msg = document.getElementById("msg");
  msg.textContent = text;
  msg.className = "msg " + (good ? "good" : "bad");
}

async function control(cmd, body = {}) {
  try {
    const reply = await api("/api/control/" + cmd, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    say(cmd + ": done", true);
    inForce = reply.result && reply.result.threshold !== undefined ? reply.result.threshold : inForce;
    await loadStatus();
    update(false);
    setTimeout(loadEvents, 500);
  } catch (e) {
    say(e.message, false);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  try { me = await whoAmI(); } catch (e) { window.location = "/login"; return; }
  const operator = me.role === "operator" && me.control;
  for (const id of ["apply", "pause", "resume", "load"]) document.getElementById(id).disabled = !operator;
  document.getElementById("role-note").textContent = !me.control
    ? "No control endpoint: start linegate view with --control ENDPOINT to steer the line from here."
    : operator ? "You are an operator: these buttons change the line." : "Viewers can look; log in as an operator to steer.";
  document.getElementById("slider").addEventListener("input", () => update(true));
  document.getElementById("value").addEventListener("input", () => update(false));
  document.getElementById("n").addEventListener("change", loadScores);
  document.getElementById("camera").addEventListener("change", () => me.record && loadScores());
  document.getElementById("apply").addEventListener("click", () => {
    const value = parseFloat(document.getElementById("value").value);
    const camera = document.getElementById("camera").value.trim() || null;
    control("threshold", { value, camera });
  });
  document.getElementById("pause").addEventListener("click", () => control("pause"));
  document.getElementById("resume").addEventListener("click", () => control("resume"));
  document.getElementById("load").addEventListener("click", () => control("load", { bundle: document.getElementById("bundle").value.trim() }));
  await loadStatus();
  if (me.record) await loadScores();
  else say("No record: start linegate view with --db PATH (the database `linegate record` writes) for the histogram.", false);
  await loadEvents();
  setInterval(loadStatus, 2000);
  setInterval(loadEvents, 5000);
});
