// The agent dashboard: tunnels, and the request inspector, live through server-sent events.
// The API token comes from the login URL the agent logs at start (/#token=...): it is kept in
// this tab's session storage and taken out of the address bar at once.
"use strict";
let selected = null;
const KEY = "warren-agent-token";
function takeToken() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!m) return false;
  sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
  history.replaceState(null, "", location.pathname + location.search);
  return true;
}
takeToken();
const token = () => sessionStorage.getItem(KEY);
const api = (m, p, b) => callApi(m, p, b, token());

async function loadTunnels() {
  try {
    const s = await api("GET", "/api/status");
    $("#conn").textContent = s.connected ? "connected to the relay" : (s.relay === false ? "no relay: networks only" : "reconnecting to the relay…");
    const v = await api("GET", "/api/tunnels");
    const body = $("#tunnels tbody");
    body.replaceChildren(...v.tunnels.map(t => el("tr", {},
      el("td", {}, t.name, t.container ? el("div", { class: "muted" }, "container " + t.container) : ""),
      el("td", {}, t.public_url ? el("a", { href: t.public_url }, t.public_url) : el("span", { class: "muted" }, "binding…")),
      el("td", {}, el("code", {}, t.config.addr)),
      el("td", {}, bytes(t.metrics.bytes_in)), el("td", {}, bytes(t.metrics.bytes_out)),
      el("td", {}, String(t.metrics.conns_open)))));
  } catch (e) { $("#conn").textContent = "agent unreachable: " + e.message; }
}

async function loadNetworks() {
  const note = $("#networks-note");
  try {
    const v = await api("GET", "/api/networks");
    note.textContent = v.networks.length ? "" : "No networks yet: warren net create NAME";
    $("#networks tbody").replaceChildren(...v.networks.map(n => el("tr", {},
      el("td", {}, el("strong", {}, n.name), el("div", { class: "muted" }, n.bridge + " · DNS " + n.dns)),
      el("td", {}, el("code", {}, n.subnet), el("div", { class: "muted" }, "gateway " + n.gateway)),
      el("td", {}, ...n.endpoints.map(e => el("div", { class: e.healthy ? "" : "s5" },
        e.name + " ", el("code", {}, e.ip), e.aliases.length ? " (" + e.aliases.join(", ") + ")" : "", e.healthy ? "" : " — down"))),
      el("td", {}, ...n.ports.map(p => el("div", {}, el("code", {}, (p.host_ip || "*") + ":" + p.host_port + "/" + p.proto), " → " + p.endpoint + ":" + p.port))),
      el("td", {}, ...n.services.map(s => el("div", {}, s.name + " ", el("span", { class: "muted" }, s.mode + (s.vip ? " " + s.vip : "") + " → " + s.endpoints.join(", ")))))
    )));
  } catch (e) {
    $("#networks tbody").replaceChildren();
    note.textContent = e.message;
  }
}

function requestRow(r) {
  const status = r.response ? r.response.status_code : (r.error ? "error" : "…");
  const tr = el("tr", { class: "row", tabindex: "0", "data-id": r.id, "aria-label": r.request.method + " " + r.request.uri },
    el("td", {}, r.start.slice(11, 23)),
    el("td", {}, r.request.method),
    el("td", {}, el("code", {}, r.request.uri), r.replay_of ? el("span", { class: "muted" }, " (replay)") : ""),
    el("td", { class: statusClass(r.response && r.response.status_code) }, String(status)));
  const open = () => show(r.id);
  tr.addEventListener("click", open);
  tr.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
  if (r.id === selected) tr.classList.add("selected");
  return tr;
}

async function loadRequests() {
  const v = await api("GET", "/api/requests/http?limit=100");
  $("#requests tbody").replaceChildren(...v.requests.map(requestRow));
}

function headersPre(h) {
  return el("pre", {}, Object.entries(h || {}).map(([k, vs]) => vs.map(v => k + ": " + v).join("\n")).join("\n"));
}
function bodyPre(b) {
  if (!b) return el("pre", {}, "");
  const text = b.text !== undefined ? b.text : "(binary, base64) " + b.base64;
  return el("pre", {}, text + (b.truncated ? "\n… (" + bytes(b.size) + " in all)" : ""));
}

async function show(id) {
  selected = id;
  document.querySelectorAll("#requests tr.row").forEach(tr => tr.classList.toggle("selected", tr.dataset.id === id));
  const r = await api("GET", "/api/requests/http/" + id);
  const d = $("#detail");
  d.classList.remove("muted");
  const method = el("input", { id: "m-method", value: r.request.method, size: "7", "aria-label": "method" });
  const path = el("input", { id: "m-path", value: r.request.uri, "aria-label": "path" });
  const body = el("textarea", { id: "m-body", rows: "3", cols: "30", "aria-label": "body" });
  body.value = r.request.body && r.request.body.text !== undefined ? r.request.body.text : "";
  const result = el("div", { id: "replay-result" });
  const replay = async modify => {
    try {
      const x = await api("POST", "/api/requests/http", modify ? { id, modify } : { id });
      result.replaceChildren(el("p", {}, "Replayed as " + x.id + ": ", el("strong", { class: statusClass(x.response && x.response.status_code) }, x.response ? x.response.status : x.error)), bodyPre(x.response && x.response.body));
    } catch (e) { result.replaceChildren(el("p", { class: "s5" }, e.message)); }
  };
  d.replaceChildren(
    el("p", {}, el("strong", {}, r.request.method + " " + r.request.uri), " ", el("span", { class: "muted" }, r.tunnel_name + " · " + r.start + (r.response ? " · " + (r.response.duration_us / 1000).toFixed(1) + " ms" : ""))),
    el("h3", {}, "Request headers"), headersPre(r.request.headers),
    el("h3", {}, "Request body"), bodyPre(r.request.body),
    el("h3", {}, "Response ", r.response ? el("span", { class: statusClass(r.response.status_code) }, r.response.status) : (r.error || "pending")),
    headersPre(r.response && r.response.headers), bodyPre(r.response && r.response.body),
    el("div", {}, el("button", { type: "button", id: "replay", onclick: () => replay(null) }, "Replay")),
    el("form", { class: "inline", onsubmit: e => { e.preventDefault(); replay({ method: method.value, path: path.value, body: body.value }); } },
      el("label", {}, "Method", method), el("label", {}, "Path", path), el("label", {}, "Body", body),
      el("button", { type: "submit", id: "replay-changed" }, "Replay with changes")),
    result);
}

$("#clear").addEventListener("click", async () => { await api("DELETE", "/api/requests/http"); selected = null; loadRequests(); });

function live() {
  return liveEvents("/api/events", token, name => { if (name === "request") loadRequests().catch(() => {}); },
    up => { $("#live").textContent = up ? "(live)" : "(reconnecting…)"; });
}

let entered = false;
function enter() {
  if (entered) return;
  entered = true;
  $("#login").classList.add("hidden");
  $("#app").classList.remove("hidden");
  loadTunnels(); loadNetworks(); loadRequests().catch(() => {}); live();
}

$("#login-form").addEventListener("submit", async e => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("#token").value.trim());
  try { await api("GET", "/api/status"); enter(); }
  catch (err) { sessionStorage.removeItem(KEY); $("#login-error").textContent = err.message; }
});

if (token()) enter();
// The login URL pasted into a tab that shows the login form already.
window.addEventListener("hashchange", () => { if (takeToken()) enter(); });
setInterval(() => { if (token()) { loadTunnels(); loadNetworks(); } }, 3000);
