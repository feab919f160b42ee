"""NeuroMap web app (Streamlit): upload one case, segment it, inspect the result, download the files.

Thin over the Python API: the uploaded files (NIfTI sequences, or a zip of a case folder or of a DICOM study) are
checked and unpacked by `neuromap.webapp_io`; the page's table sets each file's (or DICOM series') sequence and
makes the case the CLI would read (a modality mapping, or a DICOM study with its series chosen, as ``--map``
does); a `neuromap.segmenter.Segmenter` (shared by all sessions and reruns, so a model is loaded once per process)
segments it exactly as ``neuromap segment`` does, with ``--raw`` when 'Raw scans' is ticked (ticked for the user
when the sequences lie on different voxel grids, by the check ``validate`` makes) and ``--dicom-seg`` for DICOM
studies, and writes the label NIfTI (input grid and affine), uncertainty map, report JSON, overlay PNG and those
options' files into the session's private temp folder; the segmentations of all sessions wait in one queue
(`neuromap.app_jobs`), which also deletes a session's folder when the session ends. The viewer
(`neuromap.app_viewer`) and the downloads read those files, and the model's task decides the table, legend and
colours. Start it with ``neuromap app`` (localhost only); settings come from environment variables that command
sets: ``NEUROMAP_APP_MAX_UPLOAD_MB`` (per case, default 300), ``NEUROMAP_APP_MODEL`` (a checkpoint path offered in
the model list) and ``NEUROMAP_APP_WORKERS`` (segmentations run at a time, default 1).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from neuromap.app_jobs import (
    CANCELLED,
    Job,
    follow_job,
    job_busy,
    page_session,
    queue_workers,
    stop_job,
    submit,
)
from neuromap.app_viewer import result_task, viewer
from neuromap.config import MODALITIES, InferenceConfig
from neuromap.errors import NeuroMapError
from neuromap.io import DICOM, NIFTI, Case, atomic_path
from neuromap.io.dicom import Series
from neuromap.io.dicom_layout import DICOM_SEG
from neuromap.io.dicom_map import StudyChoice, map_study, propose
from neuromap.io.layout import UNCERTAINTY
from neuromap.labels import CONVENTIONS
from neuromap.prepare_raw import RawOptions
from neuromap.prepare_raw.inputs import choose_reference
from neuromap.prepare_raw.layout import BRAIN_MASK, prepared_key
from neuromap.report import RESEARCH_NOTICE
from neuromap.segmenter import Segmenter, SegmentResult
from neuromap.webapp_io import (
    DEFAULT_MAX_UPLOAD_MB,
    IGNORE,
    StagedFile,
    Workspace,
    case_id_from_names,
    chosen_sequences,
    extract_zip,
    max_upload_bytes,
    safe_name,
    sequences_as_nifti,
    stage_uploads,
    web_message,
)
from neuromap.zoo import shipped_models, usable_models, validation_text

AUTO, UPLOAD = "auto", "upload"
SEQUENCE_NAMES = {"t1": "T1", "t1ce": "T1ce (contrast)", "t2": "T2", "flair": "FLAIR", IGNORE: "ignore (not used)"}
OUTPUT_LABELS = "brats"  # BraTS models write 1/2/4, as `neuromap segment` does by default
# The app takes NIfTI cases and DICOM studies, so it offers the models of their task (the LGG slice model needs
# .tif slice folders, which the upload does not take).
APP_TASK = NIFTI.task
TABLE = "the web app's series table"  # who chose a DICOM study's series (the report's "why")
# Progress bar: what each stage of a job (`Segmenter.segment_case`, then the viewer's files) is called on the page
# and where it starts, without and with raw-scan preparation (its steps take most of a raw run: deepbet and the
# registrations).
TEXTS = {"reading": "Reading the sequences", "read": "Raw scans: reading each sequence on its own grid",
         "register": "Raw scans: co-registering the sequences to the reference (rigid, mutual information)",
         "resample": "Raw scans: resampling to the 1 mm grid", "brain_mask": "Raw scans: finding the brain (deepbet)",
         "quality": "Raw scans: checking the registrations", "n4": "Raw scans: bias-field correction (N4)",
         "preparing": "Preparing (reorienting, cropping, normalising)",
         "model": "Running the model (CPU: the longest step)", "writing": "Writing the results"}
STARTS = {False: {"reading": 0.05, "preparing": 0.18, "model": 0.3, "writing": 0.9},
          True: {"reading": 0.02, "read": 0.03, "register": 0.05, "resample": 0.3, "brain_mask": 0.35, "quality": 0.6,
                 "n4": 0.62, "preparing": 0.65, "model": 0.7, "writing": 0.95}}
STAGES = {raw: {name: (start, TEXTS[name]) for name, start in starts.items()} for raw, starts in STARTS.items()}
# Session-state keys that describe the current case; all dropped together when its files are deleted.
CASE_KEYS = ("staged", "study", "upload_error", "ignored", "case_fallback", "result", "run_error", "model_sig",
             "done_text")


@dataclass(frozen=True)
class DicomUpload:
    """A DICOM study unpacked from a zip: its folder, case id, series, the notes on DICOM files that are not images,
    and the series-to-sequence mapping NeuroMap proposes (`neuromap.io.dicom_map.propose`)."""

    root: Path
    case_id: str
    series: list[Series]
    notes: list[str]
    proposal: StudyChoice


@dataclass(frozen=True)
class Row:
    """One row of the sequence table: a staged file (key: its path) or a DICOM series (key: its UID)."""

    key: Hashable
    name: str
    cells: tuple[str, ...]  # the columns after the name
    guess: str  # modality or IGNORE
    usable: bool = True


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
    """This session's private temp folder (`neuromap.app_jobs.page_session`: deleted when the session ends). A
    new folder for a session that had one means its connection dropped and the old folder was deleted with it: the
    case it held is forgotten (the uploads still in the widgets are staged again)."""
    current = page_session().workspace
    if st.session_state.get("workspace") is not current:
        for key in (*CASE_KEYS, "upload_sig", "job"):
            st.session_state.pop(key, None)
        st.session_state.workspace = current
    return current


def reset_session() -> None:
    """'Start over': stop this session's segmentation, delete its files and empty the upload widgets (new widget
    keys)."""
    stop_job()
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
        one = st.file_uploader(
            "One case as .zip", type=["zip"], key=f"zip_{round_}", max_upload_size=math.ceil(limit_mb),
            help="A folder with one patient's NIfTI sequences, or a DICOM export of one study (the series are found "
                 "in any folder and file order; localizers and other series are left out).",
        )
        files = [one] if one else []
    st.caption(f"Limit: {limit_mb:g} MB per case. Files stay in a private temp folder of this session and are "
               "deleted on 'Start over', on a new upload and when the session ends.")
    signature = tuple((f.file_id, f.name, f.size) for f in files)
    if signature != st.session_state.get("upload_sig"):
        st.session_state.upload_sig = signature
        receive_upload(files, mode != "Sequence files", max_upload_bytes(limit_mb))


def receive_upload(files: list, is_zip: bool, limit_bytes: int) -> None:
    """Validate and stage a new upload in a clean workspace (a segmentation of the previous case is stopped); the
    message of a refusal is kept for the page."""
    stop_job()
    ws = workspace()
    ws.clear()
    for key in CASE_KEYS:
        st.session_state.pop(key, None)
    if not files:
        return
    try:
        if is_zip:
            name = safe_name(Path(files[0].name).stem)
            contents = extract_zip(files[0], ws.sub("uploads") / name, limit_bytes)
            st.session_state.ignored = contents.ignored
            st.session_state.case_fallback = name
            if contents.dicom:
                st.session_state.study = read_study(contents.dicom)
                return
            staged = contents.staged
        else:
            staged = stage_uploads([(f.name, f.getvalue()) for f in files], ws.sub("uploads"), limit_bytes)
            st.session_state.case_fallback = "case"
    except NeuroMapError as exc:
        ws.clear()
        st.session_state.upload_error = web_message(str(exc), ws.root, {})
        return
    st.session_state.staged = staged


def read_study(root: Path) -> DicomUpload:
    """The one DICOM study unpacked under ``root``, with the mapping NeuroMap proposes for its series."""
    studies, notes = DICOM.studies(root)
    if len(studies) > 1:
        raise NeuroMapError(f"the zip holds {len(studies)} DICOM studies ({', '.join(i for i, _ in studies)}); the "
                            "app segments one case at a time. Fix: zip one patient's study.")
    ((case_id, series),) = studies
    return DicomUpload(root, case_id, series, notes, propose(series))




def model_panel(cfg: Settings) -> str | Path | None:
    """Model choice: shipped models, the checkpoint given to ``neuromap app --model``, or an uploaded .pt.
    Returns what `segment` takes as ``model`` (None = best shipped model), or raises when nothing is usable."""
    shipped = {name: m for name, m in shipped_models().items() if m.task == APP_TASK}
    given = [cfg.model_path] if cfg.model_path and cfg.model_path not in shipped else []
    options = ([AUTO] if shipped else []) + sorted(shipped) + given + [UPLOAD]
    labels = {AUTO: "automatic: best shipped model for the sequences", UPLOAD: "upload a checkpoint (.pt)"}
    labels.update({n: f"{n} ({', '.join(m.modalities)})" for n, m in shipped.items()})
    labels.update({path: f"{Path(path).name} (set when the app was started)" for path in given})
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


def file_rows(staged: list[StagedFile]) -> list[Row]:
    return [Row(f.path, f.name, (f"{f.path.stat().st_size / 2**20:.1f} MB",), f.guess) for f in staged]


def series_rows(study: DicomUpload) -> list[Row]:
    """One row per series with what NeuroMap made of it; a tie leaves its sequence unset in every tied row, so
    the user settles it (the CLI refuses it and asks for --map)."""
    proposal = study.proposal
    reasons = {**proposal.ignored, **{s.uid: proposal.why[m] for m, s in proposal.used.items()}}
    guesses = {s.uid: m for m, s in proposal.used.items() if m not in proposal.ambiguous}
    return [Row(s.uid, s.title, (s.size, reasons[s.uid]), guesses.get(s.uid, IGNORE), s.problem is None)
            for s in study.series]


def sequence_table(rows: list[Row], headers: list[tuple[str, float]]) -> dict[Hashable, str]:
    """One row per file or series with its guessed sequence, editable (``headers``: title and width of the name
    and cell columns). A series that cannot be read as one volume stays 'ignore'."""
    options = [*MODALITIES, IGNORE]
    round_ = st.session_state.get("upload_round", 0)
    widths = [w for _, w in headers] + [2]
    choices = {}
    for column, title in zip(st.columns(widths), [t for t, _ in headers] + ["Sequence"], strict=True):
        column.markdown(f"**{title}**")
    for i, item in enumerate(rows):
        columns = st.columns(widths, vertical_alignment="center")
        for column, text in zip(columns, (item.name, *item.cells), strict=False):
            column.write(text)
        choices[item.key] = columns[-1].selectbox(
            f"Sequence of {item.name}", options, index=options.index(item.guess), format_func=SEQUENCE_NAMES.get,
            key=f"seq_{round_}_{i}", label_visibility="collapsed", disabled=not item.usable,
        )
    return choices


@st.cache_resource(max_entries=8, show_spinner="Loading the model")
def cached_segmenter(model: str | None, tta: bool, raw: RawOptions | None, dicom_seg: bool) -> Segmenter:
    """One Segmenter per model choice and options, shared across reruns and sessions, so a model is loaded once
    (and again only when its file changes, e.g. a new upload under the same name). It also writes the
    uncertainty map (no extra model pass), which the viewer overlays and the downloads offer; for raw scans on the
    reference sequence's grid, like the labels."""
    return Segmenter(model, InferenceConfig(tta=tta, uncertainty=True), OUTPUT_LABELS, dicom_seg=dicom_seg, raw=raw)


@st.cache_data(max_entries=8, show_spinner=False)
def checkpoint_modalities(path: str, mtime: float) -> list[str]:
    """The sequences a checkpoint file needs (read from its spec; cached by file and modification time)."""
    from neuromap.checkpoint import ModelSpec, read_checkpoint

    return ModelSpec.from_dict(read_checkpoint(path)["spec"]).modalities


def model_plan(model: str | Path | None, chosen: list[str]) -> tuple[str, str | None, list[str]]:
    """What pressing Segment will do with the sequences ``chosen``: (a sentence naming the model and how well it
    was measured, the reason Segment is disabled or None, the sequences the model reads)."""
    have = ", ".join(SEQUENCE_NAMES[m] for m in chosen) or "none"
    if model is None:
        usable = usable_models(chosen, APP_TASK)
        if not usable:
            needs = "; ".join(f"{m.name} needs {', '.join(SEQUENCE_NAMES[x] for x in m.modalities)}"
                              for m in shipped_models().values() if m.task == APP_TASK)
            return "", (f"No shipped model works with the sequences set ({have}): {needs}. Upload the missing files, "
                        "or set their sequence in the table."), []
        best = usable[0]
        return (f"Automatic choice: **{best.name}** on {', '.join(SEQUENCE_NAMES[m] for m in best.modalities)}; "
                f"{best.validation_text()}."), None, list(best.modalities)
    shipped = shipped_models()
    if str(model) in shipped:
        spec_needs, about = list(shipped[str(model)].modalities), shipped[str(model)].validation_text()
    else:
        try:
            spec_needs = checkpoint_modalities(str(model), Path(model).stat().st_mtime)
        except (NeuroMapError, OSError) as exc:
            return "", f"The checkpoint cannot be read: {web_message(str(exc), workspace().root, {})}", []
        about = "a checkpoint not shipped with NeuroMap (its card, if any, is not known here)"
    missing = [SEQUENCE_NAMES[m] for m in spec_needs if m not in chosen]
    plan = f"Model **{Path(str(model)).name}** on {', '.join(SEQUENCE_NAMES[m] for m in spec_needs)}; {about}."
    if missing:
        return plan, (f"This model needs {', '.join(missing)}, which no file is set to. Upload it and set its "
                      "sequence in the table, or choose another model."), spec_needs
    return plan, None, spec_needs


def upload_case(chosen: dict[str, Hashable], names: dict[Hashable, str]) -> Case:
    """The case the chosen files or series make (modality -> row key), as the CLI reads it: NIfTI files as a
    modality mapping, a DICOM study with its series chosen as ``--map`` chooses them."""
    fallback = st.session_state.get("case_fallback", "case")
    study = st.session_state.get("study")
    if study is None:
        case_id = case_id_from_names([names[key] for key in chosen.values()], fallback)
        return NIFTI.case_from_mapping(dict(chosen), case_id)
    choice = map_study(study.series, {m: str(uid) for m, uid in chosen.items()}, str(study.root), chosen_in=TABLE)
    return DICOM.study_case(study.root, study.case_id, choice, study.notes)


def run_segmentation(case: Case, uploaded: dict[str, str], names: dict[str, str], model: str | Path | None,
                     tta: bool, raw: RawOptions | None) -> None:
    """Queue the segmentation of the case the page made (`neuromap.app_jobs`; ``uploaded``: modality -> what the
    user uploaded; ``names``: file name in the session folder -> uploaded name, for messages); the page follows it
    and `take_result` keeps how it ended. The previous result goes first: after a failure nothing stale stays on
    screen (its files are deleted), and the reason stays shown, unfolded and worded for the page."""
    ws = workspace()
    for key in ("result", "run_error", "done_text"):
        st.session_state.pop(key, None)
    ws.clear("out", "view")

    def reword(text: str) -> str:
        return web_message(text, ws.root, names)

    try:
        segmenter = cached_segmenter(None if model is None else str(model), tta, raw, case.naming == "dicom")
    except NeuroMapError as exc:
        st.session_state.run_error = reword(str(exc))
        return
    out, view = ws.sub("out"), ws.sub("view")

    def work(on_stage: Callable[[str], None]) -> tuple[SegmentResult, dict, dict[str, Path]]:
        """In a worker thread of the queue: segment the case, rewrite its report for the web, find the viewer's
        sequences."""
        try:
            result = segmenter.segment_case(case, out, overwrite=True, on_stage=on_stage)
            return result, web_report(result, uploaded, reword), viewer_sequences(case, result, raw is not None, view)
        except NeuroMapError as exc:
            raise NeuroMapError(reword(str(exc))) from None

    submit(work)
    st.session_state.job_raw = raw is not None  # which progress stages it reports
    st.rerun()  # the page with Segment disabled, following the job


def take_result(job: Job) -> None:
    """Keep the outcome of this session's ended job: its result, or the reason it failed (an error that is not a
    `NeuroMapError` is raised here, on the page's thread, where Streamlit shows it). A cancelled job leaves
    nothing: whoever cancelled it has moved on."""
    if job.state == CANCELLED:
        return
    if isinstance(job.error, NeuroMapError):
        st.session_state.run_error = str(job.error)
        return
    if job.error is not None:
        raise job.error
    result, report, inputs = job.result
    st.session_state.result = {"run": st.session_state.get("runs", 0) + 1, "case_id": result.case_id,
                               "report": report, "files": dict(result.files),
                               "labels_output": str(result.labels_output),
                               "inputs": {m: str(path) for m, path in inputs.items()}}
    st.session_state.runs = st.session_state.result["run"]
    waited = f" after {job.started - job.submitted:.0f} s in the queue" if job.started - job.submitted >= 1 else ""
    st.session_state.done_text = f"Done: {result.case_id} in {job.ended - job.started:.0f} s{waited}"
    st.session_state.scroll_to_result = True


def viewer_sequences(case: Case, result: SegmentResult, raw: bool, folder: Path) -> dict[str, Path]:
    """The NIfTI files the viewer shows under the labels, each where the labels are: raw scans' co-registered
    sequences (the 1 mm, skull-stripped volumes the model read; the uploaded ones are not aligned with each other),
    a DICOM study's series converted to NIfTI in ``folder``, or the uploaded files."""
    modalities = list(result.report["inputs"])
    if raw:
        return {m: result.files[prepared_key(m)] for m in modalities}
    if case.naming == "dicom":
        return sequences_as_nifti(case, modalities, folder)
    return {m: Path(p) for m, p in result.report["inputs"].items()}


def web_report(result: SegmentResult, uploaded: dict[str, str], reword: Callable[[str], str]) -> dict:
    """The report a web user downloads: the sequences are named by the files they uploaded rather than by
    paths in this server's temp folder, in the inputs and in the warnings (``reword``). Rewritten in place
    (staged and renamed, like every output)."""
    report = {**result.report, "inputs": {m: uploaded[m] for m in result.report["inputs"]},
              "warnings": [reword(w) for w in result.report["warnings"]]}
    with atomic_path(result.files["report.json"], overwrite=True) as target:
        target.write_text(json.dumps(report, indent=2))
    return report


def case_panel(staged: list[StagedFile] | None, study: DicomUpload | None, model: str | Path | None,
               model_problem: str | None, tta: bool) -> None:
    """The uploaded case: its files or DICOM series with their sequences (editable), the raw-scan option, what
    Segment will do or why it cannot, and the Segment button."""
    ws = workspace()
    if study is None:
        st.subheader("Sequences")
        rows = file_rows(staged)
        table = sequence_table(rows, [("File", 3), ("Size", 1)])
        names = {f.path.name: f.name for f in staged}  # the session folder's names -> the uploaded ones
    else:
        st.subheader("DICOM series")
        st.caption("What NeuroMap read from each series of the study. Check the sequences: set the right series "
                   "where a sequence is missing or several series fit it.")
        rows = series_rows(study)
        table = sequence_table(rows, [("Series", 2.5), ("Grid", 1), ("How it was recognised", 3.5)])
        names = {}
        ties = "; ".join(f"{SEQUENCE_NAMES[m]} ({', '.join(s.title for s in tied)})"
                         for m, tied in study.proposal.ambiguous.items() if m not in table.values())
        if ties:
            st.warning(f"Several series fit {ties}: NeuroMap does not guess between them. Set the right one in the "
                       "table.", icon=":material/help:")
    if st.session_state.get("ignored"):
        ignored = st.session_state.ignored
        more = f" and {len(ignored) - 8} more" if len(ignored) > 8 else ""
        st.caption(f"Not used from the zip: {', '.join(ignored[:8])}{more}")
    labels = {row.key: row.name for row in rows}
    plan, blocked, case, off_grid, reads = "", None, None, [], []
    try:
        chosen = chosen_sequences(table, labels)
        modalities = sorted(chosen, key=MODALITIES.index)
        plan, blocked, reads = ("", model_problem, []) if model_problem else model_plan(model, modalities)
        case = upload_case(chosen, labels)
        off_grid = [web_message(line, ws.root, names) for line in case.layout.off_grid(case, modalities)]
    except NeuroMapError as exc:
        blocked = blocked or web_message(str(exc), ws.root, names)
    raw, raw_blocked = raw_panel(off_grid, reads) if case else (None, None)
    blocked = blocked or raw_blocked
    if plan:
        st.markdown(plan)
    if blocked:
        st.warning(blocked, icon=":material/block:")
    if st.button("Segment", type="primary", disabled=bool(blocked) or job_busy(), icon=":material/play_arrow:",
                 help=blocked) and not job_busy():
        uploaded = {m: labels[key] for m, key in chosen.items()}
        run_segmentation(case, uploaded, names, model, tta, raw)
    if job := follow_job(STAGES[st.session_state.get("job_raw", False)]):  # waits while the job is queued or running
        take_result(job)
        st.rerun()  # the page as it is now: Segment enabled again, the result below
    if st.session_state.get("done_text"):
        st.progress(1.0, text=st.session_state.done_text)
    if st.session_state.get("run_error"):
        st.error(f"Segmentation failed: {st.session_state.run_error}", icon=":material/error:")


def raw_panel(off_grid: list[str], reads: list[str]) -> tuple[RawOptions | None, str | None]:
    """The raw-scan option (``neuromap segment --raw``), ticked for the user when the sequences lie on different
    voxel grids (``off_grid``, the check that makes ``validate`` suggest --raw), with its choices: the reference
    sequence among those the model ``reads`` (``--reference``), skull already stripped, N4 (``--n4``). Returns
    (its options or None, the reason Segment is disabled or None)."""
    round_ = st.session_state.get("upload_round", 0)
    if off_grid:
        st.info("The sequences lie on different voxel grids, as raw scans from a scanner do:\n\n"
                + "\n".join(f"- {line}" for line in off_grid)
                + "\n\nThey must be co-registered first: 'Raw scans' below does that (ticked for you).",
                icon=":material/info:")
    raw = st.checkbox(
        "Raw scans: co-register the sequences, remove the skull and resample them to 1 mm", value=bool(off_grid),
        key=f"raw_{round_}_{bool(off_grid)}",
        help="As `neuromap segment --raw`: for scans as they come from the scanner (each sequence on its own grid, "
             "skull on, thick slices). The other sequences are registered to the T1ce (else the FLAIR), the brain "
             "is extracted with deepbet, and the labels are written on the T1ce's own grid. Takes a few minutes on "
             "a CPU.")
    if not raw:
        return None, ("The sequences lie on different voxel grids: tick 'Raw scans' so they are co-registered first."
                      if off_grid else None)
    stripped = st.checkbox("Already skull-stripped (the brain is the non-zero voxels; deepbet is not run)",
                           key=f"stripped_{round_}")
    automatic = choose_reference(reads) if reads else None
    options = [None, *[m for m in MODALITIES if m in reads]]
    reference = st.selectbox(
        "Reference sequence", options, key=f"reference_{round_}",
        format_func=lambda m: f"Automatic ({SEQUENCE_NAMES[automatic]})" if m is None and automatic
        else "Automatic" if m is None else SEQUENCE_NAMES[m],
        help="The other sequences are registered to it, and the labels are written on its voxel grid. Automatic: "
             "T1ce, else FLAIR (the sharpest and most often thin-sliced).")
    n4 = st.checkbox("Bias-field correction (N4) after brain extraction", key=f"n4_{round_}",
                     help="For scans with strong intensity inhomogeneity (e.g. surface coils); adds tens of seconds.")
    return RawOptions(reference=reference, skull_stripped=stripped, n4=n4, save_brain_mask=True,
                      save_prepared=True), None


# ---------------------------------------------------------------------------------------------------- results


def volumes_panel(result: dict) -> None:
    """Volumes of the model's task, warnings and model facts."""
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


def downloads_panel(result: dict) -> None:
    """The downloads (the files the segmenter wrote, byte for byte, the report naming the uploaded files; raw
    scans add the brain mask, DICOM studies the DICOM SEG) and what the label values mean."""
    report, task, files = result["report"], result_task(result), result["files"]
    st.subheader("Downloads")
    kinds = [(result["labels_output"], "Label map (NIfTI, input grid)", "application/gzip"),
             (files["report.json"], "Report (JSON)", "application/json"),
             (files["overlay.png"], "Overlay (PNG)", "image/png")]
    if UNCERTAINTY in files:
        kinds.append((files[UNCERTAINTY], "Uncertainty map (NIfTI, input grid, 0-255)", "application/gzip"))
    if DICOM_SEG in files:
        dicom = report["dicom"]
        reference = next(s for s in dicom["series_used"].values() if s["uid"] == dicom["reference_series"])
        kinds.append((files[DICOM_SEG], f"DICOM SEG (on series #{reference['number']})", "application/dicom"))
    if BRAIN_MASK in files:
        kinds.append((files[BRAIN_MASK], "Brain mask (NIfTI, input grid)", "application/gzip"))
    for file, label, mime in kinds:
        path = Path(file)
        st.download_button(label, path.read_bytes(), file_name=path.name, mime=mime, key=f"dl_{label}",
                           on_click="ignore", icon=":material/download:", width="stretch")
    convention = report["label_convention"]
    values = ", ".join(f"{value} {task.short_names[internal]}"
                       for value, internal in CONVENTIONS[convention].items() if internal)
    st.caption(f"Labels in the NIfTI: {values} ({convention} convention). Segmented from: "
               + ", ".join(f"{SEQUENCE_NAMES[m]} {name}" for m, name in report["inputs"].items()) + ".")


def scroll_to(anchor: str) -> None:
    """Bring the element with id ``anchor`` into view once (a 1-pixel frame whose script reaches its parent page,
    which Streamlit serves from the same origin)."""
    st.iframe(f"<script>window.parent.document.getElementById({json.dumps(anchor)})"
              "?.scrollIntoView({behavior: 'smooth', block: 'start'});</script>", height=1)


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
        queue_workers()
    except NeuroMapError as exc:
        st.error(str(exc))
        return
    workspace()  # first: a session whose folder went with a dropped connection forgets its case and job
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

    staged, study = st.session_state.get("staged"), st.session_state.get("study")
    if st.session_state.get("upload_error"):
        st.error(f"{st.session_state.upload_error}\n\nNothing was kept. Remove the file in the sidebar (x) or press "
                 "'Start over', then upload again.")
    elif not (staged or study):
        st.info("Upload the MRI sequences of one patient in the sidebar: T1, T1ce, T2 and FLAIR as .nii/.nii.gz "
                "files (BraTS naming is recognised), or the case folder or a DICOM study as one .zip.",
                icon=":material/upload:")
    if staged or study:
        case_panel(staged, study, model, model_problem, tta)

    result = st.session_state.get("result")
    if result:
        st.divider()
        st.subheader(f"Result: {result['case_id']}", anchor="result")
        viewer(result, SEQUENCE_NAMES)
        left, right = st.columns([1.4, 1], gap="large")
        with left:
            volumes_panel(result)
        with right:
            downloads_panel(result)
        if st.session_state.pop("scroll_to_result", False):
            scroll_to("result")


if __name__ == "__main__":
    main()
