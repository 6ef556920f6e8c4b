/* Line charts drawn as plain SVG (no dependency). Charts.line(el, opts) replaces el's content.
   opts: {title, unit, t0, t1 (unix seconds), series: [{name, color, points: [[t, v], ...]}]} */
"use strict";
var Charts = (function () {
  var NS = "http://www.w3.org/2000/svg";
  var W = 400, H = 160, L = 46, R = 8, T = 8, B = 22;

  function node(name, attrs, text) {
    var n = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (k) { n.setAttribute(k, attrs[k]); });
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function fmt(v) {
    var a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    if (a >= 10 || v === 0) return v.toFixed(0);
    if (a >= 1) return v.toFixed(1);
    return v.toPrecision(2);
  }

  function clock(t) {
    var d = new Date(t * 1000);
    return ("0" + d.getHours()).slice(-2) + ":" + ("0" + d.getMinutes()).slice(-2);
  }

  function line(el, o) {
    el.textContent = "";
    el.className = "chart";
    var h = document.createElement("h3");
    h.textContent = o.title + (o.unit ? " (" + o.unit + ")" : "");
    el.appendChild(h);
    var svg = node("svg", {viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none", role: "img",
                           "aria-label": o.title});
    var lo = Infinity, hi = -Infinity, n = 0;
    o.series.forEach(function (s) {
      s.points.forEach(function (p) { if (p[1] !== null) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[1]); n++; } });
    });
    el.setAttribute("data-points", String(n));
    svg.appendChild(node("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#d9dee8"}));
    if (!n) {
      svg.appendChild(node("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#667085",
                                    "font-size": 12}, "no data in this window"));
      el.appendChild(svg);
      return;
    }
    if (lo > 0 && lo < hi / 3) lo = 0;
    if (hi === lo) { hi = hi + (Math.abs(hi) || 1) * 0.5; lo = lo - (Math.abs(lo) || 1) * 0.5; }
    var x = function (t) { return L + (t - o.t0) / (o.t1 - o.t0) * (W - L - R); };
    var y = function (v) { return T + (1 - (v - lo) / (hi - lo)) * (H - T - B); };
    [lo, (lo + hi) / 2, hi].forEach(function (v) {
      svg.appendChild(node("text", {x: L - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#667085"},
                           fmt(v)));
      svg.appendChild(node("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#eef1f5"}));
    });
    [o.t0, (o.t0 + o.t1) / 2, o.t1].forEach(function (t, i) {
      svg.appendChild(node("text", {x: x(t), y: H - 6, "font-size": 10, fill: "#667085",
                                    "text-anchor": ["start", "middle", "end"][i]}, clock(t)));
    });
    o.series.forEach(function (s) {
      var pts = s.points.filter(function (p) { return p[1] !== null; })
        .map(function (p) { return x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1); });
      svg.appendChild(node("polyline", {points: pts.join(" "), fill: "none", stroke: s.color, "stroke-width": 1.5,
                                        "vector-effect": "non-scaling-stroke", "class": "series"}));
      if (pts.length === 1) {
        var xy = pts[0].split(",");
        svg.appendChild(node("circle", {cx: xy[0], cy: xy[1], r: 2.5, fill: s.color}));
      }
    });
    el.appendChild(svg);
    var leg = document.createElement("div");
    leg.className = "legend";
    o.series.forEach(function (s) {
      var sp = document.createElement("span");
      sp.style.color = s.color;
      sp.textContent = "\u25A0 " + s.name;
      leg.appendChild(sp);
    });
    el.appendChild(leg);
  }

  return {line: line};
})();
