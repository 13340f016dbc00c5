// The record's latest rejects as thumbnails; a click shows the full frame, overlay and header.
"use strict";

let shownKey = null;  // the query and row ids on screen
const REFRESH_MS = 10000;  // new rejects appear on their own unless a time window ends in the past

function epoch(input) {
  return input.value ? String(new Date(input.value).getTime() / 1000) : "";
}

async function showDetail(row, tile) {
  document.querySelectorAll(".thumb.selected").forEach((t) => t.classList.remove("selected"));
  tile.classList.add("selected");
  const full = await api("/api/record/decision/" + row.id);
  const detail = document.getElementById("detail");
  detail.classList.add("show");
  detail.dataset.id = row.id;
  document.getElementById("detail-title").textContent =
    full.camera_id + " · frame #" + full.frame_id + " · " + (full.decision || "").toUpperCase() +
    " · score " + fmt.num(full.score) + " (threshold " + fmt.num(full.threshold) + ") · " + fmt.datetime(full.capture_ts);
  const frame = document.getElementById("detail-frame");
  const overlay = document.getElementById("detail-overlay");
  frame.parentElement.hidden = !full.frame_path;
  overlay.parentElement.hidden = !full.overlay_path;
  if (full.frame_path) frame.src = "/api/record/image/" + row.id + "/frame";
  if (full.overlay_path) overlay.src = "/api/record/image/" + row.id + "/overlay";
  document.getElementById("detail-header").textContent = JSON.stringify(full, null, 2);
  detail.scrollIntoView({ block: "nearest" });
}

async function load() {
  const q = new URLSearchParams({ limit: document.getElementById("limit").value });
  const camera = document.getElementById("camera").value.trim();
  if (camera) q.set("camera", camera);
  const since = epoch(document.getElementById("since"));
  const until = epoch(document.getElementById("until"));
  if (since) q.set("since", since);
  if (until) q.set("until", until);
  const error = document.getElementById("error");
  error.hidden = true;
  let data;
  try {
    data = await api("/api/record/rejects?" + q);
  } catch (e) {
    error.textContent = e.message;
    error.hidden = false;
    return;
  }
  const thumbs = document.getElementById("thumbs");
  const key = q.toString() + "|" + data.rows.map((r) => r.id).join(",");
  if (key === shownKey) return;  // nothing new: leave the tiles (and the one selected) alone
  shownKey = key;
  thumbs.replaceChildren();
  for (const row of data.rows) {
    const pic = row.overlay_path ? "overlay" : row.frame_path ? "frame" : null;
    const img = pic ? el("img", { alt: "reject " + row.id, loading: "lazy",
                                  src: "/api/record/image/" + row.id + "/" + pic + "?thumb=1" })
                    : el("div", { class: "muted", text: "(no picture kept)" });
    const tile = el("div", { class: "thumb", "data-id": row.id, "data-camera": row.camera_id, tabindex: "0" }, img,
      el("div", { class: "cap", text: row.camera_id + " #" + row.frame_id + " · " + fmt.num(row.score, 3) + " · " + fmt.time(row.capture_ts) }));
    tile.addEventListener("click", () => showDetail(row, tile));
    thumbs.append(tile);
  }
  document.getElementById("count").textContent = data.rows.length + " reject(s)";
  document.body.dataset.loaded = "1";
}

document.addEventListener("DOMContentLoaded", () => {
  whoAmI().catch(() => { window.location = "/login"; });
  document.getElementById("filters").addEventListener("submit", (e) => { e.preventDefault(); load(); });
  load();
  setInterval(() => {
    if (!document.hidden && !document.getElementById("until").value) load();
  }, REFRESH_MS);
});
