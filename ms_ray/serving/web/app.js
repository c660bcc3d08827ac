// The ms_ray session page: one WebSocket (serve/PROTOCOL.md), one column per stream the role
// reads, rows appended as the model writes them, and a text box whose words go into the input
// stream as they are typed (the model keeps writing meanwhile). Plain JS, no dependencies.
"use strict";

const IDLE_SEND_MS = 1500; // an unfinished word left alone this long is sent as it is
const MAX_TABLE_ROWS = 2000; // the table keeps the newest rows (the texts above keep everything)
const $ = (id) => document.getElementById(id);

let ws = null; // the WebSocket, while connected
let info = null; // the session frame
let columns = []; // the streams this role reads, in the model's order: [{name, role}]
let texts = {}; // stream -> its text so far (the concatenated cells)
let lastRow = -1;
let ended = null; // the end frame's reason
let attached = false; // joined a session by id rather than opening it
let sent = ""; // the part of the text box already sent
let wrote = {}; // stream -> whether this page wrote to it (a new line then starts with a space)
let writeStream = null;
let lineDone = false; // Enter was pressed before the session opened: send the whole line then
let idleTimer = null;
let closeTimer = null;

// ---- connection ----------------------------------------------------------------------------
function wsUrl(session, key) {
  const path = "v1/sessions" + (session ? "/" + encodeURIComponent(session) : "");
  const url = new URL(path, document.baseURI); // <base href> = the app's route prefix
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (key) url.searchParams.set("key", key); // browsers cannot set headers on a WebSocket
  return url.href;
}

function connect(event) {
  if (event) event.preventDefault();
  if (ws) return;
  reset();
  const key = $("key").value.trim();
  const session = $("session").value.trim();
  const url = wsUrl(session, key);
  attached = Boolean(session);
  setStatus("connecting", `connecting to ${url.replace(/([?&]key=)[^&]*/, "$1…")}`);
  ws = new WebSocket(url);
  ws.onmessage = (message) => {
    let frame;
    try {
      frame = JSON.parse(message.data);
    } catch (e) {
      return showError("bad_json", `the server sent something that is not JSON: ${message.data}`);
    }
    onFrame(frame);
  };
  ws.onclose = onClose;
  $("connect").disabled = true;
  $("disconnect").disabled = false;
}

function disconnect() {
  if (!ws) return;
  sendPending("line");
  if (ws.readyState === WebSocket.OPEN && !(attached && info && info.write.length)) {
    // the polite way: ask, then the server sends the end frame (or detaches a read-only observer)
    // and closes. A writer that attached just leaves: its close frame would end the session.
    ws.send(JSON.stringify({ type: "close" }));
    const closing = ws;
    closeTimer = setTimeout(() => closing.close(), 5000);
  } else {
    ws.close(1000, "left");
  }
}

function onFrame(frame) {
  if (frame.type === "session") return onSession(frame);
  if (frame.type === "row") return onRow(frame);
  if (frame.type === "error") return showError(frame.code, frame.message);
  if (frame.type === "end") {
    ended = frame.reason;
    return setStatus("ended", `ended: ${frame.reason}`);
  }
  showError("bad_frame", `unexpected frame ${JSON.stringify(frame)}`);
}

function onClose(event) {
  ws = null;
  clearTimeout(closeTimer);
  clearTimeout(idleTimer);
  const why = `closed: ${event.code}${event.reason ? " " + event.reason : ""}`;
  if (event.code === 1006) showError("connection", `no connection to the server (code 1006)`);
  setStatus("closed", (ended ? `ended: ${ended} · ` : "") + why);
  $("composer").hidden = true;
  $("readonly").hidden = true;
  $("say").value = "";
  sent = "";
  lineDone = false;
  $("connect").disabled = false;
  $("disconnect").disabled = true;
}

// ---- session and rows ----------------------------------------------------------------------
function onSession(frame) {
  info = frame;
  const read = new Set(frame.read);
  columns = frame.streams.filter((s) => read.has(s.name));
  const head = $("grid").tHead.rows[0];
  for (const s of columns) {
    const th = document.createElement("th");
    th.className = columnClass(s);
    th.dataset.stream = s.name;
    th.textContent = s.name;
    th.title = `${s.role} stream`;
    head.append(th);
    const card = document.createElement("div");
    card.className = "card " + columnClass(s);
    card.dataset.stream = s.name;
    const h = document.createElement("h2");
    h.textContent = s.name;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = s.role;
    h.append(" ", role);
    const pre = document.createElement("pre");
    card.append(h, pre);
    $("texts").append(card);
  }
  const select = $("stream");
  select.replaceChildren(...frame.write.map((name) => new Option(name, name)));
  if (frame.write.includes("user")) select.value = "user";
  writeStream = select.value || null;
  select.disabled = frame.write.length < 2;
  $("stream-pick").hidden = frame.write.length === 0;
  $("composer").hidden = frame.write.length === 0;
  $("readonly").hidden = frame.write.length > 0;
  $("session").value = frame.id;
  const link = new URL("?session=" + encodeURIComponent(frame.id), document.baseURI).href;
  $("share-link").href = link;
  $("share-link").textContent = link;
  $("share").hidden = false;
  showOpen();
  if (frame.write.length) {
    sendPending(lineDone ? "line" : "words"); // what was typed while the session was opening
    scheduleIdleSend();
    $("say").focus();
  }
  lineDone = false;
}

function showOpen() {
  setStatus("open", `open: session ${info.id} as ${info.role}` + (lastRow >= 0 ? ` · row ${lastRow}` : ""));
}

function onRow(frame) {
  lastRow = frame.row;
  const cells = frame.cells || {};
  for (const [name, text] of Object.entries(cells)) {
    texts[name] = (texts[name] || "") + text;
    const pre = document.querySelector(`#texts .card[data-stream="${CSS.escape(name)}"] pre`);
    if (pre) {
      pre.textContent = texts[name];
      pre.scrollTop = pre.scrollHeight;
    }
  }
  if (!ended) showOpen();
  if (Object.keys(cells).length === 0 && !$("show-silent").checked) return;
  const wrap = $("grid-wrap");
  const atBottom = wrap.scrollHeight - wrap.scrollTop - wrap.clientHeight < 40;
  const tr = document.createElement("tr");
  tr.dataset.row = frame.row;
  const num = document.createElement("td");
  num.className = "rownum";
  num.textContent = frame.row;
  tr.append(num);
  for (const s of columns) {
    const td = document.createElement("td");
    td.className = columnClass(s);
    td.dataset.stream = s.name;
    td.textContent = cells[s.name] ?? "";
    tr.append(td);
  }
  const body = $("grid").tBodies[0];
  body.append(tr);
  while (body.rows.length > MAX_TABLE_ROWS) body.deleteRow(0);
  if (atBottom) wrap.scrollTop = wrap.scrollHeight; // follow the new rows unless scrolled up
}

function columnClass(stream) {
  const kind = stream.name.includes("tool") ? " tool" : "";
  return `col-${stream.name} ${stream.role}${kind}`;
}

// ---- writing -------------------------------------------------------------------------------
// Each word goes out as soon as the space after it is typed, with its leading space (" is"),
// so the stream's text is exactly what was typed; an unfinished word waits for its end, for a
// pause (IDLE_SEND_MS) or for Enter, which also empties the box for the next line. On a fresh
// page the first key opens the session (the model then hears the question from its first rows);
// what is typed meanwhile goes in as soon as the session is open.
function sendPending(mode) {
  clearTimeout(idleTimer);
  const box = $("say");
  if (!box.value.startsWith(sent)) sent = commonPrefix(sent, box.value); // edited after sending: the new text goes too
  let chunk = box.value.slice(sent.length);
  if (mode === "words") {
    const done = chunk.match(/^([\s\S]*\S)\s+\S*$/); // up to the last finished word
    chunk = done ? done[1] : "";
  } else {
    chunk = chunk.replace(/\s+$/, ""); // trailing spaces wait for the next word
  }
  const stream = writeStream;
  if (chunk.trim() && stream && ws && ws.readyState === WebSocket.OPEN) {
    const text = !sent && (wrote[stream] || texts[stream]) && /^\S/.test(chunk) ? " " + chunk : chunk;
    ws.send(JSON.stringify({ type: "append", stream, text }));
    wrote[stream] = true;
    sent += chunk;
  }
  if (mode === "line") {
    box.value = "";
    sent = "";
  }
  const pending = box.value.slice(sent.length).trim();
  $("pending").textContent = pending ? `not sent yet: ${pending}` : "";
}

function onInput() {
  if (!ws && $("status").dataset.state === "idle") connect(); // a fresh page: the first key opens the session
  sendPending("words");
  scheduleIdleSend();
}

function scheduleIdleSend() {
  if ($("say").value.slice(sent.length).trim()) idleTimer = setTimeout(() => sendPending("idle"), IDLE_SEND_MS);
}

function commonPrefix(a, b) {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return a.slice(0, i);
}

// ---- page ----------------------------------------------------------------------------------
function setStatus(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
}

function showError(code, message) {
  const li = document.createElement("li");
  li.dataset.code = code;
  const b = document.createElement("b");
  b.textContent = code;
  li.append(b, `: ${message}`);
  $("errors").append(li);
}

function reset() {
  info = null;
  columns = [];
  texts = {};
  wrote = {};
  lastRow = -1;
  ended = null;
  sent = "";
  $("errors").replaceChildren();
  $("texts").replaceChildren();
  $("grid").tBodies[0].replaceChildren();
  const head = $("grid").tHead.rows[0];
  while (head.cells.length > 1) head.deleteCell(1);
  $("share").hidden = true;
}

function init() {
  $("connect-form").addEventListener("submit", connect);
  $("disconnect").addEventListener("click", disconnect);
  $("say").addEventListener("input", onInput);
  $("say").addEventListener("keydown", (e) => {
    if (e.key !== "Enter") return;
    e.preventDefault();
    if (ws && ws.readyState === WebSocket.OPEN) return sendPending("line");
    lineDone = true; // sent as soon as the session is open
    if (!ws && $("status").dataset.state === "idle") connect();
  });
  $("stream").addEventListener("change", () => {
    sendPending("line"); // what was typed goes to the stream it was typed for
    writeStream = $("stream").value;
  });
  // ?session=ID attaches at once (the share link); ?key=KEY fills the key field and leaves the address bar
  const params = new URLSearchParams(location.search);
  if (params.has("key")) {
    $("key").value = params.get("key");
    params.delete("key");
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? "?" + query : ""));
  }
  if (params.has("session")) {
    $("session").value = params.get("session");
    connect();
  }
}

init();
