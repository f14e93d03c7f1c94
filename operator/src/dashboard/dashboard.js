// The pretrain dashboard's only script, no dependencies: it refreshes the parts of the page marked
// `data-refresh` from the server, and draws the training curves from `metrics.jsonl`, read
// incrementally (each request asks for the lines after the last one it has).
"use strict";

const every = Number(document.body.dataset.refreshMs || 2000);

async function refreshParts() {
  for (const part of document.querySelectorAll("[data-refresh]")) {
    try {
      const response = await fetch(part.dataset.refresh, { cache: "no-store" });
      if (response.ok) {
        const html = await response.text();
        if (part.innerHTML !== html) part.innerHTML = html;
      }
    } catch (_) {
      // The server is away (a restarting operator, a finished `pretrain run`): try again later.
    }
  }
}

// Each training stage's lines so far, and where to read on.
const followed = {};

async function follow(base, stage) {
  const state = (followed[stage] ||= { offset: 0, mark: null, lines: [] });
  for (let pages = 0; pages < 8; pages++) {
    const query = `offset=${state.offset}` + (state.mark === null ? "" : `&mark=${state.mark}`);
    const response = await fetch(`${base}/${stage}?${query}`, { cache: "no-store" });
    if (!response.ok) return false;
    const chunk = await response.json();
    if (chunk.reset) state.lines = [];
    state.lines.push(...chunk.lines);
    state.offset = chunk.next;
    state.mark = chunk.mark;
    if (!chunk.more) break;
  }
  return true;
}

// At most this many points a series: evenly spaced lines, the last one always kept.
const MAX_POINTS = 1500;

function thin(points) {
  if (points.length <= MAX_POINTS) return points;
  const stride = points.length / MAX_POINTS;
  const kept = [];
  for (let i = 0; i < MAX_POINTS - 1; i++) kept.push(points[Math.floor(i * stride)]);
  kept.push(points[points.length - 1]);
  return kept;
}

const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
const SVG = "http://www.w3.org/2000/svg";

function number(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

function element(name, attributes, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attributes)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Draws `series` ([{name, points: [[x, y]]}]) into `svg`, with its ranges and a legend.
function draw(svg, series) {
  const [W, H, left, right, top, bottom] = [480, 220, 56, 8, 20, 28];
  const all = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  svg.replaceChildren();
  svg.dataset.points = String(series.reduce((n, s) => n + s.count, 0));
  if (!all.length) {
    svg.append(element("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "none" }, "no steps yet"));
    return;
  }
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of all) [x0, x1, y0, y1] = [Math.min(x0, x), Math.max(x1, x), Math.min(y0, y), Math.max(y1, y)];
  if (x1 <= x0) x1 = x0 + 1;
  if (y1 <= y0) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * (W - left - right);
  const sy = (y) => H - bottom - ((y - y0) / (y1 - y0)) * (H - top - bottom);
  svg.append(element("rect", { x: left, y: top, width: W - left - right, height: H - top - bottom, class: "frame" }));
  svg.append(element("text", { x: left - 4, y: top + 4, "text-anchor": "end", class: "tick" }, number(y1)));
  svg.append(element("text", { x: left - 4, y: H - bottom, "text-anchor": "end", class: "tick" }, number(y0)));
  svg.append(element("text", { x: left, y: H - 8, class: "tick" }, number(x0)));
  svg.append(element("text", { x: W - right, y: H - 8, "text-anchor": "end", class: "tick" }, `${number(x1)} tokens`));
  let legend = left + 6;
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const path = thin(s.points).map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
    svg.append(element("polyline", { points: path, fill: "none", stroke: color, "stroke-width": 1.5, "data-series": s.name, "data-count": s.count }));
    // Each name after the one before it (about 6.5 px a character at 11 px).
    svg.append(element("text", { x: legend, y: 14, fill: color, class: "legend" }, s.name));
    legend += s.name.length * 6.5 + 12;
  });
}

async function drawCurves() {
  const curves = document.getElementById("curves");
  if (!curves) return;
  for (const stage of curves.dataset.stages.split(" ")) {
    try {
      await follow(curves.dataset.metrics, stage);
    } catch (_) {
      return;
    }
  }
  const train = (followed["train"] || { lines: [] }).lines;
  const long = (followed["long-context"] || { lines: [] }).lines;
  // Long-context continues where train ended, on the token axis.
  const offset = train.length ? train[train.length - 1].tokens : 0;
  const series = (name, lines, shift, y) => {
    const points = lines.filter((l) => y(l) !== undefined && y(l) !== null).map((l) => [l.tokens + shift, y(l)]);
    return { name, points, count: points.length };
  };
  const both = (y, heldOut) => {
    const out = [series("train", train, 0, y), series("long-context", long, offset, y)];
    if (heldOut) out.push(series("held-out", train, 0, (l) => l.heldoutLoss), series("long-context held-out", long, offset, (l) => l.heldoutLoss));
    return out.filter((s) => s.count > 0);
  };
  const charts = {
    "chart-loss": both((l) => l.loss, true),
    "chart-lr": both((l) => l.lr),
    "chart-throughput": both((l) => l.tokensPerSecond),
    "chart-grad-norm": both((l) => l.gradNorm),
  };
  for (const [id, series] of Object.entries(charts)) {
    const svg = document.getElementById(id);
    if (svg) draw(svg, series);
  }
}

async function tick() {
  await Promise.all([refreshParts(), drawCurves()]);
  setTimeout(tick, every);
}

drawCurves().then(() => setTimeout(tick, every));
