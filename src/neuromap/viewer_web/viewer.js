// NeuroMap's result viewer: NiiVue (niivue.umd.js, shipped next to this file, so nothing is fetched from a CDN)
// inside a Streamlit component iframe.
//
// Why hand-written rather than the `niivue-streamlit` component: that component takes only four display settings
// (crosshair, radiological, colorbar, interpolation) and named colormaps for overlays, so it cannot colour a label
// map per label, set label opacity, show window/level values or report the crosshair position in mm. This file
// speaks Streamlit's component protocol directly (three postMessage types, no npm build step) and drives NiiVue's
// own API for everything else: linked multiplanar views with crosshair, click to navigate, zoom/pan,
// window/level, label look-up tables, radiological/neurological convention, orientation letters, 3D render.

"use strict";

const { Niivue, NVImage, SLICE_TYPE, SHOW_RENDER, MULTIPLANAR_TYPE, DRAG_MODE } = window.niivue;
const PLANES = [["axial", 2, "z", ["I", "S"]], ["coronal", 1, "y", ["P", "A"]], ["sagittal", 0, "x", ["L", "R"]]];

// ---- Streamlit component protocol (what streamlit-component-lib does, in three functions)
function toStreamlit(type, data) {
  window.parent.postMessage({ isStreamlitMessage: true, type, ...data }, "*");
}
function setFrameHeight() {
  toStreamlit("streamlit:setFrameHeight", { height: document.documentElement.scrollHeight });
}
window.addEventListener("message", (event) => {
  if (event.data && event.data.type === "streamlit:render") {
    render(event.data.args).catch(showError);
  }
});

function showError(error) {
  const box = document.getElementById("error");
  box.hidden = false;
  box.textContent = `The viewer could not start: ${error.message || error}. The downloads and the overlay picture ` +
    "still hold the result.";
  setFrameHeight();
}

// ---- state of one result
let shown = null; // the result currently loaded (its run id)
let nv = null; // 2D views
let nv3d = null; // 3D render of the labels
const images = {}; // sequence key -> NVImage
let labels = null; // NVImage of the whole label map: read once, split into `layers`, and the 3D view's source
let layers = []; // one NVImage per label in the 2D views, in args.label_info order
let labels3d = null;
let extra = null; // optional extra overlay (e.g. an uncertainty map)
let args = null;

function blobUrl(bytes) {
  return URL.createObjectURL(new Blob([bytes], { type: "application/octet-stream" }));
}

async function loadImage(bytes, name, options = {}) {
  return NVImage.loadFromUrl({ url: blobUrl(bytes), name, ...options });
}

// Label look-up table in NiiVue's format for `items`; a hidden label gets alpha 0.
function labelLut(items = args.label_info) {
  const lut = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: [""] };
  for (const item of items) {
    const hex = item.colour.replace("#", "");
    lut.R.push(parseInt(hex.slice(0, 2), 16));
    lut.G.push(parseInt(hex.slice(2, 4), 16));
    lut.B.push(parseInt(hex.slice(4, 6), 16));
    lut.A.push(item.visible ? 255 : 0);
    lut.I.push(item.value);
    lut.labels.push(item.name);
  }
  return lut;
}

// NiiVue blends each volume at one opacity (a look-up table's alpha between 0 and 255 is not blended, only 0
// hides), so per-label opacity needs each label as its own volume: a copy of the label map keeping that label's
// voxels, with that label's look-up table and opacity.
function labelLayer(item) {
  const layer = labels.clone();
  layer.name = `label-${item.value}.nii.gz`;
  const img = layer.img;
  for (let i = 0; i < img.length; i++) {
    if (img[i] !== item.value) img[i] = 0;
  }
  layer.setColormapLabel(labelLut([item]));
  layer.opacity = item.opacity;
  return layer;
}

function applyLabelColours(index) {
  layers[index].setColormapLabel(labelLut([args.label_info[index]]));
  nv.updateGLVolume();
  if (!labels3d) return;
  labels3d.setColormapLabel(labelLut());
  nv3d.updateGLVolume();
}

// ---- readouts
function voxelOf(mm) {
  const m = args.inv_affine;
  return [0, 1, 2].map((r) => m[r][0] * mm[0] + m[r][1] * mm[1] + m[r][2] * mm[2] + m[r][3]);
}

function updateReadout(location) {
  const mm = location.mm;
  const voxel = voxelOf(mm).map((v) => Math.round(v));
  const parts = PLANES.map(([plane, ras, letter, sides]) => {
    const axis = args.plane_axes[plane];
    const index = Math.min(Math.max(voxel[axis], 0), args.shape[axis] - 1);
    const side = mm[ras] >= 0 ? sides[1] : sides[0];
    return `<span data-plane="${plane}"><b>${plane[0].toUpperCase() + plane.slice(1)}</b> ` +
      `slice ${index + 1}/${args.shape[axis]}, ${letter} = ${mm[ras].toFixed(1)} mm ${side}</span>`;
  });
  const ids = new Set(layers.map((layer) => layer.id));
  const here = location.values.find((entry) => ids.has(entry.id) && Math.round(entry.value) !== 0);
  const item = here && args.label_info.find((entry) => entry.value === Math.round(here.value));
  const at = item ? item.name : "no tumour label";
  document.getElementById("readout").innerHTML = `${parts.join(" &middot; ")}<br>Crosshair voxel ` +
    `(${voxel.join(", ")}) of the uploaded grid: <span data-testid="label-here">${at}</span>`;
  publishTiles(); // NiiVue has just drawn: its tile positions are current
}

function updateConvention() {
  const radiological = document.getElementById("radiological").checked;
  document.getElementById("convention").textContent = radiological
    ? "screen left = patient Right (R | L)" : "screen left = patient Left (L | R)";
}

function showWindow() {
  const volume = nv.volumes[0];
  document.getElementById("level").value = ((volume.cal_min + volume.cal_max) / 2).toPrecision(5);
  document.getElementById("width").value = (volume.cal_max - volume.cal_min).toPrecision(5);
}

function setWindow() {
  const level = parseFloat(document.getElementById("level").value);
  const width = parseFloat(document.getElementById("width").value);
  if (!Number.isFinite(level) || !Number.isFinite(width) || width <= 0) return;
  const volume = nv.volumes[0];
  volume.cal_min = level - width / 2;
  volume.cal_max = level + width / 2;
  nv.updateGLVolume();
}

// Exposed for the browser tests and anyone inspecting the page: where NiiVue drew each 2D view (CSS pixels).
function publishTiles() {
  const ratio = nv.uiData.dpr || 1;
  const tiles = {};
  for (const tile of nv.screenSlices) {
    const plane = ["axial", "coronal", "sagittal"][tile.axCorSag];
    if (plane) tiles[plane] = tile.leftTopWidthHeight.map((v) => v / ratio);
  }
  document.getElementById("slices").dataset.tiles = JSON.stringify(tiles);
}

// ---- building the viewer
function buildControls() {
  const box = document.getElementById("sequences");
  box.querySelectorAll("label").forEach((node) => node.remove());
  for (const { key, label } of args.sequences) {
    const option = document.createElement("label");
    option.innerHTML = `<input type="radio" name="sequence" value="${key}"> ${label}`;
    option.querySelector("input").checked = key === args.shown;
    option.querySelector("input").addEventListener("change", () => showSequence(key));
    box.append(option);
  }
  const list = document.getElementById("labels");
  list.innerHTML = "";
  args.label_info.forEach((item, index) => {
    const row = document.createElement("span");
    row.className = "label";
    row.innerHTML = `<input type="checkbox" checked aria-label="Show ${item.name}">` +
      `<input type="color" value="${item.colour}" aria-label="Colour of ${item.name}">` +
      `<span>${item.name}</span>` +
      `<input type="range" min="0" max="1" step="0.05" value="${item.opacity}" aria-label="Opacity of ${item.name}">`;
    const [visible, colour, , opacity] = row.children;
    visible.addEventListener("change", () => { item.visible = visible.checked; applyLabelColours(index); });
    colour.addEventListener("change", () => { item.colour = colour.value; applyLabelColours(index); });
    opacity.addEventListener("change", () => {
      item.opacity = parseFloat(opacity.value);
      nv.setOpacity(nv.getVolumeIndexByID(layers[index].id), item.opacity);
    });
    list.append(row);
  });
  if (args.extra_name) {
    const row = document.createElement("span");
    row.className = "label";
    row.innerHTML = `<input type="checkbox" aria-label="Show ${args.extra_name}"><span>${args.extra_name}</span>`;
    row.firstChild.addEventListener("change", (event) => {
      nv.setOpacity(nv.getVolumeIndexByID(extra.id), event.target.checked ? 0.6 : 0);
    });
    list.append(row);
  }
}

// Sequences are read when first shown (each costs a decompression and a texture upload), then kept.
async function sequenceImage(key) {
  if (!images[key]) {
    images[key] = await loadImage(args[`seq_${key}`], `${key}.nii.gz`, { colormap: "gray" });
  }
  return images[key];
}

async function showSequence(key) {
  const image = await sequenceImage(key);
  const previous = nv.volumes[0];
  if (previous === image) return;
  nv.removeVolume(previous);
  nv.addVolume(image);
  nv.setVolume(image, 0);
  showWindow();
}

// The 3D view is a second NiiVue instance holding only the label map, so the tumour is not hidden inside the
// head's surface; it is built on request because a WebGL context and its shaders cost seconds on a software GPU.
async function show3D() {
  const button = document.getElementById("show3d");
  button.disabled = true;
  document.getElementById("render-box").hidden = false;
  setFrameHeight();
  nv3d = new Niivue({ backColor: [0, 0, 0, 1], isOrientCube: true, show3Dcrosshair: false });
  await nv3d.attachTo("render3d");
  labels3d = labels.clone();
  labels3d.setColormapLabel(labelLut());
  nv3d.addVolume(labels3d);
  nv3d.setSliceType(SLICE_TYPE.RENDER);
  nv3d.setRenderAzimuthElevation(120, 15);
  button.hidden = true;
  document.getElementById("render-box").dataset.ready = "true";
}

function wireStaticControls() {
  const radiological = document.getElementById("radiological");
  radiological.onchange = () => {
    nv.setRadiologicalConvention(radiological.checked);
    updateConvention();
  };
  document.getElementById("level").onchange = setWindow;
  document.getElementById("width").onchange = setWindow;
  document.getElementById("autowl").onclick = () => {
    const volume = nv.volumes[0];
    volume.cal_min = volume.robust_min;
    volume.cal_max = volume.robust_max;
    nv.updateGLVolume();
    showWindow();
  };
  document.getElementById("dragmode").onchange = (event) => {
    nv.opts.dragMode = DRAG_MODE[event.target.value];
  };
  const zoom = (factor) => {
    const [x, y, z, scale] = nv.scene.pan2Dxyzmm;
    nv.setPan2Dxyzmm([x, y, z, scale * factor]);
  };
  document.getElementById("zoomin").onclick = () => zoom(1.25);
  document.getElementById("zoomout").onclick = () => zoom(0.8);
  document.getElementById("show3d").onclick = () => show3D().catch(showError);
  document.getElementById("resetview").onclick = () => {
    nv.setPan2Dxyzmm([0, 0, 0, 1]);
    nv.scene.crosshairPos = nv.mm2frac(args.start_mm);
    nv.drawScene();
    nv.createOnLocationChange();
  };
}

async function render(newArgs) {
  if (shown === newArgs.run) return; // Streamlit re-sends the same arguments on every rerun of the page
  shown = newArgs.run;
  args = newArgs;
  document.getElementById("radiological").checked = args.radiological;
  updateConvention();
  buildControls();
  setFrameHeight();

  nv = new Niivue({
    backColor: [0, 0, 0, 1], crosshairColor: [1, 1, 0, 0.8], isRadiologicalConvention: args.radiological,
    multiplanarShowRender: SHOW_RENDER.NEVER, multiplanarLayout: MULTIPLANAR_TYPE.AUTO,
    isOrientationTextVisible: true, showAllOrientationMarkers: true, dragMode: DRAG_MODE.windowing,
    isNearestInterpolation: false, sagittalNoseLeft: true, tileMargin: 8, fontMinPx: 15,
  });
  await nv.attachTo("slices");
  // Every addVolume recomposites the volumes on the GPU (seconds each on a software GPU), so the label colours
  // are set before the labels are added rather than after.
  labels = await loadImage(args.labels, "labels.nii.gz");
  layers = args.label_info.map(labelLayer);
  nv.addVolume(await sequenceImage(args.shown));
  layers.forEach((layer) => nv.addVolume(layer)); // (pushed to nv.volumes directly, they are not drawn)
  if (args.extra_name) {
    extra = await loadImage(args.extra, "extra.nii.gz", { colormap: "warm", opacity: 0 });
    nv.addVolume(extra);
  }
  nv.setSliceType(SLICE_TYPE.MULTIPLANAR);

  nv.onLocationChange = updateReadout;
  nv.onIntensityChange = showWindow;
  nv.onMouseUp = showWindow; // right-drag windowing ends here
  nv.scene.crosshairPos = nv.mm2frac(args.start_mm);
  nv.drawScene();
  wireStaticControls();
  showWindow();
  nv.createOnLocationChange();
  publishTiles();
  new ResizeObserver(publishTiles).observe(document.getElementById("slices"));
  setFrameHeight();
  document.body.dataset.ready = "true";
}

toStreamlit("streamlit:componentReady", { apiVersion: 1 });
