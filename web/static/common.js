// Small helpers shared by both dashboards. No framework, nothing loaded from elsewhere.
"use strict";
const $ = (sel, root = document) => root.querySelector(sel);
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k ?? ""));
  return e;
}
async function callApi(method, path, body, token) {
  const headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!r.ok) throw new Error((json && json.error && json.error.message) || r.status + " " + r.statusText);
  return json;
}
function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}
function statusClass(code) { return code ? "s" + String(code)[0] : ""; }
// Server-sent events read with fetch (EventSource cannot send the token): calls onEvent(name)
// for each event, onState(true|false) as the stream opens and drops, and reconnects every 2 s
// while token() gives a token.
async function liveEvents(path, token, onEvent, onState) {
  while (token()) {
    try {
      const r = await fetch(path, { headers: { Authorization: "Bearer " + token() } });
      if (!r.ok || !r.body) throw new Error(r.statusText);
      onState(true);
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const m = /^event: ?(.*)$/m.exec(block);
          if (m) onEvent(m[1]);
        }
      }
    } catch (_) { /* reconnect below */ }
    onState(false);
    await new Promise(res => setTimeout(res, 2000));
  }
}
