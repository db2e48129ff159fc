// Live activity without reloading: polls /api/activity (same origin, session cookie) every 1.5 s.
"use strict";
function cell(text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  return td;
}
function fill(id, tasks, fields) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...tasks.map((task) => {
    const tr = document.createElement("tr");
    tr.className = task.state;
    fields.forEach((field) => tr.appendChild(cell(task[field])));
    return tr;
  }));
}
async function refresh() {
  try {
    const response = await fetch("/api/activity", {credentials: "same-origin"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    document.getElementById("pod-state").textContent =
      `pod ${data.pod_running ? "running" : "not running"} · ${data.running.length} task(s) running · updated ${new Date().toLocaleTimeString()}`;
    fill("running", data.running, ["task", "requester", "dataset", "kind", "received"]);
    fill("recent", data.recent, ["task", "requester", "dataset", "kind", "state", "received", "details"]);
  } catch (error) {
    document.getElementById("pod-state").textContent = `cannot reach the page's server: ${error.message}`;
  }
}
refresh();
setInterval(refresh, 1500);
