// The relay dashboard: agents, tunnels with traffic charts, forwards and tokens.
"use strict";
const KEY = "warren-admin-token";
const token = () => sessionStorage.getItem(KEY);
const call = (m, p, b) => callApi(m, p, b, token());

function chart(points) {
  const w = 240, h = 40, svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`); svg.setAttribute("class", "chart"); svg.setAttribute("role", "img");
  const total = points.map(p => p.bytes_in + p.bytes_out), max = Math.max(1, ...total);
  svg.setAttribute("aria-label", points.length + " samples, peak " + bytes(max));
  const step = points.length > 1 ? w / (points.length - 1) : w;
  const d = total.map((v, i) => (i ? "L" : "M") + (i * step).toFixed(1) + " " + (h - (v / max) * (h - 4)).toFixed(1)).join(" ");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", d || "M0 " + h); path.setAttribute("fill", "none"); path.setAttribute("stroke", "#1f6feb"); path.setAttribute("stroke-width", "1.5");
  svg.append(path);
  return svg;
}

async function refresh() {
  const [agents, tunnels, forwards, tokens, stats] = await Promise.all([
    call("GET", "/api/v1/agents"), call("GET", "/api/v1/tunnels"), call("GET", "/api/v1/forwards"),
    call("GET", "/api/v1/tokens"), call("GET", "/api/v1/stats?since=" + (Math.floor(Date.now() / 1000) - 3600))]);
  $("#agents tbody").replaceChildren(...agents.agents.map(a => el("tr", {},
    el("td", {}, a.agent_id), el("td", {}, a.addr), el("td", {}, a.transport), el("td", {}, a.connected_since), el("td", {}, String(a.tunnels)),
    el("td", {}, el("button", { class: "plain", type: "button", onclick: async () => { await call("DELETE", "/api/v1/agents/" + a.id); refresh(); } }, "Disconnect")))));
  const series = Object.fromEntries(stats.tunnels.map(t => [t.tunnel, t.points]));
  const p = tunnels.pool;
  $("#pool").textContent = tunnels.tunnels.length + " tunnels · port pool " + p.range + ": " +
    p.tcp_leased + " of " + p.size + " TCP ports and " + p.udp_leased + " of " + p.size + " UDP ports leased";
  $("#tunnels tbody").replaceChildren(...tunnels.tunnels.map(t => el("tr", {},
    el("td", {}, t.name, el("div", { class: "muted" }, t.agent_id + " · " + t.protocol)),
    el("td", {}, el("code", {}, t.url)), el("td", { class: t.status === "online" ? "s2" : "s5" }, t.status),
    el("td", {}, bytes(t.bytes_in)), el("td", {}, bytes(t.bytes_out)), el("td", {}, String(t.connections_open)),
    el("td", {}, chart(series[t.id] || [])))));
  $("#forwards tbody").replaceChildren(...forwards.forwards.map(f => el("tr", {},
    el("td", {}, f.id), el("td", {}, f.agent), el("td", {}, f.proto), el("td", {}, f.target), el("td", {}, f.url || "(agent offline)"),
    el("td", {}, el("button", { class: "plain", type: "button", onclick: async () => { await call("DELETE", "/api/v1/forwards/" + f.id); refresh(); } }, "Delete")))));
  $("#tokens tbody").replaceChildren(...tokens.tokens.map(t => el("tr", {},
    el("td", {}, t.id), el("td", {}, t.name), el("td", {}, t.created_at),
    el("td", {}, (t.max_tunnels ? t.max_tunnels + " tunnels " : "") + (t.max_connections ? t.max_connections + " connections" : "") || "none"),
    el("td", {}, t.revoked_at ? el("span", { class: "muted" }, "revoked") : el("button", { class: "plain", type: "button", onclick: async () => { await call("DELETE", "/api/v1/tokens/" + t.id); refresh(); } }, "Revoke")))));
}

function enter() {
  $("#login").classList.add("hidden"); $("#app").classList.remove("hidden"); $("#logout").classList.remove("hidden");
  $("#who").textContent = "admin";
  refresh().catch(e => { $("#who").textContent = e.message; });
}

$("#login-form").addEventListener("submit", async e => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("#token").value.trim());
  try { await call("GET", "/api/v1/tokens"); enter(); }
  catch (err) { sessionStorage.removeItem(KEY); $("#login-error").textContent = err.message; }
});
$("#logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); location.reload(); });
$("#forward-form").addEventListener("submit", async e => {
  e.preventDefault();
  const body = { agent: $("#f-agent").value.trim(), proto: $("#f-proto").value, target: $("#f-target").value.trim() };
  if ($("#f-sub").value.trim()) body.subdomain = $("#f-sub").value.trim();
  try { const f = await call("POST", "/api/v1/forwards", body); $("#forward-result").textContent = "Forward " + f.id + " at " + f.url; }
  catch (err) { $("#forward-result").textContent = err.message; }
  refresh();
});
$("#token-form").addEventListener("submit", async e => {
  e.preventDefault();
  const body = { name: $("#t-name").value.trim() };
  if ($("#t-tunnels").value) body.max_tunnels = Number($("#t-tunnels").value);
  try { const t = await call("POST", "/api/v1/tokens", body); $("#token-result").replaceChildren("New token (shown once): ", el("code", {}, t.token)); }
  catch (err) { $("#token-result").textContent = err.message; }
  refresh();
});

// Live: server-sent events reload what changed; traffic counters are also refreshed every few
// seconds.
function live() {
  return liveEvents("/api/v1/events", token, () => refresh().catch(() => {}),
    up => { $("#who").textContent = up ? "admin · live" : "admin · reconnecting…"; });
}

if (token()) { enter(); live(); }
$("#login-form").addEventListener("submit", () => setTimeout(() => { if (token()) live(); }, 500));
setInterval(() => { if (token()) refresh().catch(() => {}); }, 5000);
