// The crackmap web map: the store's collections as vector tiles from this server's OGC API.
// Cracks coloured by severity with their type as line style, sections by condition class,
// pattern areas shaded, scene footprints outlined.  Styling uses crack_type, severity and
// condition_class when the store has them and falls back to plain styles when not.
"use strict";

const BASE = location.href.replace(/[?#].*$/, "").replace(/[^/]*$/, "");  // this page's folder
const SEVERITY_COLOURS = { low: "#e6b800", medium: "#e67e22", high: "#c0392b" };
const CONDITION_COLOURS = { Good: "#27ae60", Fair: "#f1c40f", Poor: "#c0392b" };
// line style per crack type: one layer each (dash patterns are not data-driven everywhere)
const TYPE_DASHES = {
  longitudinal: null, transverse: [3, 1.5], diagonal: [1, 1.5], joint: [5, 2, 1, 2], pattern: [0.5, 1],
};
const CRACKS = "current_cracks";
const state = { filters: {}, crackLayers: [], haloLayers: [], surveyLayers: [], collections: {}, props: {},
                rasters: new Set() };
const MAX_RASTERS = 60;  // scenes drawn at once

async function getJSON(path) {
  const response = await fetch(BASE + path, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function tiles(id) {
  return {
    type: "vector", minzoom: 0, maxzoom: 20,
    tiles: [`${BASE}ogc/collections/${encodeURIComponent(id)}/tiles/WebMercatorQuad/{z}/{x}/{y}`],
  };
}

function matchColour(property, colours, fallback) {
  const expression = ["match", ["to-string", ["get", property]]];
  for (const [value, colour] of Object.entries(colours)) expression.push(value, colour);
  expression.push(fallback);
  return expression;
}

async function queryables(id) {
  try {
    return Object.keys((await getJSON(`ogc/collections/${id}/queryables?f=schemajson`)).properties || {});
  } catch (error) {
    console.warn(error);
    return [];
  }
}

function addCrackLayers(map, props) {
  const colour = props.includes("severity") ? matchColour("severity", SEVERITY_COLOURS, "#7f8c8d") : "#c0392b";
  const width = ["interpolate", ["linear"], ["zoom"], 12, 1, 18, 2.5, 22, 5];
  const types = props.includes("crack_type") ? Object.keys(TYPE_DASHES) : [null];
  // a white halo under every crack keeps the lines readable over section colours
  map.addLayer({ id: "cracks-halo", type: "line", source: CRACKS, "source-layer": CRACKS,
                 layout: { "line-cap": "round" },
                 paint: { "line-color": "#ffffff", "line-opacity": 0.85,
                          "line-width": ["interpolate", ["linear"], ["zoom"], 12, 2.5, 18, 5, 22, 8] } });
  state.haloLayers.push({ id: "cracks-halo", base: null });
  for (const type of types) {
    const id = type ? `cracks-${type}` : "cracks";
    const paint = { "line-color": colour, "line-width": width };
    if (type && TYPE_DASHES[type]) paint["line-dasharray"] = TYPE_DASHES[type];
    let base = null;
    if (type === "longitudinal") {  // and every value the legend does not know
      base = ["!", ["in", ["to-string", ["get", "crack_type"]], ["literal", types.slice(1)]]];
    } else if (type) {
      base = ["==", ["get", "crack_type"], type];
    }
    map.addLayer({ id, type: "line", source: CRACKS, "source-layer": CRACKS,
                   layout: { "line-cap": "round" }, paint, ...(base ? { filter: base } : {}) });
    state.crackLayers.push({ id, base });
  }
}

function addLayers(map) {
  const have = state.collections;
  if (have.scenes) {
    map.addSource("scenes", tiles("scenes"));
    map.addLayer({ id: "scenes", type: "line", source: "scenes", "source-layer": "scenes",
                   paint: { "line-color": "#34495e", "line-width": 1, "line-dasharray": [2, 2] } });
    state.surveyLayers.push({ id: "scenes", base: null });
  }
  // the current versions where the store has the views; sections at the section level only
  // (crackmap sections also writes 100 m rollups and whole roads into the same layer)
  const sections = have.current_sections ? "current_sections" : "sections";
  if (have[sections]) {
    const props = state.props[sections];
    const colour = props.includes("condition_class")
      ? matchColour("condition_class", CONDITION_COLOURS, "#95a5a6") : "#95a5a6";
    const base = props.includes("level") ? ["==", ["get", "level"], "section"] : null;
    map.addSource("sections", tiles(sections));
    map.addLayer({ id: "sections", type: "fill", source: "sections", "source-layer": sections,
                   paint: { "fill-color": colour, "fill-opacity": 0.3, "fill-outline-color": "#2c3e50" },
                   ...(base ? { filter: base } : {}) });
    if (props.includes("survey_id")) state.surveyLayers.push({ id: "sections", base });
  }
  const areas = have.current_pattern_areas ? "current_pattern_areas" : "pattern_areas";
  if (have[areas]) {
    map.addSource("pattern_areas", tiles(areas));
    map.addLayer({ id: "pattern_areas", type: "fill", source: "pattern_areas", "source-layer": areas,
                   paint: { "fill-color": "#8e44ad", "fill-opacity": 0.3, "fill-outline-color": "#5b2c6f" } });
    if (state.props[areas].includes("survey_id")) state.surveyLayers.push({ id: "pattern_areas", base: null });
  }
  if (have[CRACKS]) {
    map.addSource(CRACKS, tiles(CRACKS));
    addCrackLayers(map, state.props[CRACKS]);
  }
}

function legend() {
  const rows = [];
  if (state.collections[CRACKS]) {
    rows.push("<h2>Cracks by severity</h2>");
    for (const [name, colour] of Object.entries(SEVERITY_COLOURS)) {
      rows.push(`<div class="row"><span class="swatch" style="border-color:${colour}"></span>${name}</div>`);
    }
    if (state.props[CRACKS].includes("crack_type")) {
      rows.push("<h2>Type (line style)</h2>");
      for (const [type, dashes] of Object.entries(TYPE_DASHES)) {  // the map's dashes, in line widths
        const dash = dashes ? ` stroke-dasharray="${dashes.map((d) => Math.max(d * 2.5, 0.5)).join(" ")}"` : "";
        rows.push(`<div class="row"><svg width="26" height="6"><line x1="0" y1="3" x2="26" y2="3" `
                  + `stroke="#555" stroke-width="2.5"${dash}/></svg>${type}</div>`);
      }
    }
  }
  const sections = state.collections.current_sections ? "current_sections" : "sections";
  if (state.collections[sections] && state.props[sections].includes("condition_class")) {
    rows.push("<h2>Sections by condition</h2>");
    for (const [name, colour] of Object.entries(CONDITION_COLOURS)) {
      rows.push(`<div class="row"><span class="box" style="background:${colour}"></span>${name}</div>`);
    }
  }
  if (state.collections.pattern_areas || state.collections.current_pattern_areas) {
    rows.push('<h2>Areas</h2><div class="row"><span class="box" style="background:#8e44ad"></span>pattern (alligator / block)</div>');
  }
  if (state.collections.scenes) {
    rows.push('<div class="row"><span class="swatch" style="border-top-style:dashed;border-color:#34495e"></span>scene footprint</div>');
  }
  document.getElementById("legend").innerHTML = rows.join("");
}

function applyFilters(map) {
  const { survey, model, severity, type } = state.filters;
  const common = [];
  if (survey) common.push(["==", ["get", "survey_id"], survey]);
  const cracks = [...common];
  if (model) {
    const [name, version] = model.split(":");
    cracks.push(["==", ["get", "model_name"], name], ["==", ["get", "model_version"], version]);
  }
  if (severity) cracks.push(["==", ["get", "severity"], severity]);
  if (type) cracks.push(["==", ["get", "crack_type"], type]);
  const set = (layers, conditions) => {
    for (const { id, base } of layers) {
      const all = [...(base ? [base] : []), ...conditions];
      map.setFilter(id, all.length ? ["all", ...all] : null);
    }
  };
  set(state.crackLayers, cracks);
  set(state.haloLayers, cracks);
  set(state.surveyLayers, common);
}

async function fillFilters(map) {
  const surveys = new Set();
  const models = new Set();
  if (state.collections.scenes) {
    const scenes = await getJSON("ogc/collections/scenes/items?f=geojson&limit=10000&properties=survey_id,model_name,model_version");
    for (const f of scenes.features) {
      surveys.add(f.properties.survey_id);
      models.add(`${f.properties.model_name}:${f.properties.model_version}`);
    }
  }
  const options = (id, values) => {
    const select = document.getElementById(id);
    for (const value of [...values].sort()) select.add(new Option(value, value));
  };
  options("f-survey", surveys);
  options("f-model", models);
  if (state.collections[CRACKS] && state.props[CRACKS].includes("crack_type")) {
    document.getElementById("f-type-label").hidden = false;
    options("f-type", Object.keys(TYPE_DASHES));
  }
  if (state.collections.scenes) {
    document.getElementById("f-raster-label").hidden = false;
    document.getElementById("f-raster").addEventListener("change", (event) => {
      state.filters.raster = event.target.value;
      clearRasters(map);
      showRasters(map).catch((error) => console.warn(error));
    });
    map.on("moveend", () => showRasters(map).catch((error) => console.warn(error)));
  }
  for (const [key, id] of [["survey", "f-survey"], ["model", "f-model"], ["severity", "f-severity"], ["type", "f-type"]]) {
    document.getElementById(id).addEventListener("change", (event) => {
      state.filters[key] = event.target.value;
      applyFilters(map);
    });
  }
}

// The survey image or crack-probability raster of the scenes in view (rendered by the server
// from the COGs the store names), under the vector layers; added as the view moves.
async function showRasters(map) {
  const kind = state.filters.raster;
  if (!kind) return;
  const b = map.getBounds();
  const clamp = (v, limit) => Math.max(-limit, Math.min(limit, v)).toFixed(7);
  const bbox = [clamp(b.getWest(), 180), clamp(b.getSouth(), 90), clamp(b.getEast(), 180), clamp(b.getNorth(), 90)];
  const scenes = await getJSON(`ogc/collections/scenes/items?f=geojson&limit=${MAX_RASTERS}&bbox=${bbox.join(",")}`
                               + "&properties=survey_id,scene_id");
  if (kind !== state.filters.raster) return;  // changed while we waited
  const below = ["scenes", "sections", "pattern_areas", "cracks-halo"].find((id) => map.getLayer(id));
  for (const feature of scenes.features) {
    const { survey_id: survey, scene_id: scene } = feature.properties;
    const id = `raster:${kind}:${survey}/${scene}`;
    if (state.rasters.has(id) || state.rasters.size >= MAX_RASTERS || !feature.geometry) continue;
    const points = feature.geometry.coordinates.flat(Infinity);  // x, y, x, y, ...
    const xs = [], ys = [];
    for (let i = 0; i < points.length; i += 2) { xs.push(points[i]); ys.push(points[i + 1]); }
    const query = `survey=${encodeURIComponent(survey)}&scene=${encodeURIComponent(scene)}`;
    map.addSource(id, {
      type: "raster", tileSize: 256, minzoom: 10, maxzoom: 24,
      bounds: [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)],
      tiles: [`${BASE}raster/${kind}/{z}/{x}/{y}.png?${query}`],
    });
    map.addLayer({ id, type: "raster", source: id, paint: { "raster-opacity": kind === "image" ? 1 : 0.85 } }, below);
    state.rasters.add(id);
  }
}

function clearRasters(map) {
  for (const id of state.rasters) {
    map.removeLayer(id);
    map.removeSource(id);
  }
  state.rasters.clear();
}

function escapeHTML(value) {
  return String(value).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function showPopup(map, event) {
  const layers = [...state.crackLayers.map((l) => l.id), "pattern_areas", "sections", "scenes"]
    .filter((id) => map.getLayer(id));
  const { x, y } = event.point;
  const found = map.queryRenderedFeatures([[x - 4, y - 4], [x + 4, y + 4]], { layers });
  if (!found.length) return;
  const feature = found[0];
  const rows = Object.entries(feature.properties)
    .map(([key, value]) => `<tr><th>${escapeHTML(key)}</th><td>${escapeHTML(value)}</td></tr>`).join("");
  new maplibregl.Popup({ maxWidth: "360px" }).setLngLat(event.lngLat)
    .setHTML(`<h3>${escapeHTML(feature.sourceLayer)}</h3><table>${rows}</table>`).addTo(map);
}

async function main() {
  // the catalog first: the map opens on the data, so no tile of the whole world is asked for
  const catalog = await getJSON("ogc/collections?f=json");
  for (const collection of catalog.collections) state.collections[collection.id] = collection;
  for (const id of [CRACKS, "sections", "current_sections", "pattern_areas", "current_pattern_areas"]) {
    if (state.collections[id]) state.props[id] = await queryables(id);
  }
  const focus = state.collections[CRACKS] || state.collections.scenes;
  const bbox = focus && focus.extent && focus.extent.spatial && focus.extent.spatial.bbox[0];
  const view = bbox && bbox[0] <= bbox[2]
    ? { bounds: [[bbox[0], bbox[1]], [bbox[2], bbox[3]]], fitBoundsOptions: { padding: 40, maxZoom: 21 } }
    : { center: [0, 0], zoom: 1 };
  const map = new maplibregl.Map({
    container: "map",
    style: { version: 8, sources: {}, layers: [{ id: "background", type: "background", paint: { "background-color": "#f4f1ea" } }] },
    attributionControl: false, ...view,
  });
  window.crackmap = { map, state, ready: false };
  map.addControl(new maplibregl.NavigationControl(), "top-right");
  map.addControl(new maplibregl.ScaleControl({ unit: "metric" }), "bottom-right");
  await new Promise((resolve) => (map.loaded() ? resolve() : map.once("load", resolve)));
  addLayers(map);
  legend();
  await fillFilters(map);
  map.on("click", (event) => showPopup(map, event));
  for (const { id } of state.crackLayers) {
    map.on("mouseenter", id, () => { map.getCanvas().style.cursor = "pointer"; });
    map.on("mouseleave", id, () => { map.getCanvas().style.cursor = ""; });
  }
  map.once("idle", () => { window.crackmap.ready = true; });
}

main().catch((error) => {
  console.error(error);
  document.getElementById("legend").textContent = `The map could not load: ${error.message}`;
});
