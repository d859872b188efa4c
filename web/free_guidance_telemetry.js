// comfyui-free-guidance: draws the per-step guidance telemetry on the guidance node after a run.
//
// Data comes from the websocket event "free_guidance.telemetry" (sent by nodes/host/telemetry.py when a sampling
// run ends) and from the "free_guidance_telemetry" output of Network Evaluation Report (the same records, as
// kept in the history). The chart: one column per evaluation (step) of the guided model, left to right; the
// bar height is the effective guidance scale, a red mark at the bottom means a pass was skipped, and the
// yellow line is cosine_x0, the cond/uncond cosine of the denoised (x0) predictions (batch mean), where it was computed. Without this file nothing breaks: the data
// stays in the history.
//
// The chart is a DOM widget (a <canvas> element the editor places on the node), so every renderer shows it:
// the classic LiteGraph canvas and Nodes 2.0 (Vue nodes), which never calls a node's onDrawForeground.
// The widget is never serialized: it adds nothing to widgets_values or to the prompt.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "free_guidance.telemetry";
const WIDGET = "free_guidance_chart";
const CHART_W = 320; // the canvas' own resolution; CSS stretches it to the node's width
const CHART_H = 70;
const COLORS = {
  background: "#14202b",
  ran: "#4caf50",
  skipped: "#e0483e",
  cosine: "#f5d142",
  text: "#c8d3dc",
};

// The one place that reads the record's fields (a rename in nodes/telemetry.py is a change here only).
const FIELDS = {
  scale: (step) => step.scale,
  cosine: (step) => step.cosine_x0,
  skipped: (step) => step.skipped,
};

const state = { records: new Map(), draws: 0, events: 0, executed: 0 };
window.__freeGuidanceTelemetry = state; // for tests and the curious

function findNode(id) {
  // "15:8" is node 8 inside subgraph node 15 (the editor's execution id)
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    if (!graph) return null;
    node = graph.getNodeById(Number(part)) ?? graph.getNodeById(part) ?? null;
    if (!node) return null;
    graph = node.subgraph ?? null;
  }
  return node;
}

function chartWidget(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET);
  if (existing) return existing;
  const canvas = document.createElement("canvas");
  canvas.width = CHART_W;
  canvas.height = CHART_H;
  canvas.className = "free-guidance-telemetry-chart";
  canvas.style.width = "100%";
  canvas.style.height = `${CHART_H}px`;
  canvas.style.display = "block";
  const widget = node.addDOMWidget(WIDGET, "FREE_GUIDANCE_CHART", canvas, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => CHART_H + 4,
    getHeight: () => CHART_H + 4,
  });
  widget.serialize = false; // no widgets_values entry either
  widget.chartCanvas = canvas;
  return widget;
}

function apply(record) {
  if (!record || record.node == null || !Array.isArray(record.steps)) return;
  state.records.set(String(record.node), record);
  const node = findNode(record.node);
  if (!node || typeof node.addDOMWidget !== "function") return;
  node.freeGuidanceTelemetry = record;
  const widget = chartWidget(node);
  drawChart(node, widget.chartCanvas);
  const wanted = node.computeSize ? node.computeSize() : node.size;
  if (node.size[0] < 240 || node.size[1] < wanted[1]) {
    node.setSize([Math.max(node.size[0], 240), Math.max(node.size[1], wanted[1])]);
  }
  app.graph.setDirtyCanvas(true, true);
}

function isSkipped(step) {
  const skipped = FIELDS.skipped(step);
  return Array.isArray(skipped) && skipped.length > 0;
}

function drawChart(node, canvas) {
  const record = node.freeGuidanceTelemetry;
  const ctx = canvas.getContext("2d");
  if (!record || !ctx) return;
  const steps = record.steps;
  const width = canvas.width;
  const height = canvas.height;
  ctx.save();
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = COLORS.background;
  ctx.fillRect(0, 0, width, height);
  const plotTop = 14;
  const plotH = height - 14 - 8;
  const n = Math.max(steps.length, 1);
  const column = width / n;
  const scales = steps.map((s) => (typeof FIELDS.scale(s) === "number" ? FIELDS.scale(s) : 0));
  const maxScale = Math.max(1, ...scales);
  const bars = [];
  steps.forEach((step, i) => {
    const x = Math.round(i * column);
    const w = Math.max(1, Math.round((i + 1) * column) - x - 1);
    const scale = FIELDS.scale(step);
    const h = Math.max(2, Math.round((plotH * (typeof scale === "number" ? scale : maxScale / 2)) / maxScale));
    const skipped = isSkipped(step);
    ctx.fillStyle = COLORS.ran;
    ctx.fillRect(x, plotTop + plotH - h, w, h);
    if (skipped) {
      ctx.fillStyle = COLORS.skipped;
      ctx.fillRect(x, height - 7, w, 6);
    }
    bars.push({ x, w, skipped, top: plotTop + plotH - h, bottom: plotTop + plotH });
  });
  const cosines = steps.map((s, i) => [i, FIELDS.cosine(s)]).filter(([, c]) => typeof c === "number");
  if (cosines.length > 1) {
    ctx.strokeStyle = COLORS.cosine;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    cosines.forEach(([i, c], k) => {
      const x = (i + 0.5) * column;
      const y = plotTop + plotH * (1 - (c + 1) / 2);
      if (k === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
  const skippedCount = steps.filter(isSkipped).length;
  ctx.fillStyle = COLORS.text;
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "top";
  ctx.fillText(`${steps.length} steps · ${skippedCount} with skipped passes`, 4, 2);
  ctx.restore();
  // in the canvas element's own pixels, for tests
  node.freeGuidanceChart = { width, height, bars };
  state.draws += 1;
}

app.registerExtension({
  name: "FreeGuidance.Telemetry",
  setup() {
    api.addEventListener(EVENT, (event) => {
      state.events += 1;
      apply(event.detail);
    });
    api.addEventListener("executed", (event) => {
      const records = event.detail?.output?.free_guidance_telemetry;
      if (Array.isArray(records)) {
        state.executed += 1;
        records.forEach(apply);
      }
    });
  },
});
