// Line charts in SVG (no library).

export const COLORS = ["#2f6fdb", "#d9480f", "#2b8a3e", "#7048e8"];

export function svg(tag, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

export function niceTicks(lo, hi, count) {
  if (lo === hi) { lo -= 1; hi += 1; }
  const step = (hi - lo) / (count - 1);
  return Array.from({ length: count }, (_, i) => lo + i * step);
}

// series: [{name, color, points: [[x, y], ...]}]; one <circle class="point"> per point.
export function lineChart(series, xLabel, yLabel) {
  const W = 640, H = 300, L = 64, R = 16, T = 28, B = 44;
  const all = series.flatMap((s) => s.points);
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const pad = (y1 - y0) * 0.08;
  y0 -= pad; y1 += pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": yLabel + " against " + xLabel });
  root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  root.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  const distinct = [...new Set(xs)].sort((a, b) => a - b);
  for (const t of distinct.length <= 12 ? distinct : niceTicks(x0, x1, 6)) {
    root.append(svg("text", { x: X(t), y: H - B + 16, "text-anchor": "middle", class: "tick" }, +t.toFixed(2)));
  }
  for (const t of niceTicks(y0, y1, 5)) {
    root.append(svg("text", { x: L - 6, y: Y(t) + 4, "text-anchor": "end", class: "tick" }, +t.toFixed(2)));
  }
  root.append(svg("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle", class: "tick" }, xLabel));
  root.append(svg("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", class: "tick",
    transform: `rotate(-90 14 ${(T + H - B) / 2})` }, yLabel));
  series.forEach((s, k) => {
    const d = s.points.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join(" ");
    root.append(svg("path", { d, class: "line", stroke: s.color }));
    for (const p of s.points) {
      const dot = svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3.5, fill: s.color, class: "point" });
      dot.append(svg("title", {}, `${xLabel} ${p[0]}: ${yLabel} ${p[1].toFixed(4)}`));
      root.append(dot);
    }
    root.append(svg("text", { x: L + 8 + k * 150, y: 16, fill: s.color, "font-size": 12 }, s.name));
  });
  return root;
}
