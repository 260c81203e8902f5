// The sockdrawer admin page: a live feed (GET /admin/stream) and the API's calls, with the key kept in this
// tab's session storage. Every name, id and payload goes into the page as text (textContent), never as HTML.
"use strict";
(function () {
  const KEY = "sockdrawer-api-key";
  const $ = (id) => document.getElementById(id);
  let series = [];
  let feed = null;

  function headers() {
    const key = sessionStorage.getItem(KEY);
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function cell(row, value) {
    const td = document.createElement("td");
    td.textContent = value === null || value === undefined ? "" : String(value);
    row.appendChild(td);
    return td;
  }

  function fill(tbody, rows, onclick) {
    tbody.replaceChildren();
    for (const values of rows) {
      const tr = document.createElement("tr");
      values.forEach((v, i) => {
        const td = cell(tr, v);
        if (i === 0 && onclick) td.addEventListener("click", () => onclick(v));
      });
      tbody.appendChild(tr);
    }
  }

  function uptime(s) {
    s = Math.floor(s || 0);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return (h ? h + " h " : "") + m + " min " + (s % 60) + " s";
  }

  function nodeRow(n) {
    return [n.node, n.version, uptime(n.uptime), n.sockets, n.channels, n.subscriptions,
            (n.messages_per_s || 0).toFixed(1), (n.deliveries_per_s || 0).toFixed(1),
            n.broker + (n.broker_connected ? " (up)" : " (down)"),
            n.history_size ? n.history_size + " msgs, " + n.history_ttl + " s" : "off", n.presence_timeout + " s"];
  }

  function draw() {
    const canvas = $("chart"), ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (series.length < 2) return;
    const w = canvas.width, h = canvas.height - 20, n = 900;
    for (const [field, color] of [["deliveries_per_s", "#0b57d0"], ["sockets", "#c0392b"]]) {
      const top = Math.max(1, ...series.map((s) => s[field]));
      ctx.strokeStyle = color;
      ctx.beginPath();
      series.forEach((s, i) => {
        const x = w - (series.length - 1 - i) * (w / n), y = 10 + h - (s[field] / top) * h;
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
      ctx.fillStyle = color;
      ctx.fillText(field + " max " + top.toFixed(0), field === "sockets" ? 200 : 8, 12);
    }
  }

  function show(state) {
    if (state.series) series = state.series;
    else if (state.node) series.push(state.node);
    if (series.length > 900) series = series.slice(series.length - 900);
    const nodes = [state.node].concat(state.nodes || []).filter(Boolean);
    fill($("nodes").tBodies[0], nodes.map(nodeRow));
    fill($("channels").tBodies[0], (state.channels || []).map((c) => [c.channel, c.sockets, c.messages_per_s]),
         openChannel);
    const list = $("warnings");
    list.replaceChildren();
    for (const w of (state.warnings || []).slice().reverse()) {
      const li = document.createElement("li");
      li.textContent = new Date(w.time * 1000).toISOString() + " " + w.level + " " + w.logger + ": " + w.text;
      list.appendChild(li);
    }
    draw();
  }

  async function connect() {
    $("status").textContent = "connecting…";
    let response;
    try {
      response = await fetch("/admin/stream", { headers: headers(), cache: "no-store" });
    } catch (e) {
      $("status").textContent = "cannot reach the node; trying again";
      setTimeout(connect, 2000);
      return;
    }
    if (response.status === 401) {
      $("main").hidden = true;
      $("login").hidden = false;
      $("logout").hidden = true;
      $("login-error").textContent = sessionStorage.getItem(KEY) ? "that key was refused" : "";
      $("status").textContent = "the API key is needed";
      return;
    }
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = !sessionStorage.getItem(KEY);
    $("status").textContent = "live";
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    feed = reader;
    for (;;) {
      const { value, done } = await reader.read().catch(() => ({ done: true }));
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data) show(JSON.parse(data));
      }
    }
    $("status").textContent = "feed ended; reconnecting";
    setTimeout(connect, 2000);
  }

  async function call(method, path, body) {
    const response = await fetch(path, { method, headers: headers(), body });
    const text = await response.text();
    let answer = null;
    try { answer = JSON.parse(text); } catch (e) { answer = { error: text }; }
    return { status: response.status, answer };
  }

  let current = null;
  async function openChannel(channel) {
    current = channel;
    $("channel").hidden = false;
    $("channel-name").textContent = channel;
    $("published").textContent = "";
    const list = $("presence");
    list.replaceChildren();
    const { status, answer } = await call("GET", "/presence/" + encodeURIComponent(channel));
    for (const entry of status === 200 ? answer.clients || answer.entries || [] : []) {
      const li = document.createElement("li");
      li.textContent = (entry.user === null ? "(no user)" : entry.user) + " · " + entry.client;
      list.appendChild(li);
    }
    const past = $("history");
    past.replaceChildren();
    const kept = await call("GET", "/history/" + channel.split("/").map(encodeURIComponent).join("/") + "?limit=20");
    for (const m of kept.status === 200 ? kept.answer.messages : []) {
      const li = document.createElement("li");
      li.textContent = m.offset + "  " + m.data;
      past.appendChild(li);
    }
    if (!past.children.length) {
      const li = document.createElement("li");
      li.textContent = kept.status === 200 ? "none kept (--history-size)" : kept.answer.error || "unavailable";
      past.appendChild(li);
    }
    if (status !== 200 || !list.children.length) {
      const li = document.createElement("li");
      li.textContent = status === 200 ? "nobody subscribed with presence" : answer.error || "no presence";
      list.appendChild(li);
    }
  }

  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    connect();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    if (feed) feed.cancel();
    location.reload();
  });
  $("search").addEventListener("submit", async (e) => {
    e.preventDefault();
    const pattern = $("pattern").value || "*";
    const { answer } = await call("GET", "/channels?pattern=" + encodeURIComponent(pattern));
    const rows = Object.entries(answer.channels || {}).map(([c, info]) => [c, info.sockets]);
    fill($("found").tBodies[0], rows, openChannel);
  });
  $("publish").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (current === null) return;
    const path = "/publish/" + current.split("/").map(encodeURIComponent).join("/");
    const { status, answer } = await call("POST", path, $("message").value);
    $("published").textContent = status === 200 ? "published" : "refused: " + (answer.error || status);
  });
  $("find").addEventListener("click", async () => {
    const kind = $("target-kind").value, target = $("target").value;
    if (!target) return;
    const { answer } = await call("GET", "/connections?" + kind + "=" + encodeURIComponent(target));
    fill($("connections").tBodies[0], (answer.connections || []).map((c) =>
      [c.client, c.user, c.transport, c.protocol, c.channels.join(", "), c.peer]));
  });
  $("disconnect").addEventListener("submit", async (e) => {
    e.preventDefault();
    const kind = $("target-kind").value, target = $("target").value;
    if (!target || !window.confirm("Disconnect every connection of " + kind + " " + target + "?")) return;
    const { status, answer } = await call("POST", "/disconnect", JSON.stringify({ [kind]: target }));
    $("disconnected").textContent = status === 202 ? "sent to every node" : "refused: " + (answer.error || status);
  });
  connect();
})();
