"""NeuroMap web app (Streamlit): upload one case, segment it, inspect the result, download the files.

Thin over the Python API: the uploaded files are checked and arranged by `neuromap.webapp_io`, then a
`neuromap.segmenter.Segmenter` (cached across reruns, so the model is loaded once) segments the case exactly as
``neuromap segment`` does and writes the label NIfTI (input grid and affine), report JSON and overlay PNG into the
session's private temp folder; the viewer (`neuromap.app_viewer`) and the downloads read those files, and the
model's task decides the table, legend and colours. Start it with ``neuromap app`` (localhost only); settings
come from environment variables that command sets: ``NEUROMAP_APP_MAX_UPLOAD_MB`` (per case, default 300) and
``NEUROMAP_APP_MODEL`` (a checkpoint path offered in the model list).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from neuromap.app_viewer import result_task, viewer
from neuromap.config import MODALITIES, InferenceConfig
from neuromap.errors import NeuroMapError
from neuromap.io import cases_from_inputs
from neuromap.labels import CONVENTIONS
from neuromap.report import RESEARCH_NOTICE
from neuromap.segmenter import Segmenter
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
from neuromap.zoo import shipped_models, validation_text

AUTO, UPLOAD = "auto", "upload"
SEQUENCE_NAMES = {"t1": "T1", "t1ce": "T1ce (contrast)", "t2": "T2", "flair": "FLAIR", IGNORE: "ignore (not used)"}
OUTPUT_LABELS = "brats"  # BraTS models write 1/2/4, as `neuromap segment` does by default
# Session-state keys that describe the current case; all dropped together when its files are deleted.
CASE_KEYS = ("staged", "upload_error", "ignored", "case_fallback", "result", "run_error", "display", "model_sig")


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
    labels.update({n: f"{n} ({', '.join(m.modalities)})" for n, m in shipped.items()})
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


@st.cache_resource(max_entries=4, show_spinner="Loading the model")
def cached_segmenter(model: str | None, tta: bool) -> Segmenter:
    """One Segmenter per model choice and TTA setting, shared across reruns and sessions, so a model is loaded
    once (and again only when its file changes, e.g. a new upload under the same name)."""
    return Segmenter(model, InferenceConfig(tta=tta), OUTPUT_LABELS)


def run_segmentation(choices: dict[Path, str], model: str | Path | None, tta: bool) -> None:
    """Arrange the chosen files as one case folder and segment it. The previous result goes first: after a
    failure nothing stale stays on screen (its files are deleted), and the reason stays shown, unfolded."""
    ws = workspace()
    for key in ("result", "display", "run_error"):
        st.session_state.pop(key, None)
    ws.clear("out")
    case_id = case_id_from_names([p.name for p, m in choices.items() if m != IGNORE],
                                 st.session_state.get("case_fallback", "case"))
    with st.status("Segmenting...", expanded=True) as status:
        try:
            status.write("Checking the sequences and arranging them as one case")
            case_dir = build_case_folder(choices, ws.root / "case" / case_id, case_id)
            status.write("Loading, preprocessing and running the model (CPU: up to a few minutes)")
            segmenter = cached_segmenter(None if model is None else str(model), tta)
            with cases_from_inputs(case_dir) as cases:
                (result,) = segmenter.segment(cases, ws.sub("out"), overwrite=True)
        except NeuroMapError as exc:
            status.update(label="Segmentation failed", state="error", expanded=True)
            st.session_state.run_error = str(exc)
            return
        seconds = result.report["timings_s"]["total_s"]
        status.update(label=f"Done: {result.case_id} in {seconds:.1f} s", state="complete", expanded=False)
    st.session_state.result = {"run": st.session_state.get("runs", 0) + 1, "case_id": result.case_id,
                               "report": result.report, "files": dict(result.files),
                               "labels_output": str(result.labels_output), "inputs": dict(result.report["inputs"])}
    st.session_state.runs = st.session_state.result["run"]


# ---------------------------------------------------------------------------------------------------- results


def results_panel(result: dict) -> None:
    """Volumes of the model's task, warnings, model facts and the three downloads (the files the segmenter
    wrote, byte for byte)."""
    report, task = result["report"], result_task(result)
    volumes = report["volumes_ml"]
    quality_panel(report["quality"])
    st.subheader("Volumes")
    st.table({"Region": [s.name for s in task.structures],
              "Volume (mL)": [f"{volumes[s.key]:.2f}" for s in task.structures],
              "Meaning": [s.meaning for s in task.structures]}, hide_index=True)
    for warning in report["warnings"]:
        st.warning(warning)
    model = report["model"]
    st.caption(f"Model: {model['architecture']} on {', '.join(model['modalities'])}; "
               f"{validation_text(model['files'], model.get('validation'))}. "
               f"Time {report['timings_s']['total_s']:.1f} s on {report['device']}.")
    st.subheader("Downloads")
    kinds = [(result["labels_output"], "Label map (NIfTI, input grid)", "application/gzip"),
             (result["files"]["report.json"], "Report (JSON)", "application/json"),
             (result["files"]["overlay.png"], "Overlay (PNG)", "image/png")]
    for file, label, mime in kinds:
        path = Path(file)
        st.download_button(label, path.read_bytes(), file_name=path.name, mime=mime, key=f"dl_{label}",
                           on_click="ignore", icon=":material/download:", width="stretch")
    convention = report["label_convention"]
    values = ", ".join(f"{value} {task.short_names[internal]}"
                       for value, internal in CONVENTIONS[convention].items() if internal)
    st.caption(f"Labels in the NIfTI: {values} ({convention} convention).")


def quality_panel(quality: dict) -> None:
    """The case's quality estimate (`neuromap.quality`): the score, the flag and why, and where the score comes
    from, so a user knows which results to check first."""
    st.subheader("Quality estimate")
    score = "not available" if quality["score"] is None else f"{quality['score']:.2f}"
    text = f"Estimated mean Dice {score}: **{'OK' if quality['flag'] == 'ok' else 'review this result'}**"
    if quality["flag"] == "ok":
        st.success(text, icon=":material/check_circle:")
    else:
        st.warning(text + "\n\n" + "\n".join(f"- {reason}" for reason in quality["reasons"]),
                   icon=":material/flag:")
    calibration = quality.get("calibration")
    if calibration:
        st.caption(f"An estimate, not a measurement: fitted on {calibration['fitted_on']}; leave-one-out Spearman "
                   f"correlation with true Dice {calibration['loo_spearman']:.2f} (n = {calibration['n']}).")


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
        if st.session_state.get("run_error"):
            st.error(f"Segmentation failed: {st.session_state.run_error}", icon=":material/error:")

    result = st.session_state.get("result")
    if result:
        st.divider()
        st.subheader(f"Result: {result['case_id']}")
        left, right = st.columns([3, 1.5], gap="large")
        with left:
            viewer(result, SEQUENCE_NAMES)
        with right:
            results_panel(result)


if __name__ == "__main__":
    main()
