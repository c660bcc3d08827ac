// The ms_ray session page: one WebSocket (serve/PROTOCOL.md), one column per stream the role
// reads, rows appended as the model writes them, and a text box whose line goes into the input
// stream on Enter (or word by word as it is typed, if asked); the model keeps writing meanwhile.
// Plain JS, no dependencies.
"use strict";

const IDLE_SEND_MS = 1500; // an unfinished word left alone this long is sent as it is
const MAX_TABLE_ROWS = 2000; // the table keeps the newest rows (the texts above keep everything)
const $ = (id) => document.getElementById(id);
const PLACEHOLDER = "type a question, then Enter sends it (press Connect first)"; // as in index.html

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
  if (liveWords()) sendPending("line"); // word by word: the unfinished word goes too (Enter mode: only Enter sends)
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
  $("composer").hidden = false; // as on a fresh page: what is typed waits for Connect and Enter
  $("readonly").hidden = true;
  $("say").placeholder = PLACEHOLDER;
  $("say").value = $("say").value.slice(sent.length); // keep only what was not sent
  sent = "";
  showPending();
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
    $("say").placeholder = "type a question, then Enter sends it";
    showPending(); // what was typed before Connect waits in the box for Enter
    $("say").focus();
  }
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
// Connect opens the session; typing never does. By default Enter sends the line, whole (the
// server injects it one token per row, which is how the skills model learned its questions),
// and empties the box for the next one; a line typed before Connect waits in the box for Enter.
// With "send words as I type" each word goes out as soon as the space after it is typed, an
// unfinished word after a pause (IDLE_SEND_MS) or on Enter. Either way a line that follows
// earlier text in the stream gets a leading space (" is"), so the stream's text is exactly
// what was typed.
function liveWords() {
  return $("live-words").checked;
}

// A stream whose turns end with an end token in training (a chat model's user: <|end_user|>):
// Enter sends the line with end: true, and the server adds that token after it.
function hasEndToken(stream) {
  return Boolean(info && info.streams.some((s) => s.name === stream && s.end_token));
}

function isOpen() {
  return Boolean(ws && ws.readyState === WebSocket.OPEN && info);
}

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
  const endsTurn = mode === "line" && hasEndToken(stream); // Enter: the turn is over (e.g. <|end_user|>)
  if ((chunk.trim() || endsTurn) && stream && isOpen()) {
    const text = !sent && (wrote[stream] || texts[stream]) && /^\S/.test(chunk) ? " " + chunk : chunk;
    ws.send(JSON.stringify(endsTurn ? { type: "append", stream, text, end: true } : { type: "append", stream, text }));
    wrote[stream] = true;
    sent += chunk;
  }
  if (mode === "line" && isOpen()) { // the line went: the box is free for the next one
    box.value = "";
    sent = "";
  }
  showPending();
}

function showPending(enter = false) {
  const pending = $("say").value.slice(sent.length).trim();
  let hint = "";
  if ((pending || enter) && !isOpen()) {
    hint = ws ? "not sent: the session is still opening" : "not sent: press Connect first, then Enter";
  } else if (pending && liveWords()) hint = `not sent yet: ${pending}`;
  else if (pending) hint = "Enter sends";
  $("pending").textContent = hint;
}

function onInput() {
  clearTimeout(idleTimer);
  if (!liveWords() || !isOpen()) return showPending(); // kept in the box until Enter (after Connect)
  sendPending("words");
  if ($("say").value.slice(sent.length).trim()) idleTimer = setTimeout(() => sendPending("idle"), IDLE_SEND_MS);
}

function onEnter(event) {
  if (event.key !== "Enter" || event.isComposing) return;
  event.preventDefault();
  if (isOpen()) return sendPending("line");
  showPending(true); // not connected: the line stays in the box
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
  $("say").addEventListener("keydown", onEnter);
  $("live-words").addEventListener("change", onInput); // ticked: the words already finished go at once
  $("stream").addEventListener("change", () => {
    if (liveWords()) sendPending("line"); // words already went to the old stream: the rest goes there too
    writeStream = $("stream").value; // Enter mode: the line goes where it is sent
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
