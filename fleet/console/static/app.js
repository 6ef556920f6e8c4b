/* The fleet console: a hash-routed page over the REST API (/api/v1). Every value from the API is put
   in the page as text (never as HTML). The token lives in sessionStorage for this tab only. */
"use strict";
(function () {
  var app = document.getElementById("app");
  var me = null;           // {name, role}
  var stream = null;       // AbortController of a live rollout stream
  var WINDOWS = [["15 min", 900], ["1 hour", 3600], ["6 hours", 21600], ["24 hours", 86400], ["7 days", 604800]];

  function h(tag, attrs) {
    var n = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "on") Object.keys(attrs.on).forEach(function (e) { n.addEventListener(e, attrs.on[e]); });
      else if (k === "text") n.textContent = attrs.text;
      else if (attrs[k] !== null && attrs[k] !== undefined && attrs[k] !== false) n.setAttribute(k, attrs[k]);
    });
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      (Array.isArray(c) ? c : [c]).forEach(function (x) {
        n.appendChild(typeof x === "string" || typeof x === "number" ? document.createTextNode(String(x)) : x);
      });
    }
    return n;
  }
  function pill(word) { return h("span", {"class": "pill " + (word || "none"), text: word || "—"}); }
  function when(t) { return t ? new Date(t * 1000).toLocaleString() : "—"; }
  function bundle(b) { return b ? b.name + " v" + b.version : "—"; }
  function num(v, d) { return v === null || v === undefined ? "—" : Number(v).toFixed(d === undefined ? 1 : d); }
  function token() { return sessionStorage.getItem("fleet-token") || ""; }

  var gen = 0;             // bumped on every navigation: answers for an older page are dropped

  function api(method, path, body, raw) {
    var mine = gen;
    var opt = {method: method, headers: {"Authorization": "Bearer " + token()}};
    if (body !== undefined) {
      opt.body = raw ? body : JSON.stringify(body);
      opt.headers["Content-Type"] = raw ? "application/octet-stream" : "application/json";
    }
    return fetch(path, opt).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (doc) {
        if (r.status === 401 && method === "GET") { login("Your token was not accepted."); throw new Error("401"); }
        if (!r.ok) { var e = new Error(doc.error || ("HTTP " + r.status)); e.status = r.status; throw e; }
        if (mine !== gen) return new Promise(function () {});  // the user went elsewhere meanwhile
        return doc;
      });
    });
  }

  function fail(e) {
    if (e && e.message === "401") return;
    var box = document.getElementById("error") || app.insertBefore(h("div", {id: "error", "class": "error"}),
                                                                   app.firstChild);
    box.textContent = (e && e.status ? "HTTP " + e.status + ": " : "") + (e && e.message ? e.message : String(e));
  }

  function confirmAction(text) {
    var d = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    return new Promise(function (resolve) {
      d.addEventListener("close", function once() {
        d.removeEventListener("close", once);
        resolve(d.returnValue === "ok");
      });
      d.returnValue = "";
      d.showModal();
    });
  }

  function act(label, text, fn, cls) {
    return h("button", {type: "button", "class": cls || "primary", "data-action": label,
                        disabled: me && me.role === "operator" ? null : "disabled",
                        title: me && me.role === "operator" ? null : "needs an operator token",
                        on: {click: function () {
                          confirmAction(text).then(function (ok) { if (ok) fn().then(route, fail); });
                        }}}, label);
  }

  function page(title) {
    app.textContent = "";
    app.appendChild(h("h1", {text: title}));
    return app;
  }

  // The page for the current address is on screen (tests and screenshots wait for this).
  function rendered() { document.body.setAttribute("data-rendered", location.hash || "#/"); }

  // ------------------------------------------------------------------------------------- login
  function login(msg) {
    sessionStorage.removeItem("fleet-token");
    me = null;
    document.getElementById("who").textContent = "";
    document.getElementById("logout").hidden = true;
    app.textContent = "";
    var input = h("input", {type: "password", id: "token", autocomplete: "off", placeholder: "API token"});
    app.appendChild(h("form", {"class": "login", id: "login", on: {submit: function (ev) {
      ev.preventDefault();
      sessionStorage.setItem("fleet-token", input.value.trim());
      start();
    }}}, h("h1", {text: "Sign in"}), h("p", {"class": "muted",
      text: "Paste a console token (`fleet token add --role viewer|operator`)."}),
      msg ? h("p", {"class": "error", text: msg}) : null, input, h("button", {type: "submit", "class": "primary"},
      "Sign in")));
    input.focus();
  }

  function start() {
    if (!token()) return login();
    api("GET", "/api/v1/whoami").then(function (w) {
      me = w;
      document.getElementById("who").textContent = w.name + " (" + w.role + ")";
      document.getElementById("logout").hidden = false;
      route();
    }, fail);
  }

  // ------------------------------------------------------------------------------------- overview
  function overview() {
    return api("GET", "/api/v1/summary").then(function (s) {
      page("Fleet overview");
      var cards = h("div", {"class": "cards", id: "overview-cards"},
        h("div", {"class": "card"}, h("div", {"class": "n", id: "count-devices", text: s.devices}),
          h("div", {"class": "k", text: "devices"})),
        h("div", {"class": "card"}, h("div", {"class": "n", id: "count-online", text: s.online["1"] || 0}),
          h("div", {"class": "k", text: "online"})));
      Object.keys(s.health).sort().forEach(function (k) {
        cards.appendChild(h("a", {href: "#/devices?health=" + encodeURIComponent(k === "none" ? "unknown" : k),
                                  "class": "card", "data-health": k},
          h("div", {"class": "n", text: s.health[k]}), h("div", {"class": "k"}, pill(k === "none" ? "unknown" : k))));
      });
      app.appendChild(cards);
      app.appendChild(h("h2", {text: "Devices by bundle"}));
      app.appendChild(h("table", {id: "by-bundle"}, h("tr", {}, h("th", {text: "bundle"}), h("th", {text: "devices"})),
        s.bundles.map(function (b) {
          return h("tr", {}, h("td", {text: b.name ? b.name + " v" + b.version : "none"}), h("td", {text: b.devices}));
        })));
      app.appendChild(h("h2", {text: "Devices by deploy state"}));
      app.appendChild(h("table", {id: "by-state"}, Object.keys(s.state).sort().map(function (k) {
        return h("tr", {}, h("td", {}, pill(k)), h("td", {text: s.state[k]}));
      })));
      var c = s.controller || {};
      app.appendChild(h("h2", {text: "Controller"}));
      app.appendChild(h("dl", {"class": "kv"}, h("dt", {text: "uptime"}), h("dd", {text: num(c.uptime_s, 0) + " s"}),
        h("dt", {text: "registry"}), h("dd", {text: c.registry || "—"}),
        h("dt", {text: "active rollouts"}), h("dd", {}, (c.active_rollouts || []).map(function (r) {
          return h("a", {href: "#/rollout/" + r, text: r + " "});
        }))));
    });
  }

  // ------------------------------------------------------------------------------------- devices
  var COLS = [["device_id", "device"], ["online", "online"], ["health", "health"], ["bundle", "bundle"],
              ["state", "deploy state"], ["agent_version", "agent"], ["last_seen", "last seen"]];

  function devices(q) {
    var st = {sort: q.sort || "device_id", order: q.order || "asc", offset: +(q.offset || 0),
              limit: +(q.limit || 50), q: q.q || "", health: q.health || "", state: q.state || "",
              online: q.online || ""};
    var qs = Object.keys(st).filter(function (k) { return st[k] !== ""; })
      .map(function (k) { return k + "=" + encodeURIComponent(st[k]); }).join("&");
    return api("GET", "/api/v1/devices?" + qs).then(function (r) {
      page("Devices");
      var go = function (patch) {
        var n = Object.assign({}, st, patch);
        location.hash = "#/devices?" + Object.keys(n).filter(function (k) { return n[k] !== ""; })
          .map(function (k) { return k + "=" + encodeURIComponent(n[k]); }).join("&");
      };
      var search = h("input", {id: "filter-q", placeholder: "device id contains…", value: st.q});
      var sel = function (id, val, opts) {
        return h("select", {id: id, on: {change: function (e) { var p = {offset: 0}; p[id.slice(7)] = e.target.value; go(p); }}},
          opts.map(function (o) { return h("option", {value: o[0], selected: o[0] === val ? "selected" : null}, o[1]); }));
      };
      app.appendChild(h("form", {"class": "filters", on: {submit: function (e) { e.preventDefault(); go({q: search.value, offset: 0}); }}},
        search, h("button", {type: "submit"}, "Filter"),
        sel("filter-health", st.health, [["", "any health"], ["ok", "ok"], ["degraded", "degraded"], ["unhealthy", "unhealthy"], ["offline", "offline"], ["unknown", "unknown"]]),
        sel("filter-online", st.online, [["", "online or not"], ["true", "online"], ["false", "offline"]]),
        h("span", {"class": "muted", id: "devices-total", text: r.total + " devices"})));
      var head = h("tr", {}, COLS.map(function (c) {
        var cls = "sortable" + (st.sort === c[0] ? " sorted-" + st.order : "");
        return h("th", {"class": cls, "data-sort": c[0], on: {click: function () {
          go({sort: c[0], order: st.sort === c[0] && st.order === "asc" ? "desc" : "asc", offset: 0});
        }}}, c[1]);
      }));
      app.appendChild(h("table", {id: "devices"}, h("thead", {}, head), h("tbody", {}, r.devices.map(function (d) {
        return h("tr", {"data-device": d.device_id},
          h("td", {}, h("a", {href: "#/device/" + encodeURIComponent(d.device_id), text: d.device_id})),
          h("td", {}, pill(d.online ? "online" : "offline")), h("td", {}, pill(d.health || "unknown")),
          h("td", {text: bundle(d.active)}), h("td", {}, pill(d.deploy_state)),
          h("td", {text: d.agent_version || "—"}), h("td", {text: when(d.last_seen)}));
      }))));
      var last = Math.min(r.offset + r.limit, r.total);
      app.appendChild(h("div", {"class": "actions"},
        h("button", {type: "button", id: "prev", disabled: r.offset === 0 ? "disabled" : null,
                     on: {click: function () { go({offset: Math.max(0, r.offset - r.limit)}); }}}, "‹ Previous"),
        h("span", {"class": "muted", id: "page-info", text: (r.total ? r.offset + 1 : 0) + "–" + last + " of " + r.total}),
        h("button", {type: "button", id: "next", disabled: last >= r.total ? "disabled" : null,
                     on: {click: function () { go({offset: r.offset + r.limit}); }}}, "Next ›")));
    });
  }

  // ------------------------------------------------------------------------------------- one device
  var CHARTS = [
    ["Latency", "ms", [["p50", "p50_ms", "#1f6feb"], ["p99", "p99_ms", "#cf222e"]]],
    ["Requests", "req/s", [["req/s", "qps", "#1a7f37"]]],
    ["Errors", "ratio", [["error rate", "error_rate", "#cf222e"]]],
    ["Large model share and τ", "ratio", [["large share", "large_fraction", "#8250df"], ["τ", "tau", "#bf8700"]]],
    ["GPU", "%", [["GPU", "gpu_util", "#1f6feb"]]],
    ["Temperature", "°C", [["hottest zone", "temp_max_c", "#bc4c00"]]],
    ["Power", "W", [["power", "power_mw", "#1a7f37", 1e-3]]],
    ["Memory used", "MB", [["used", "mem_used_mb", "#8250df"]]]
  ];

  function device(id, q) {
    var win = +(q.window || 3600);
    var enc = encodeURIComponent(id);
    return Promise.all([api("GET", "/api/v1/devices/" + enc), api("GET", "/api/v1/devices/" + enc + "/telemetry?window_s=" + win),
                        api("GET", "/api/v1/devices/" + enc + "/events")]).then(function (res) {
      var d = res[0], tel = res[1], ev = res[2], t = d.telemetry || {};
      page("Device " + d.device_id);
      app.appendChild(h("dl", {"class": "kv", id: "device-info"},
        h("dt", {text: "online"}), h("dd", {}, pill(d.online ? "online" : "offline")),
        h("dt", {text: "health"}), h("dd", {}, pill(d.health || "unknown")),
        h("dt", {text: "bundle"}), h("dd", {text: bundle(d.active)}),
        h("dt", {text: "previous"}), h("dd", {text: bundle(d.previous)}),
        h("dt", {text: "deploy state"}), h("dd", {}, pill(d.deploy_state)),
        h("dt", {text: "agent"}), h("dd", {text: d.agent_version || "—"}),
        h("dt", {text: "last seen"}), h("dd", {text: when(d.last_seen)}),
        h("dt", {text: "latest"}), h("dd", {text: "p50 " + num(t.p50_ms) + " ms, p99 " + num(t.p99_ms) + " ms, " +
          num(t.qps) + " req/s, GPU " + num(t.gpu_util, 0) + " %"})));
      app.appendChild(h("div", {"class": "actions"},
        h("label", {}, "Window ", h("select", {id: "window", on: {change: function (e) {
          location.hash = "#/device/" + enc + "?window=" + e.target.value; }}},
          WINDOWS.map(function (w) { return h("option", {value: w[1], selected: w[1] === win ? "selected" : null}, w[0]); }))),
        act("Roll back", "Roll " + d.device_id + " back to its previous bundle?", function () {
          return api("POST", "/api/v1/rollback", {devices: [d.device_id], reason: "console rollback"});
        }, "danger")));
      var grid = h("div", {"class": "grid", id: "charts"});
      app.appendChild(grid);
      var now = Date.now() / 1000;
      CHARTS.forEach(function (c) {
        var el = h("div", {"data-chart": c[0]});
        grid.appendChild(el);
        Charts.line(el, {title: c[0], unit: c[1], t0: now - win, t1: now, series: c[2].map(function (s) {
          return {name: s[0], color: s[2], points: tel.points.map(function (p) {
            var v = p[s[1]];
            return [p.ts, v === null || v === undefined ? null : v * (s[3] || 1)];
          })};
        })});
      });
      app.appendChild(h("h2", {text: "Events"}));
      var items = [];
      if (ev.last_event) items.push([ev.last_event.ts, "last event: " + ev.last_event.kind + " " + (ev.last_event.message || "")]);
      ev.history.forEach(function (e) { items.push([e.ts, e.kind + " (" + e.rollout_id + ") " + (e.message || "")]); });
      app.appendChild(h("ul", {"class": "timeline", id: "events"}, items.length ? items.map(function (i) {
        return h("li", {}, h("span", {"class": "muted", text: when(i[0]) + " "}), i[1]);
      }) : h("li", {"class": "muted", text: "no events yet"})));
    });
  }

  // ------------------------------------------------------------------------------------- rollouts
  function rollouts() {
    return Promise.all([api("GET", "/api/v1/rollouts?limit=50"), api("GET", "/api/v1/bundles")]).then(function (res) {
      page("Rollouts");
      var bsel = h("select", {id: "start-bundle"}, res[1].map(function (b) {
        return h("option", {value: b.name + "@" + b.version}, b.name + " v" + b.version);
      }));
      var waves = h("input", {id: "start-waves", value: "10,30,100", size: 12});
      app.appendChild(h("div", {"class": "filters"}, h("span", {text: "Start a rollout of"}), bsel,
        h("span", {text: "in waves (%)"}), waves,
        act("Start rollout", "Start a rollout of the selected bundle to the whole fleet?", function () {
          var parts = bsel.value.split("@");
          return api("POST", "/api/v1/rollouts", {bundle: {name: parts[0], version: +parts[1]},
                                                  waves: waves.value.split(",").map(Number)})
            .then(function (r) { location.hash = "#/rollout/" + r.rollout_id; });
        })));
      app.appendChild(h("table", {id: "rollouts"}, h("tr", {}, ["rollout", "bundle", "mode", "state", "created", "reason"]
        .map(function (c) { return h("th", {text: c}); })), res[0].map(function (r) {
        return h("tr", {"data-rollout": r.rollout_id},
          h("td", {}, h("a", {href: "#/rollout/" + r.rollout_id, text: r.rollout_id})), h("td", {text: bundle(r.bundle)}),
          h("td", {text: r.mode}), h("td", {}, pill(r.state)), h("td", {text: when(r.created)}),
          h("td", {text: r.reason || ""}));
      })));
    });
  }

  function rolloutView(r) {
    page("Rollout " + r.rollout_id);
    app.appendChild(h("dl", {"class": "kv"}, h("dt", {text: "bundle"}), h("dd", {text: bundle(r.bundle)}),
      h("dt", {text: "state"}), h("dd", {}, h("span", {id: "rollout-state"}, pill(r.state))),
      h("dt", {text: "mode"}), h("dd", {text: r.mode || "normal"}),
      h("dt", {text: "wave"}), h("dd", {id: "rollout-wave", text: Math.min(r.current_wave + 1, (r.wave_progress || []).length) + " of " + (r.wave_progress || []).length}),
      h("dt", {text: "reason"}), h("dd", {text: r.reason || "—"})));
    var id = r.rollout_id, post = function (a, body) { return api("POST", "/api/v1/rollouts/" + id + "/" + a, body || {}); };
    app.appendChild(h("div", {"class": "actions"},
      act("Pause", "Pause rollout " + id + "?", function () { return post("pause"); }),
      act("Resume", "Resume rollout " + id + "?", function () { return post("resume"); }),
      act("Promote", "Promote rollout " + id + "?", function () { return post("promote"); }),
      act("Abort", "Abort rollout " + id + " and roll its devices back?", function () { return post("abort", {rollback: true}); }, "danger")));
    app.appendChild(h("h2", {text: "Waves"}));
    app.appendChild(h("div", {id: "waves"}, (r.wave_progress || []).map(function (w, i) {
      var n = w.devices || 1, c = w.counts || {};
      var ok = (c.succeeded || 0), bad = (c.failed || 0) + (c["timed-out"] || 0) + (c["rolled-back"] || 0) + (c["rollback-failed"] || 0) + (c["rollback-sent"] || 0);
      var run = Math.max(0, (w.devices || 0) - ok - bad - (c.pending || 0) - (c.skipped || 0));
      return h("div", {"class": "wave", "data-wave": i, "data-succeeded": ok},
        h("div", {text: "wave " + (i + 1) + ": " + ok + " of " + w.devices + " succeeded" + (bad ? ", " + bad + " failed" : "")}),
        h("div", {"class": "bar"}, h("div", {"class": "ok", style: null, "data-w": ok / n}),
          h("div", {"class": "bad", "data-w": bad / n}), h("div", {"class": "run", "data-w": run / n})));
    })));
    Array.prototype.forEach.call(app.querySelectorAll(".bar > div"), function (d) {
      d.style.width = (100 * Number(d.getAttribute("data-w"))).toFixed(1) + "%";
    });
    app.appendChild(h("h2", {text: "Devices"}));
    app.appendChild(h("table", {id: "rollout-devices"}, h("tr", {}, ["device", "wave", "state", "detail", "updated"]
      .map(function (c) { return h("th", {text: c}); })), (r.devices || []).map(function (d) {
      return h("tr", {"data-device": d.device_id}, h("td", {}, h("a", {href: "#/device/" + d.device_id, text: d.device_id})),
        h("td", {text: d.wave + 1}), h("td", {}, pill(d.state)), h("td", {text: d.detail || ""}), h("td", {text: when(d.updated)}));
    })));
    app.appendChild(h("h2", {text: "History"}));
    app.appendChild(h("ul", {"class": "timeline"}, (r.history || []).slice().reverse().map(function (e) {
      return h("li", {}, h("span", {"class": "muted", text: when(e.ts) + " "}), e.kind + (e.device_id ? " " + e.device_id : "") + " " + (e.message || ""));
    })));
    rendered();
  }

  function rollout(id) {
    var ctl = new AbortController();
    stream = ctl;
    return fetch("/api/v1/rollouts/" + encodeURIComponent(id) + "/stream",
                 {headers: {"Authorization": "Bearer " + token()}, signal: ctl.signal}).then(function (resp) {
      if (!resp.ok) return resp.json().then(function (d) { var e = new Error(d.error); e.status = resp.status; throw e; });
      var reader = resp.body.getReader(), dec = new TextDecoder(), buf = "";
      var pump = function () {
        return reader.read().then(function (chunk) {
          if (chunk.done) return;
          buf += dec.decode(chunk.value, {stream: true});
          var cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            var msg = buf.slice(0, cut); buf = buf.slice(cut + 2);
            var data = msg.split("\n").filter(function (l) { return l.indexOf("data: ") === 0; }).map(function (l) { return l.slice(6); }).join("");
            if (msg.indexOf("event: status") === 0 && data && stream === ctl) rolloutView(JSON.parse(data));
          }
          return pump();
        });
      };
      return pump();
    }).catch(function (e) { if (e.name !== "AbortError") throw e; });
  }

  // ------------------------------------------------------------------------------------- bundles
  function bundles() {
    return api("GET", "/api/v1/bundles").then(function (list) {
      page("Bundles");
      var file = h("input", {type: "file", id: "upload-file", accept: ".bundle"});
      app.appendChild(h("div", {"class": "filters"}, file, act("Upload", "Upload and store this bundle?", function () {
        if (!file.files.length) return Promise.reject(new Error("choose a bundle file first"));
        return api("POST", "/api/v1/bundles", file.files[0], true);
      })));
      app.appendChild(h("table", {id: "bundles"}, h("tr", {}, ["bundle", "version", "manifest sha256", "manifest bytes"]
        .map(function (c) { return h("th", {text: c}); })), list.map(function (b) {
        return h("tr", {}, h("td", {}, h("a", {href: "#/bundle/" + b.name + "/" + b.version, text: b.name})),
          h("td", {text: b.version}), h("td", {}, h("code", {text: b.manifest_sha256.slice(0, 16) + "…"})),
          h("td", {text: b.manifest_size}));
      })));
    });
  }

  function bundleView(name, version) {
    return api("GET", "/api/v1/bundles/" + encodeURIComponent(name) + "/" + encodeURIComponent(version)).then(function (b) {
      page("Bundle " + b.name + " v" + b.version);
      app.appendChild(h("dl", {"class": "kv", id: "manifest"}, h("dt", {text: "description"}), h("dd", {text: b.description || "—"}),
        h("dt", {text: "created"}), h("dd", {text: when(b.created)}), h("dt", {text: "expires"}), h("dd", {text: when(b.expires)}),
        h("dt", {text: "manifest sha256"}), h("dd", {}, h("code", {text: b.record.manifest_sha256})),
        h("dt", {text: "total size"}), h("dd", {text: b.total_size + " bytes"}),
        h("dt", {text: "router"}), h("dd", {text: "gate " + b.router.gate + ", τ " + b.router.tau}),
        h("dt", {text: "postprocessing"}), h("dd", {text: b.postprocessing})));
      app.appendChild(h("h2", {text: "Signatures"}));
      app.appendChild(h("table", {id: "signatures"}, h("tr", {}, h("th", {text: "key id"}), h("th", {text: "algorithm"})),
        b.signatures.map(function (s) { return h("tr", {}, h("td", {}, h("code", {text: s.keyid})), h("td", {text: s.alg})); })));
      app.appendChild(h("h2", {text: "Models"}));
      app.appendChild(h("table", {id: "models"}, h("tr", {}, ["model", "file", "inputs", "outputs", "prebuilt engines"]
        .map(function (c) { return h("th", {text: c}); })), Object.keys(b.models).map(function (m) {
        var s = b.models[m], io = function (l) { return l.map(function (t) { return t.name + " " + t.dtype + " " + JSON.stringify(t.shape); }).join(", "); };
        return h("tr", {}, h("td", {text: m}), h("td", {text: s.path}), h("td", {text: io(s.inputs)}), h("td", {text: io(s.outputs)}),
          h("td", {text: Object.keys(s.engines).join(", ") || "—"}));
      })));
      app.appendChild(h("h2", {text: "Files"}));
      app.appendChild(h("table", {}, h("tr", {}, ["path", "bytes", "sha256"].map(function (c) { return h("th", {text: c}); })),
        b.files.map(function (f) { return h("tr", {}, h("td", {text: f.path}), h("td", {text: f.size}), h("td", {}, h("code", {text: f.sha256.slice(0, 16) + "…"}))); })));
    });
  }

  // ------------------------------------------------------------------------------------- router
  var REFRESH_MS = 5000;   // the overview and the devices table re-read the fleet this often
  var refresh = null;

  function schedule(hash, g) {
    clearTimeout(refresh);
    refresh = setTimeout(function () {
      if (location.hash !== hash || g !== gen) return;
      var el = document.activeElement;
      var busy = (el && /^(INPUT|SELECT)$/.test(el.tagName)) || document.getElementById("confirm").open;
      if (busy || document.hidden) schedule(hash, g); else route();
    }, REFRESH_MS);
  }

  function route() {
    if (!me) return start();
    gen++;
    if (stream) { stream.abort(); stream = null; }
    var hash = location.hash.slice(1) || "/", qi = hash.indexOf("?"), path = qi < 0 ? hash : hash.slice(0, qi), q = {};
    (qi < 0 ? "" : hash.slice(qi + 1)).split("&").forEach(function (kv) {
      if (kv) { var p = kv.split("="); q[decodeURIComponent(p[0])] = decodeURIComponent(p[1] || ""); }
    });
    var seg = path.split("/").filter(Boolean).map(decodeURIComponent);
    var nav = seg[0] === "device" ? "devices" : seg[0] === "rollout" ? "rollouts" : seg[0] === "bundle" ? "bundles" : seg[0] || "overview";
    Array.prototype.forEach.call(document.querySelectorAll("nav a"), function (a) {
      a.classList.toggle("active", a.getAttribute("data-nav") === nav);
    });
    var p = !seg.length ? overview() : seg[0] === "devices" ? devices(q) : seg[0] === "device" ? device(seg[1], q)
      : seg[0] === "rollouts" ? rollouts() : seg[0] === "rollout" ? rollout(seg[1])
      : seg[0] === "bundles" ? bundles() : seg[0] === "bundle" ? bundleView(seg[1], seg[2])
      : Promise.reject(new Error("no such page"));
    document.body.setAttribute("data-page", nav);
    var here = location.hash, mine = gen;
    return p.then(function () {
      rendered();
      if (!seg.length || seg[0] === "devices") schedule(here, mine);
    }, function (e) { fail(e); rendered(); });
  }

  document.getElementById("logout").addEventListener("click", function () { login(); });
  window.addEventListener("hashchange", route);
  start();
})();
