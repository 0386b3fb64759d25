// Bar and line charts drawn as inline SVG: a plotting library would have to be shipped with the
// package (the page loads nothing from the internet), and two chart kinds are a few dozen lines each.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  // One colour per chosen run, the same in every chart of the comparison (Tableau 10).
  const COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
                   "#ff9da7", "#9c755f", "#bab0ac"];

  function el(tag, attrs = {}, text = null) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== null) node.textContent = TextSafe.visible(text);
    return node;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
    if (Number.isInteger(v)) return v.toLocaleString("en");
    return a < 10 ? v.toFixed(3) : v.toLocaleString("en", {maximumFractionDigits: 1});
  }

  // Tick labels are round numbers: as short as they can be ("2.5", not "2.500").
  const tick = t => Math.abs(t) >= 1e4 ? t.toLocaleString("en") : String(+t.toPrecision(6));

  // About n round tick values; the first is at or below lo and the last at or above hi, so the ticks
  // are also the plot's domain and no point falls outside it.
  function ticks(lo, hi, n = 5) {
    if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
    const raw = (hi - lo) / n;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw);
    const first = Math.floor(lo / step + 1e-9), last = Math.ceil(hi / step - 1e-9);
    const out = [];
    for (let i = first; i <= last; i++) out.push(+(i * step).toPrecision(12));
    return out;
  }

  // items: [{label, value, colour, best}]; horizontal bars so long run labels stay readable.
  function bars(items, title) {
    const rowH = 26, left = 190, right = 90, width = 640, top = 28;
    const height = top + items.length * rowH + 24;
    const svg = el("svg", {class: "chart bars", width, height, viewBox: `0 0 ${width} ${height}`,
                           role: "img", "aria-label": title});
    svg.appendChild(el("text", {x: 0, y: 16, class: "title"}, title));
    const values = items.map(i => i.value).filter(v => v !== null && v !== undefined);
    const lo = Math.min(0, ...values), hi = Math.max(0, ...values);
    const span = hi - lo || 1, plotW = width - left - right;
    const x = v => left + ((v - lo) / span) * plotW;
    svg.appendChild(el("line", {x1: x(0), x2: x(0), y1: top - 4, y2: top + items.length * rowH, class: "axis"}));
    items.forEach((item, i) => {
      const y = top + i * rowH;
      svg.appendChild(el("text", {x: left - 8, y: y + rowH / 2 + 4, "text-anchor": "end", class: "label"},
                         item.label.length > 28 ? item.label.slice(0, 27) + "…" : item.label));
      if (item.value === null || item.value === undefined) {
        svg.appendChild(el("text", {x: x(0) + 6, y: y + rowH / 2 + 4, class: "dim"}, "no value"));
        return;
      }
      const x0 = Math.min(x(0), x(item.value)), w = Math.max(Math.abs(x(item.value) - x(0)), 1);
      const bar = el("rect", {x: x0, y: y + 4, width: w, height: rowH - 8, fill: item.colour, class: "bar"});
      bar.appendChild(el("title", {}, `${item.label}: ${item.value}`));
      svg.appendChild(bar);
      svg.appendChild(el("text", {x: Math.max(x(item.value), x(0)) + 6, y: y + rowH / 2 + 4, class: "value"},
                         fmt(item.value) + (item.best ? " ★" : "")));
    });
    return svg;
  }

  // series: [{label, colour, x: [], y: []}]; a null y is a gap in the line.
  function lines(series, title) {
    const legendRows = Math.ceil(series.length / 3);  // three labels to a legend row
    const m = {left: 64, right: 16, top: 28, bottom: 44 + 16 * legendRows};
    const width = 640, height = 236 + m.bottom;
    const svg = el("svg", {class: "chart lines", width, height, viewBox: `0 0 ${width} ${height}`,
                           role: "img", "aria-label": title});
    svg.appendChild(el("text", {x: 0, y: 16, class: "title"}, title));
    const xs = series.flatMap(s => s.x), ys = series.flatMap(s => s.y).filter(v => v !== null);
    if (!ys.length) {
      svg.appendChild(el("text", {x: m.left, y: height / 2, class: "dim"}, "no values"));
      return svg;
    }
    const xt = ticks(Math.min(...xs), Math.max(...xs)), yt = ticks(Math.min(...ys), Math.max(...ys));
    const [x0, x1, y0, y1] = [xt[0], xt[xt.length - 1], yt[0], yt[yt.length - 1]];
    const pw = width - m.left - m.right, ph = height - m.top - m.bottom;
    const X = v => m.left + ((v - x0) / (x1 - x0 || 1)) * pw;
    const Y = v => m.top + ph - ((v - y0) / (y1 - y0 || 1)) * ph;
    for (const t of yt) {
      svg.appendChild(el("line", {x1: m.left, x2: m.left + pw, y1: Y(t), y2: Y(t), class: "grid"}));
      svg.appendChild(el("text", {x: m.left - 6, y: Y(t) + 4, "text-anchor": "end", class: "tick"}, tick(t)));
    }
    for (const t of xt) {
      svg.appendChild(el("text", {x: X(t), y: m.top + ph + 16, "text-anchor": "middle", class: "tick"}, tick(t)));
    }
    svg.appendChild(el("text", {x: m.left + pw / 2, y: m.top + ph + 32, "text-anchor": "middle", class: "dim"},
                       "step"));
    series.forEach((s, i) => {
      let d = "", pen = "M";
      s.x.forEach((xv, j) => {
        if (s.y[j] === null) { pen = "M"; return; }
        d += `${pen}${X(xv).toFixed(1)},${Y(s.y[j]).toFixed(1)} `;
        pen = "L";
        // A point with gaps (or nothing) on both sides draws no line: mark it so it is not lost.
        const alone = (j === 0 || s.y[j - 1] === null) && (j === s.x.length - 1 || s.y[j + 1] === null);
        if (alone) svg.appendChild(el("circle", {cx: X(xv), cy: Y(s.y[j]), r: 3, fill: s.colour, class: "point"}));
      });
      const path = el("path", {d, stroke: s.colour, class: "curve", fill: "none"});
      path.appendChild(el("title", {}, s.label));
      svg.appendChild(path);
      const lx = m.left + (i % 3) * 190, ly = m.top + ph + 52 + Math.floor(i / 3) * 16;
      svg.appendChild(el("rect", {x: lx, y: ly - 9, width: 12, height: 4, fill: s.colour}));
      svg.appendChild(el("text", {x: lx + 16, y: ly - 4, class: "label"},
                         s.label.length > 26 ? s.label.slice(0, 25) + "…" : s.label));
    });
    return svg;
  }

  return {bars, lines, fmt, colour: i => COLOURS[i % COLOURS.length]};
})();
