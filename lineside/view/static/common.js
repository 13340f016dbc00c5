// Shared by every page: who am I, the header, number formatting. No library, nothing fetched
// from anywhere but this server.
"use strict";

const fmt = {
  int: (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en")),
  pct: (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %"),
  num: (v, d = 4) => (v === null || v === undefined ? "–" : Number(v).toFixed(d)),
  ms: (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(1) + " ms"),
  time: (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString("en-GB") : "–"),
  datetime: (ts) => (ts ? new Date(ts * 1000).toLocaleString("en-GB") : "–"),
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = (body && body.error) || response.status + " " + response.statusText;
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  return body;
}

async function whoAmI() {
  const me = await api("/api/me");
  const who = document.getElementById("who");
  if (who) {
    who.textContent = me.name + " (" + me.role + ")";
    const link = el("a", { href: me.name === "anonymous" ? "/login" : "/logout",
                           text: me.name === "anonymous" ? "log in" : "log out" });
    who.append(link);
  }
  document.body.dataset.role = me.role;
  return me;
}

// Canvas drawn at the device's pixel ratio (sharp on HMI panels), sized by CSS.
function fitCanvas(canvas, height) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  canvas.style.height = height + "px";
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return { ctx, width, height };
}
