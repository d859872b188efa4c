// comfyui-free-guidance: draws the per-step guidance telemetry on the guidance node after a run.
//
// Data comes from the websocket event "free_guidance.telemetry" (sent by nodes/host/telemetry.py when a sampling
// run ends) and from the "free_guidance_telemetry" output of Network Evaluation Report (the same records, as
// kept in the history). The chart: one column per evaluation (step) of the guided model, left to right; the
// bar height is the effective guidance scale, a red mark at the bottom means a pass was skipped, and the
// yellow line is cosine_x0, the cond/uncond cosine of the denoised (x0) predictions (batch mean), where it was computed. Without this file nothing breaks: the data
// stays in the history.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "free_guidance.telemetry";
const CHART_H = 70;
const PAD = 8;
const COLORS = {
  background: "#14202b",
  ran: "#4caf50",
  skipped: "#e0483e",
  cosine: "#f5d142",
  text: "#c8d3dc",
};

const state = { records: new Map(), draws: 0, events: 0 };
window.__freeGuidanceTelemetry = state; // for tests and the curious

function findNode(id) {
  const graph = app.graph;
  if (!graph) return null;
  const text = String(id);
  const last = text.includes(":") ? text.split(":").pop() : text;
  return graph.getNodeById(Number(last)) ?? graph.getNodeById(last) ?? null;
}

function apply(record) {
  if (!record || record.node == null || !Array.isArray(record.steps)) return;
  state.records.set(String(record.node), record);
  const node = findNode(record.node);
  if (!node) return;
  node.freeGuidanceTelemetry = record;
  const minimum = node.computeSize ? node.computeSize()[1] : node.size[1];
  const wanted = Math.max(node.size[1], minimum + CHART_H + PAD);
  if (wanted !== node.size[1] || node.size[0] < 240) {
    node.setSize([Math.max(node.size[0], 240), wanted]);
  }
  app.graph.setDirtyCanvas(true, true);
}

function drawChart(node, ctx) {
  const record = node.freeGuidanceTelemetry;
  if (!record || node.flags?.collapsed) return;
  const steps = record.steps;
  const x0 = PAD;
  const y0 = node.size[1] - CHART_H - PAD / 2;
  const width = node.size[0] - 2 * PAD;
  const height = CHART_H;
  ctx.save();
  ctx.fillStyle = COLORS.background;
  ctx.fillRect(x0, y0, width, height);
  const plotTop = y0 + 14;
  const plotH = height - 14 - 8;
  const n = Math.max(steps.length, 1);
  const column = width / n;
  const scales = steps.map((s) => (typeof s.scale === "number" ? s.scale : 0));
  const maxScale = Math.max(1, ...scales);
  const bars = [];
  steps.forEach((step, i) => {
    const x = x0 + i * column;
    const w = Math.max(1, column - 1);
    const h = Math.max(2, (plotH * (typeof step.scale === "number" ? step.scale : maxScale / 2)) / maxScale);
    const skipped = Array.isArray(step.skipped) && step.skipped.length > 0;
    ctx.fillStyle = COLORS.ran;
    ctx.fillRect(x, plotTop + plotH - h, w, h);
    if (skipped) {
      ctx.fillStyle = COLORS.skipped;
      ctx.fillRect(x, y0 + height - 7, w, 6);
    }
    bars.push({ x, w, skipped, top: plotTop + plotH - h, bottom: plotTop + plotH });
  });
  const cosines = steps.map((s, i) => [i, s.cosine_x0]).filter(([, c]) => typeof c === "number");
  if (cosines.length > 1) {
    ctx.strokeStyle = COLORS.cosine;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    cosines.forEach(([i, c], k) => {
      const x = x0 + (i + 0.5) * column;
      const y = plotTop + plotH * (1 - (c + 1) / 2);
      if (k === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
  const skippedCount = steps.filter((s) => Array.isArray(s.skipped) && s.skipped.length > 0).length;
  ctx.fillStyle = COLORS.text;
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "top";
  ctx.fillText(`${steps.length} steps · ${skippedCount} with skipped passes`, x0 + 4, y0 + 2);
  ctx.restore();
  node.freeGuidanceChart = { x: x0, y: y0, width, height, bars };
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
      if (Array.isArray(records)) records.forEach(apply);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("FreeGuidance")) return;
    const original = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
      const result = original?.apply(this, [ctx, ...rest]);
      try {
        drawChart(this, ctx);
      } catch (error) {
        console.warn("free guidance: could not draw the telemetry chart", error);
      }
      return result;
    };
  },
});
