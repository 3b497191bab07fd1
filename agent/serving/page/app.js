// The live page: the catalog, a user's events sent over the websocket, and every push the agent
// makes for that user. Plain JavaScript, no build step, nothing fetched from other hosts. Text
// from the agent (titles, reasons, profiles) is always inserted as text, never as markup.
"use strict";

(() => {
  const DEMO = document.body.dataset.demo === "true";
  const DEMO_USERS = ["demo-ada", "demo-ben", "demo-chloe"];
  const ACTIONS = [
    ["view", "View"],
    ["like", "Like"],
    ["add_to_cart", "Add to cart"],
    ["purchase", "Buy"],
    ["dislike", "Dislike"],
  ];
  const $ = (id) => document.getElementById(id);
  const state = {
    token: null,
    userId: null,
    ws: null,
    retries: 0,
    items: new Map(), // item id -> Item, every item seen so far
    sent: new Map(), // event id -> when it was sent (performance.now())
    roundTrips: [], // ms from sending an event to the push that reflects it
    recIds: [],
    renderSeq: 0,
    metrics: null, // the previous scrape, for rates
  };

  // -- small helpers ----------------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }

  let noticeTimer = null;
  function notice(text) {
    const box = $("notice");
    box.textContent = text;
    box.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { box.hidden = true; }, 5000);
  }

  function randomId(length) {
    // crypto.getRandomValues works on plain http too (randomUUID needs a secure context)
    const bytes = crypto.getRandomValues(new Uint8Array(length));
    return Array.from(bytes, (b) => (b % 36).toString(36)).join("");
  }

  async function api(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    const response = await fetch(path, { ...options, headers });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  function userOfToken(token) {
    // v1.<user id in URL-safe base64>.<expires>.<signature>
    try {
      const binary = atob((token.split(".")[1] || "").replace(/-/g, "+").replace(/_/g, "/"));
      return new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0)));
    } catch (error) {
      return "?";
    }
  }

  function median(values) {
    if (!values.length) return null;
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.floor((sorted.length - 1) / 2)];
  }

  // -- who the page acts as -----------------------------------------------------------------------

  async function mintDemoToken(userId) {
    const body = await api("/v1/demo/tokens", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ user_id: userId }),
    });
    return body.token;
  }

  function startDemo() {
    $("demo-user").hidden = false;
    let user = localStorage.getItem("recsys-demo-user");
    if (!user || !/^demo-[a-z0-9]{1,24}$/.test(user)) user = "demo-" + randomId(8);
    const select = $("demo-users");
    for (const name of new Set([user, ...DEMO_USERS])) select.append(el("option", { value: name }, name));
    select.value = user;
    select.addEventListener("change", () => switchDemoUser(select.value));
    $("new-visitor").addEventListener("click", () => {
      const name = "demo-" + randomId(8);
      select.prepend(el("option", { value: name }, name));
      select.value = name;
      switchDemoUser(name);
    });
    switchDemoUser(user);
  }

  async function switchDemoUser(userId) {
    localStorage.setItem("recsys-demo-user", userId);
    try {
      useToken(await mintDemoToken(userId));
    } catch (error) {
      notice("could not get a demo token: " + error.message);
    }
  }

  function startWithToken() {
    const form = $("token-form");
    form.hidden = false;
    const fromUrl = new URLSearchParams(location.search).get("token");
    if (fromUrl) {
      sessionStorage.setItem("recsys-token", fromUrl);
      // out of the address bar and the history: it is a credential
      history.replaceState(null, "", location.pathname);
    }
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (token) useToken(token);
    });
    const saved = sessionStorage.getItem("recsys-token");
    if (saved) useToken(saved);
    else setConnection("closed", "paste a user token to connect");
  }

  function useToken(token) {
    if (!DEMO) sessionStorage.setItem("recsys-token", token);
    const user = userOfToken(token);
    const switched = user !== state.userId;
    state.token = token;
    state.userId = user;
    $("user-name").textContent = user;
    if (switched) {
      state.recIds = [];
      state.sent.clear();
      $("recommendations").replaceChildren();
      $("events").replaceChildren();
      $("profile").replaceChildren(el("p", { class: "muted" }, "Written after a few events."));
      $("latency").textContent = "waiting for the first push";
    }
    connect();
    loadCatalog();
  }

  // -- the socket ---------------------------------------------------------------------------------

  function setConnection(stateName, text) {
    const badge = $("connection");
    badge.dataset.state = stateName;
    badge.textContent = text;
  }

  function connect() {
    if (state.ws) {
      state.ws.onclose = null;
      state.ws.close(1000, "switching user");
    }
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/v1/ws?token=" + encodeURIComponent(state.token));
    state.ws = ws;
    setConnection("connecting", "connecting…");
    ws.onopen = () => {
      state.retries = 0;
      setConnection("open", "connected as " + state.userId);
    };
    ws.onmessage = (message) => onMessage(JSON.parse(message.data));
    ws.onclose = (event) => {
      if (state.ws !== ws) return;
      const why = event.reason ? `${event.code}: ${event.reason}` : `${event.code}`;
      setConnection("closed", `disconnected (${why}); reconnecting`);
      reconnectLater(event.code);
    };
  }

  function reconnectLater(code) {
    const delay = Math.min(10000, 500 * 2 ** state.retries++);
    setTimeout(async () => {
      if (DEMO) {
        // a fresh demo token each time: the last one may be what was refused
        try {
          state.token = await mintDemoToken(state.userId);
        } catch (error) {
          notice("could not get a demo token: " + error.message);
        }
      } else if (code === 4401) {
        setConnection("closed", "the token has expired: paste a new one");
        return;
      }
      connect();
    }, delay);
  }

  function send(type, itemId) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
      notice("not connected");
      return;
    }
    const id = "page-" + randomId(16);
    state.sent.set(id, performance.now());
    state.ws.send(JSON.stringify({ id, type, item_id: itemId }));
    const item = state.items.get(itemId);
    const line = el("li", {}, `${type} · ${item ? item.title : itemId}`);
    $("events").prepend(line);
  }

  function onMessage(message) {
    if (Array.isArray(message.items) && "user_id" in message) {
      renderRecommendations(message);
    } else if (message.error) {
      notice(message.error);
    }
    // otherwise an acknowledgement ({"accepted": n, "sequences": [...]}): the push follows
  }

  // -- recommendations ----------------------------------------------------------------------------

  async function ensureItems(ids) {
    const missing = ids.filter((id) => !state.items.has(id));
    if (!missing.length) return;
    try {
      const body = await api("/v1/items?limit=1000&ids=" + missing.map(encodeURIComponent).join(","));
      for (const item of body.items) state.items.set(item.id, item);
    } catch (error) {
      // titles stay ids; the list itself is still right
    }
  }

  async function renderRecommendations(recs) {
    const arrived = performance.now();
    const seq = ++state.renderSeq;
    let latency = null;
    for (const id of recs.event_ids || (recs.event_id ? [recs.event_id] : [])) {
      const sentAt = state.sent.get(id);
      if (sentAt !== undefined) {
        latency = arrived - sentAt;
        state.sent.delete(id);
      }
    }
    if (latency !== null) {
      state.roundTrips.push(latency);
      if (state.roundTrips.length > 50) state.roundTrips.shift();
      $("op-roundtrip").textContent = `${median(state.roundTrips).toFixed(0)} ms`;
    }
    await ensureItems(recs.items.map((entry) => entry.item_id));
    if (seq !== state.renderSeq) return; // a newer push is being shown
    const before = new Set(state.recIds);
    const rows = recs.items.map((entry) => {
      const item = state.items.get(entry.item_id);
      return el(
        "li",
        { "data-item-id": entry.item_id, class: before.has(entry.item_id) ? "" : "fresh" },
        el("span", { class: "score" }, Number(entry.score).toFixed(3)),
        el("div", { class: "title" }, item ? item.title : entry.item_id),
        el("div", { class: "reasons" }, (entry.reasons || []).join(" · ")),
      );
    });
    $("recommendations").replaceChildren(...rows);
    state.recIds = recs.items.map((entry) => entry.item_id);
    $("recs-empty").hidden = rows.length > 0;
    const at = new Date(recs.generated_at * 1000).toLocaleTimeString();
    $("latency").textContent =
      latency !== null ? `event → push: ${latency.toFixed(0)} ms (at ${at})` : `current list (at ${at})`;
    renderProfile(recs.profile);
    for (const card of document.querySelectorAll("#catalog .card")) {
      card.classList.toggle("recommended", state.recIds.includes(card.dataset.itemId));
    }
  }

  function renderProfile(profile) {
    if (!profile) return;
    const parts = [];
    if (profile.summary) parts.push(el("p", {}, profile.summary));
    if (profile.interests && profile.interests.length) {
      parts.push(el("ul", { class: "interests" }, ...profile.interests.map((i) => el("li", {}, i))));
    }
    if (profile.avoid && profile.avoid.length) parts.push(el("p", { class: "muted" }, "avoids: " + profile.avoid.join(", ")));
    const source = profile.source === "llm" ? "an LLM" : "a heuristic";
    const events = profile.based_on_events === 1 ? "1 event" : `${profile.based_on_events} events`;
    parts.push(el("p", { class: "muted" }, `written by ${source} from ${events}`));
    $("profile").replaceChildren(...parts);
  }

  // -- the catalog --------------------------------------------------------------------------------

  let categoriesFilled = false;
  let catalogSeq = 0;

  async function loadCatalog() {
    const seq = ++catalogSeq;
    const params = new URLSearchParams({ limit: "300" });
    const words = $("search").value.trim();
    const category = $("department").value;
    if (words) params.set("q", words);
    if (category) params.set("category", category);
    let body;
    try {
      body = await api("/v1/items?" + params);
    } catch (error) {
      notice("could not load the catalog: " + error.message);
      return;
    }
    if (seq !== catalogSeq) return;
    for (const item of body.items) state.items.set(item.id, item);
    if (!categoriesFilled && !words && !category && body.items.length) {
      const first = [...new Set(body.items.map((item) => (item.categories || [])[0]).filter(Boolean))].sort();
      for (const name of first) $("department").append(el("option", { value: name }, name));
      categoriesFilled = true;
    }
    $("catalog-count").textContent = `${body.items.length} of ${body.total}`;
    $("catalog").replaceChildren(...body.items.map(card));
  }

  function card(item) {
    const price = item.attributes && typeof item.attributes.price === "number" ? item.attributes.price.toFixed(2) : "";
    return el(
      "article",
      { class: state.recIds.includes(item.id) ? "card recommended" : "card", "data-item-id": item.id },
      el("h3", {}, item.title),
      el("p", {}, item.text || ""),
      el("div", { class: "meta" }, el("span", {}, (item.categories || []).join(" · ")), el("span", {}, price)),
      el(
        "div",
        { class: "actions" },
        ...ACTIONS.map(([type, label]) => el("button", { type: "button", "data-action": type }, label)),
      ),
    );
  }

  $("catalog").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    send(button.dataset.action, button.closest(".card").dataset.itemId);
  });

  let searchTimer = null;
  $("search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(loadCatalog, 200);
  });
  $("department").addEventListener("change", loadCatalog);

  // -- the operator view: the agent's own metrics -------------------------------------------------

  function parseMetrics(text) {
    // sample name -> sum over its label sets
    const totals = {};
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const match = line.match(/^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
      if (match) totals[match[1]] = (totals[match[1]] || 0) + Number(match[3]);
    }
    return totals;
  }

  async function pollMetrics() {
    try {
      const response = await fetch("/metrics");
      if (!response.ok) throw new Error(response.statusText);
      const now = performance.now();
      const m = parseMetrics(await response.text());
      const previous = state.metrics;
      if (previous) {
        const seconds = (now - previous.at) / 1000;
        const applied = (m.recsys_events_applied_total || 0) - (previous.m.recsys_events_applied_total || 0);
        $("op-rate").textContent = (applied / seconds).toFixed(1);
        const pushes = (m.recsys_push_lag_seconds_count || 0) - (previous.m.recsys_push_lag_seconds_count || 0);
        const lag = (m.recsys_push_lag_seconds_sum || 0) - (previous.m.recsys_push_lag_seconds_sum || 0);
        if (pushes > 0) $("op-lag").textContent = `${((lag / pushes) * 1000).toFixed(1)} ms`;
      }
      $("op-dlq").textContent = String(m.recsys_dead_letters_total || 0);
      $("op-sockets").textContent = String(m.recsys_ws_sockets || 0);
      $("op-users").textContent = String(m.recsys_users || 0);
      state.metrics = { at: now, m };
    } catch (error) {
      $("op-rate").textContent = "–";
    }
  }

  setInterval(pollMetrics, 2000);
  pollMetrics();

  if (DEMO) startDemo();
  else startWithToken();
})();
