// The per-character page: the version history from GET /v1/characters/{name}/versions, drawn as inline SVG bar
// charts (thumbs-down rate per version; eval loss base / replaced / serving of the serving run) plus a table.
"use strict";

const api = "..";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// A horizontal bar chart: one labelled bar per {label, value, text, className}; values scaled to `max`.
function barChart(title, bars, max) {
  const row = 28, labelWidth = 150, width = 400;
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${bars.length * row + 8}`, role: "img" });
  svg.append(svgElement("title", {}, title));
  bars.forEach((bar, i) => {
    const y = i * row + 4;
    const length = max > 0 ? ((width - labelWidth - 60) * bar.value) / max : 0;
    svg.append(svgElement("text", { x: 0, y: y + 17 }, bar.label));
    svg.append(svgElement("rect", { x: labelWidth, y, width: Math.max(length, 1), height: row - 8,
                                    class: bar.className }));
    svg.append(svgElement("text", { x: labelWidth + length + 4, y: y + 17 }, bar.text));
  });
  return svg;
}

function versionLabel(version) { return version.version ?? "imported"; }

function drawFeedback(versions) {
  const rated = versions.filter((v) => v.feedback);
  const bars = rated.map((v) => ({
    label: versionLabel(v) + (v.serving ? " ★" : ""),
    value: v.feedback.down_rate,
    text: `${Math.round(v.feedback.down_rate * 100)}% of ${v.feedback.rated}`,
    className: "bar-down",
  }));
  const chart = $("feedback-chart");
  chart.replaceChildren(bars.length ? barChart("thumbs-down rate per version", bars, 1) : "No rated replies yet.");
  const body = $("feedback-table").querySelector("tbody");
  body.replaceChildren(...rated.map((v) => {
    const row = document.createElement("tr");
    for (const cell of [versionLabel(v), v.feedback.up, v.feedback.down, `${Math.round(v.feedback.down_rate * 100)}%`]) {
      const td = document.createElement("td");
      td.textContent = String(cell);
      row.append(td);
    }
    return row;
  }));
}

function drawEval(versions) {
  const serving = versions.find((v) => v.serving);
  const metrics = serving?.metrics;
  const chart = $("eval-chart");
  if (!metrics) { chart.replaceChildren("No adapter serves: no eval metrics."); return; }
  const losses = [
    ["base model", metrics.eval_loss_base, "bar-loss"],
    ["replaced version", metrics.eval_loss_serving, "bar-loss"],
    [`${serving.version} (serving)`, metrics.eval_loss_adapter, "bar-loss serving"],
  ].filter(([, value]) => typeof value === "number");
  const max = Math.max(...losses.map(([, value]) => value));
  const bars = losses.map(([label, value, className]) => ({ label, value, text: value.toFixed(3), className }));
  chart.replaceChildren(barChart("eval loss of the serving run", bars, max));
}

async function load() {
  const name = new URLSearchParams(location.search).get("name") || "lumina";
  $("title").textContent = `${name}: versions`;
  $("chat-link").href = `index.html?character=${encodeURIComponent(name)}`;
  const response = await fetch(`${api}/v1/characters/${encodeURIComponent(name)}/versions`);
  if (!response.ok) throw new Error(`versions: HTTP ${response.status}`);
  const history = await response.json();
  $("serving-version").textContent = history.serving_version ?? "loading";
  drawFeedback(history.versions);
  drawEval(history.versions);
  document.body.dataset.loaded = "true";
}

document.addEventListener("DOMContentLoaded", () => {
  load().catch((error) => { $("status").textContent = String(error.message || error); });
});
