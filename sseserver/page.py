"""The demo page at GET /: watch the live stream, filter it, publish into it. One self-contained document.

Owns: the page's HTML, CSS and JavaScript, and its Content-Security-Policy. No external asset, no CDN: the
inline script and style are allowed by their SHA-256 hashes, computed here from the very bytes served, so the
policy can never drift from the page. Must not know: anything but the public HTTP API (it is a client of it).
"""

import base64
import hashlib

STYLE = """
:root { color-scheme: light dark; --fg: #1d2330; --muted: #6b7385; --bg: #f6f7fb; --card: #fff;
  --line: #e2e5ee; --accent: #3056d3; --ok: #1f9d55; --warn: #c27c0e; --bad: #c53030; }
@media (prefers-color-scheme: dark) { :root { --fg: #e8eaf0; --muted: #9aa2b5; --bg: #12151c; --card: #1b1f29;
  --line: #2b3140; --accent: #7b9bff; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  background: var(--bg); }
header { display: flex; align-items: center; gap: .75rem; flex-wrap: wrap; padding: .8rem 1rem;
  background: var(--card); border-bottom: 1px solid var(--line); position: sticky; top: 0; }
h1 { font-size: 1.05rem; margin: 0; flex: 1; }
#state { font-size: .85rem; padding: .2rem .65rem; border-radius: 999px; color: #fff; background: var(--muted); }
#state.connected { background: var(--ok); } #state.reconnecting { background: var(--warn); }
#state.closed { background: var(--bad); }
main { display: grid; gap: 1rem; padding: 1rem; grid-template-columns: minmax(0, 1fr); max-width: 1100px;
  margin: 0 auto; }
@media (min-width: 820px) { main { grid-template-columns: 320px minmax(0, 1fr); } }
main > div { display: grid; gap: 1rem; align-content: start; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 1rem; }
h2 { font-size: .8rem; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 0 0 .6rem; }
label { display: block; font-size: .85rem; color: var(--muted); margin: .6rem 0 .2rem; }
input, textarea, button { font: inherit; width: 100%; padding: .5rem .6rem; border-radius: 7px;
  border: 1px solid var(--line); background: var(--bg); color: var(--fg); }
textarea { min-height: 5rem; resize: vertical; }
button { margin-top: .7rem; background: var(--accent); color: #fff; border: 0; cursor: pointer; font-weight: 600; }
#result { font-size: .85rem; color: var(--muted); min-height: 1.2em; margin: .5rem 0 0; overflow-wrap: anywhere; }
#events { list-style: none; margin: 0; padding: 0; }
#events li { border-top: 1px solid var(--line); padding: .55rem 0; display: grid; gap: .15rem .6rem;
  grid-template-columns: auto auto 1fr; align-items: baseline; }
#events li:first-child { border-top: 0; }
.id { font: 600 .8rem ui-monospace, monospace; color: var(--accent); }
.name { font-size: .8rem; padding: 0 .45rem; border-radius: 5px; background: var(--bg); border: 1px solid var(--line); }
.name.reset { color: var(--bad); }
.time { font-size: .8rem; color: var(--muted); text-align: right; }
.data { grid-column: 1 / -1; margin: 0; white-space: pre-wrap; overflow-wrap: anywhere;
  font: .9rem ui-monospace, monospace; }
#empty { color: var(--muted); font-size: .9rem; }
"""

SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
const list = $("events"), state = $("state");
let source = null, seen = 0;

function setState(name) { state.textContent = name; state.className = name; }

function show(event) {
  $("empty").hidden = true;
  const item = document.createElement("li");
  item.dataset.id = event.lastEventId;
  item.dataset.name = event.type;
  const cells = [["id", "#" + (event.lastEventId || "-")], ["name", event.type],
                 ["time", new Date().toLocaleTimeString()], ["data", event.data]];
  for (const [cls, text] of cells) {
    const cell = document.createElement(cls === "data" ? "pre" : "span");
    cell.className = cls + (event.type === "sseserver.reset" && cls === "name" ? " reset" : "");
    cell.textContent = text;
    item.append(cell);
  }
  list.prepend(item);
  while (list.children.length > 500) list.lastElementChild.remove();
  seen += 1;
  $("count").textContent = seen + (seen === 1 ? " event" : " events");
}

function listen(name) {
  // EventSource hands a named event only to listeners for that name; "message" means unnamed events.
  if (source && !source.names.has(name)) {
    source.names.add(name);
    source.addEventListener(name, show);
  }
}

function connect() {
  if (source) source.close();
  const params = new URLSearchParams();
  const names = $("filter").value.split(/[\\s,]+/).filter(Boolean);
  names.forEach((name) => params.append("event", name));
  if ($("subtoken").value) params.set("token", $("subtoken").value);
  const query = params.toString();
  source = new EventSource("subscribe" + (query ? "?" + query : ""));
  source.names = new Set();
  setState("reconnecting");
  source.onopen = () => setState("connected");
  source.onerror = () => setState(source.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
  for (const name of ["message", "sseserver.reset"].concat(names)) listen(name);
}

$("filterform").addEventListener("submit", (e) => { e.preventDefault(); connect(); });

$("publish").addEventListener("submit", async (e) => {
  e.preventDefault();
  const name = $("name").value.trim();
  if (name) listen(name);  // before publishing: the event can arrive before the reply does
  const headers = { "Content-Type": "text/plain; charset=utf-8" };
  if ($("pubtoken").value) headers.Authorization = "Bearer " + $("pubtoken").value;
  try {
    const reply = await fetch("publish" + (name ? "?event=" + encodeURIComponent(name) : ""),
                              { method: "POST", headers, body: $("data").value });
    const body = await reply.json();
    $("result").textContent = reply.ok ? "published #" + body.id + " to " + body.subscribers + " subscriber(s)"
                                       : reply.status + ": " + body.error;
  } catch (err) {
    $("result").textContent = "network error: " + err.message;
  }
});

connect();
"""

BODY = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sseserver</title>
<style>{style}</style>
</head>
<body>
<header><h1>sseserver live stream</h1><span id="count">0 events</span><span id="state">connecting</span></header>
<main>
  <div>
    <section>
      <h2>Filter</h2>
      <form id="filterform">
        <label for="filter">Event names to show (blank = unnamed events)</label>
        <input id="filter" placeholder="orders.created, orders.paid" autocomplete="off">
        <label for="subtoken">Subscribe token (optional)</label>
        <input id="subtoken" type="password" autocomplete="off">
        <button type="submit">Reconnect</button>
      </form>
    </section>
    <section>
      <h2>Publish</h2>
      <form id="publish">
        <label for="name">Event name (blank = message)</label>
        <input id="name" placeholder="message" autocomplete="off">
        <label for="data">Data</label>
        <textarea id="data">Hey!</textarea>
        <label for="pubtoken">Publish token (optional)</label>
        <input id="pubtoken" type="password" autocomplete="off">
        <button type="submit">Publish</button>
      </form>
      <p id="result" role="status"></p>
    </section>
  </div>
  <section>
    <h2>Events, newest first</h2>
    <p id="empty">Waiting for events&hellip; publish one with the form or with
      <code>curl -X POST .../publish -d "Hey!"</code></p>
    <ul id="events"></ul>
  </section>
</main>
<script>{script}</script>
</body>
</html>
"""


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


HTML = BODY.format(style=STYLE, script=SCRIPT).encode("utf-8")

# Nothing may load or run but this page's own script and style; it may talk only to its own origin.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; connect-src 'self'; "
    "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)
