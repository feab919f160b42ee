"""NeuroMap web app (Streamlit): upload one case, segment it, inspect the result, download the files.

Thin over the Python API: the uploaded files are checked and arranged by `neuromap.webapp_io`, then
`neuromap.segmentation.segment` runs exactly as for ``neuromap segment`` and writes the label NIfTI (input grid and
affine), report JSON and overlay PNG into the session's private temp folder; the viewer and the downloads read
those files. Start it with ``neuromap app`` (localhost only); settings come from environment variables that
command sets: ``NEUROMAP_APP_MAX_UPLOAD_MB`` (per case, default 300) and ``NEUROMAP_APP_MODEL`` (a checkpoint
path offered in the model list).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import streamlit as st
from PIL import Image

from neuromap.config import MODALITIES
from neuromap.errors import NeuroMapError
from neuromap.labels import to_internal
from neuromap.report import COLOURS, LEGEND, RESEARCH_NOTICE, intensity_window, tumour_centre
from neuromap.segmentation import segment, shipped_models
from neuromap.webapp_io import (
    DEFAULT_MAX_UPLOAD_MB,
    IGNORE,
    StagedFile,
    Workspace,
    build_case_folder,
    case_id_from_names,
    extract_case_zip,
    max_upload_bytes,
    safe_name,
    stage_uploads,
)

AUTO, UPLOAD = "auto", "upload"
SEQUENCE_NAMES = {"t1": "T1", "t1ce": "T1ce (contrast)", "t2": "T2", "flair": "FLAIR", IGNORE: "ignore (not used)"}
REGION_ROWS = [("NCR", "NCR/NET", "necrotic / non-enhancing tumour core"), ("ED", "ED", "peritumoral edema"),
               ("ET", "ET", "enhancing tumour"), ("WT", "WT", "whole tumour = NCR/NET + ED + ET"),
               ("TC", "TC", "tumour core = NCR/NET + ET")]
VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # name, RAS axis held fixed
OUTPUT_LABELS = "brats"  # the label NIfTI uses BraTS 1/2/4, as `neuromap segment` does by default
# Session-state keys that describe the current case; all dropped together when its files are deleted.
CASE_KEYS = ("staged", "upload_error", "ignored", "case_fallback", "result", "display", "model_sig")


@dataclass
class Settings:
    max_upload_mb: float
    model_path: str | None


def settings() -> Settings:
    """Read what ``neuromap app`` passed; a bad number is a user error shown on the page."""
    raw = os.environ.get("NEUROMAP_APP_MAX_UPLOAD_MB", str(DEFAULT_MAX_UPLOAD_MB))
    try:
        limit = float(raw)
    except ValueError:
        limit = -1.0
    if limit <= 0:
        raise NeuroMapError(f"NEUROMAP_APP_MAX_UPLOAD_MB='{raw}' is not a positive number of megabytes.")
    return Settings(limit, os.environ.get("NEUROMAP_APP_MODEL") or None)


def workspace() -> Workspace:
    """This session's temp folder; kept in session state so it dies (and is deleted) with the session."""
    if "workspace" not in st.session_state:
        st.session_state.workspace = Workspace()
    return st.session_state.workspace


def reset_session() -> None:
    """'Start over': delete every file of this session and empty the upload widgets (new widget keys)."""
    workspace().clear()
    for key in (*CASE_KEYS, "upload_sig"):
        st.session_state.pop(key, None)
    st.session_state.upload_round = st.session_state.get("upload_round", 0) + 1


# ---------------------------------------------------------------------------------------------------- inputs


def upload_panel(limit_mb: float) -> None:
    """Sidebar uploaders; a new upload replaces the previous case (its files and result are deleted)."""
    round_ = st.session_state.get("upload_round", 0)
    mode = st.radio("What to upload", ["Sequence files", "Case folder as .zip"], horizontal=True,
                    key=f"mode_{round_}")
    if mode == "Sequence files":
        files = st.file_uploader(
            "MRI sequences (.nii / .nii.gz)", accept_multiple_files=True, key=f"files_{round_}",
            max_upload_size=math.ceil(limit_mb),
            help="T1, T1ce, T2 and FLAIR of one patient, co-registered. The sequence is guessed from each file "
                 "name (e.g. _t1ce, -t1c, _flair) and can be changed below.",
        ) or []
    else:
        one = st.file_uploader("One case folder as .zip", type=["zip"], key=f"zip_{round_}",
                               max_upload_size=math.ceil(limit_mb))
        files = [one] if one else []
    st.caption(f"Limit: {limit_mb:g} MB per case. Files stay in a private temp folder of this session and are "
               "deleted on 'Start over', on a new upload and when the session ends.")
    signature = tuple((f.file_id, f.name, f.size) for f in files)
    if signature != st.session_state.get("upload_sig"):
        st.session_state.upload_sig = signature
        receive_upload(files, mode != "Sequence files", max_upload_bytes(limit_mb))


def receive_upload(files: list, is_zip: bool, limit_bytes: int) -> None:
    """Validate and stage a new upload in a clean workspace; the message of a refusal is kept for the page."""
    ws = workspace()
    ws.clear()
    for key in CASE_KEYS:
        st.session_state.pop(key, None)
    if not files:
        return
    try:
        if is_zip:
            staged, ignored = extract_case_zip(files[0], ws.sub("uploads"), limit_bytes)
            st.session_state.ignored = ignored
            st.session_state.case_fallback = safe_name(Path(files[0].name).stem)
        else:
            staged = stage_uploads([(f.name, f.getvalue()) for f in files], ws.sub("uploads"), limit_bytes)
            st.session_state.case_fallback = "case"
    except NeuroMapError as exc:
        ws.clear()
        st.session_state.upload_error = str(exc)
        return
    st.session_state.staged = staged


def model_panel(cfg: Settings) -> str | Path | None:
    """Model choice: shipped models, the checkpoint given to ``neuromap app --model``, or an uploaded .pt.
    Returns what `segment` takes as ``model`` (None = best shipped model), or raises when nothing is usable."""
    shipped = shipped_models()
    given = [cfg.model_path] if cfg.model_path and cfg.model_path not in shipped else []
    options = ([AUTO] if shipped else []) + sorted(shipped) + given + [UPLOAD]
    labels = {AUTO: "automatic: best shipped model for the sequences", UPLOAD: "upload a checkpoint (.pt)"}
    labels.update({n: f"{n} ({', '.join(e['modalities'])})" for n, e in shipped.items()})
    labels.update({path: f"{Path(path).name} (from --model)" for path in given})
    default = options.index(cfg.model_path) if cfg.model_path else 0
    choice = st.selectbox("Model", options, index=default, format_func=labels.get, key="model_choice")
    if choice == AUTO:
        return None
    if choice != UPLOAD:
        return choice
    round_ = st.session_state.get("upload_round", 0)
    upload = st.file_uploader("Checkpoint (.pt)", type=["pt"], key=f"ckpt_{round_}",
                              help="A NeuroMap checkpoint from `neuromap train`. Only use checkpoints you trust: "
                                   "loading a .pt file can run code.")
    if upload is None:
        raise NeuroMapError("no model yet: upload a NeuroMap checkpoint (.pt) in the sidebar.")
    target = workspace().sub("model") / safe_name(upload.name)
    if st.session_state.get("model_sig") != upload.file_id:
        target.write_bytes(upload.getvalue())
        st.session_state.model_sig = upload.file_id
    return target


def sequence_table(staged: list[StagedFile]) -> dict[Path, str]:
    """One row per uploaded file with its guessed sequence, editable."""
    options = [*MODALITIES, IGNORE]
    round_ = st.session_state.get("upload_round", 0)
    choices = {}
    head = st.columns([3, 1, 2])
    head[0].markdown("**File**")
    head[1].markdown("**Size**")
    head[2].markdown("**Sequence**")
    for i, item in enumerate(staged):
        row = st.columns([3, 1, 2], vertical_alignment="center")
        row[0].write(item.name)
        row[1].write(f"{item.path.stat().st_size / 2**20:.1f} MB")
        choices[item.path] = row[2].selectbox(
            f"Sequence of {item.name}", options, index=options.index(item.guess), format_func=SEQUENCE_NAMES.get,
            key=f"seq_{round_}_{i}", label_visibility="collapsed",
        )
    return choices


def run_segmentation(choices: dict[Path, str], model: str | Path | None, tta: bool) -> None:
    """Arrange the chosen files as one case folder and call `segment`; the result replaces the previous one."""
    ws = workspace()
    case_id = case_id_from_names([p.name for p, m in choices.items() if m != IGNORE],
                                 st.session_state.get("case_fallback", "case"))
    with st.status("Segmenting...", expanded=True) as status:
        try:
            status.write("Checking the sequences and arranging them as one case")
            case_dir = build_case_folder(choices, ws.root / "case" / case_id, case_id)
            status.write("Loading, preprocessing and running the model (CPU: up to a few minutes)")
            ws.clear("out")
            (result,) = segment(case_dir, output_dir=ws.sub("out"), model=model, tta=tta, overwrite=True)
        except NeuroMapError as exc:
            status.update(label="Segmentation failed", state="error")
            st.error(str(exc))
            return
        seconds = result.report["timings_s"]["total_s"]
        status.update(label=f"Done: {result.case_id} in {seconds:.1f} s", state="complete", expanded=False)
    run = st.session_state.get("result", {}).get("run", 0) + 1
    st.session_state.result = {"run": run, "case_id": result.case_id, "report": result.report,
                               "files": dict(result.files), "inputs": dict(result.report["inputs"])}
    st.session_state.pop("display", None)


# ---------------------------------------------------------------------------------------------------- viewer


def load_display(result: dict, modality: str) -> dict:
    """Background and labels reoriented to RAS for display (cached per run and modality: one at a time)."""
    key = (result["run"], modality)
    cached = st.session_state.get("display")
    if cached and cached["key"] == key:
        return cached
    image = nib.as_closest_canonical(nib.load(result["inputs"][modality]))
    seg = nib.as_closest_canonical(nib.load(result["files"]["seg.nii.gz"]))
    background = np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3])  # (X, Y, Z, 1) too
    labels = to_internal(np.asanyarray(seg.dataobj), OUTPUT_LABELS)
    window = intensity_window(background)
    cached = {"key": key, "background": background, "labels": labels, "window": window,
              "spacing": tuple(float(z) for z in image.header.get_zooms()[:3])}
    st.session_state.display = cached
    return cached


def render_slice(background: np.ndarray, labels: np.ndarray, axis: int, index: int, spacing: tuple[float, ...],
                 window: tuple[float, float], opacity: float, shown: set[int]) -> np.ndarray:
    """RGB uint8 picture of one RAS slice with coloured labels, in millimetre proportions, the second in-plane
    axis pointing up (anterior up in axial views, superior up otherwise) as in the report's overlay PNG."""
    plane = np.take(background, index, axis=axis)
    lab = np.take(labels, index, axis=axis)
    lo, hi = window
    grey = np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value in shown:
        mask = lab == value
        rgb[mask] = (1 - opacity) * rgb[mask] + opacity * np.asarray(COLOURS[value])
    rgb = np.flipud(np.transpose(rgb, (1, 0, 2)))
    in_plane = [s for i, s in enumerate(spacing) if i != axis]
    height, width = rgb.shape[:2]
    unit = min(in_plane)
    size = (max(1, round(width * in_plane[0] / unit)), max(1, round(height * in_plane[1] / unit)))
    picture = Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.NEAREST)
    return np.asarray(picture)


def legend_html(shown: set[int]) -> str:
    """Colour key with the exact overlay colours (Streamlit's named colours differ); hidden labels greyed."""
    items = []
    for value, colour in COLOURS.items():
        hexcode = "#" + "".join(f"{round(c * 255):02x}" for c in colour)
        swatch = f"display:inline-block;width:0.9em;height:0.9em;background:{hexcode};margin-right:0.35em"
        fade = "" if value in shown else "opacity:0.35;"
        items.append(f'<span style="{fade}margin-right:1.2em;font-size:0.85rem;white-space:nowrap">'
                     f'<span style="{swatch}"></span>{LEGEND[value]}</span>')
    return "".join(items)


def viewer(result: dict) -> None:
    """Three orthogonal slices with sliders, overlay opacity, label toggles and the background sequence."""
    run = result["run"]
    controls = st.columns([2, 2, 1, 1, 1], vertical_alignment="bottom")
    modalities = list(result["inputs"])
    default = modalities.index("flair") if "flair" in modalities else 0
    modality = controls[0].selectbox("Background sequence", modalities, index=default,
                                     format_func=SEQUENCE_NAMES.get, key=f"bg_{run}")
    opacity = controls[1].slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key=f"opacity_{run}")
    shown = {value for value, column, name in zip(COLOURS, controls[2:], ("NCR/NET", "ED", "ET"), strict=True)
             if column.checkbox(name, value=True, key=f"show_{value}_{run}")}
    st.markdown(legend_html(shown), unsafe_allow_html=True)
    data = load_display(result, modality)
    centre = tumour_centre(data["labels"])
    for column, (name, axis) in zip(st.columns(3), VIEWS, strict=True):
        size = data["labels"].shape[axis]
        number = column.slider(f"{name.capitalize()} slice (of {size})", 1, size, int(centre[axis]) + 1,
                               key=f"{name}_{run}")
        column.image(render_slice(data["background"], data["labels"], axis, number - 1, data["spacing"],
                                  data["window"], opacity, shown), width="stretch")


def results_panel(result: dict) -> None:
    """Volumes, warnings, model facts and the three downloads (the files `segment` wrote, byte for byte)."""
    report = result["report"]
    volumes = report["volumes_ml"]
    st.subheader("Volumes")
    st.table({"Region": [r[1] for r in REGION_ROWS], "Volume (mL)": [f"{volumes[r[0]]:.2f}" for r in REGION_ROWS],
              "Meaning": [r[2] for r in REGION_ROWS]}, hide_index=True)
    for warning in report["warnings"]:
        st.warning(warning)
    model = report["model"]
    dice = f"; validation Dice {model['validation']}" if model.get("validation") else ""
    st.caption(f"Model: {model['architecture']} on {', '.join(model['modalities'])}{dice}. "
               f"Time {report['timings_s']['total_s']:.1f} s on {report['device']}.")
    st.subheader("Downloads")
    kinds = [("seg.nii.gz", "Label map (NIfTI, input grid)", "application/gzip"),
             ("report.json", "Report (JSON)", "application/json"), ("overlay.png", "Overlay (PNG)", "image/png")]
    for kind, label, mime in kinds:
        path = Path(result["files"][kind])
        st.download_button(label, path.read_bytes(), file_name=path.name, mime=mime, key=f"dl_{kind}",
                           on_click="ignore", icon=":material/download:", width="stretch")
    st.caption("Labels in the NIfTI: 1 NCR/NET, 2 ED, 4 ET (BraTS convention).")


# ---------------------------------------------------------------------------------------------------- page


def main() -> None:
    st.set_page_config(page_title="NeuroMap - brain tumour segmentation", page_icon=":material/neurology:",
                       layout="wide")
    st.title("NeuroMap: brain tumour segmentation")
    st.markdown("Upload one patient's MRI (T1, T1ce, T2, FLAIR), segment the tumour into necrotic core, edema and "
                "enhancing tumour, inspect the result slice by slice and download the label map, report and picture.")
    st.warning(f"**{RESEARCH_NOTICE}** The results have not been checked by a clinician.",
               icon=":material/warning:")
    try:
        cfg = settings()
    except NeuroMapError as exc:
        st.error(str(exc))
        return
    with st.sidebar:
        st.header("1. Upload a case")
        upload_panel(cfg.max_upload_mb)
        st.header("2. Choose a model")
        try:
            model, model_problem = model_panel(cfg), None
        except NeuroMapError as exc:
            model, model_problem = None, str(exc)
        tta = st.checkbox("Test-time augmentation (flips; slower, a bit smoother)", key="tta")
        st.divider()
        st.button("Start over", on_click=reset_session, icon=":material/restart_alt:",
                  help="Delete this session's files and clear the uploads.")

    staged = st.session_state.get("staged")
    if st.session_state.get("upload_error"):
        st.error(f"{st.session_state.upload_error}\n\nNothing was kept. Remove the file in the sidebar (x) or press "
                 "'Start over', then upload again.")
    elif not staged:
        st.info("Upload the MRI sequences of one patient in the sidebar: T1, T1ce, T2 and FLAIR as .nii/.nii.gz "
                "files (BraTS naming is recognised), or the case folder as one .zip.", icon=":material/upload:")
    if staged:
        st.subheader("Sequences")
        if st.session_state.get("ignored"):
            st.caption(f"Not used from the zip: {', '.join(st.session_state.ignored)}")
        choices = sequence_table(staged)
        if model_problem:
            st.info(model_problem)
        if st.button("Segment", type="primary", disabled=bool(model_problem), icon=":material/play_arrow:"):
            run_segmentation(choices, model, tta)

    result = st.session_state.get("result")
    if result:
        st.divider()
        st.subheader(f"Result: {result['case_id']}")
        left, right = st.columns([3, 1.5], gap="large")
        with left:
            viewer(result)
        with right:
            results_panel(result)


if __name__ == "__main__":
    main()
