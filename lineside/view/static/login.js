"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const q = new URLSearchParams(window.location.search);
  document.getElementById("failed").hidden = !q.get("failed");
  const next = q.get("next");
  if (next && next.startsWith("/") && !next.startsWith("//")) document.getElementById("next").value = next;
});
