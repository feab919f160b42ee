"""Upload handling for the web app, as plain functions so every safety rule is unit-testable without Streamlit.

Rules: the total upload per case is capped (in code, not only by Streamlit's per-file limit); zip archives are
inspected entry by entry before anything is extracted (absolute paths, ``..`` and symlinks are refused, the
unpacked size is capped and counted while extracting); every file used as a scan must really be NIfTI
(gzip magic for ``.nii.gz``, then a NIfTI-1/2 header) or, from a zip without NIfTI files, DICOM (the 'DICM'
mark); and all files of a browser session live in one private temp folder (`Workspace`) that is deleted on reset
and when the session object goes away.
"""

from __future__ import annotations

import re
import secrets
import shutil
import stat
import struct
import tempfile
import weakref
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from neuromap.config import MODALITIES, MODALITY_ALIASES, canonical_modality
from neuromap.errors import NeuroMapError
from neuromap.io.case import SEG_TOKENS, Case, nifti_stem, split_name_token

DEFAULT_MAX_UPLOAD_MB = 300
IGNORE = "ignore"  # modality choice for an uploaded file that is not used (e.g. a reference segmentation)
NIFTI1_HEADER, NIFTI2_HEADER = 348, 540
GZIP_MAGIC = b"\x1f\x8b"
DICOM_HEAD = 132  # a DICOM file: a 128-byte preamble, then "DICM"
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class StagedFile:
    """An uploaded (or unzipped) NIfTI file inside the session workspace, with its guessed modality."""

    name: str
    path: Path
    guess: str  # canonical modality or IGNORE


class Workspace:
    """One browser session's private temp folder; the app writes nothing anywhere else.

    Cleanup is layered so no path leaks: `clear` on a new upload or 'Start over'; `cleanup` when the browser session
    ends (`neuromap.app_jobs`: Streamlit's session-end hook, after the session's running segmentation, if any, has
    stopped); `weakref.finalize` when the object is garbage-collected; and finalize's own atexit hook deletes what
    is left when the server exits normally (Ctrl+C, SIGTERM).
    """

    def __init__(self, parent: str | Path | None = None) -> None:
        # mkdtemp: mode 0700 (no other local user can read it); the 128-bit token makes the path unguessable too
        self.root = Path(tempfile.mkdtemp(prefix=f"neuromap-app-{secrets.token_hex(16)}-", dir=parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)

    def sub(self, name: str) -> Path:
        """A fresh or existing subfolder (``uploads``, ``case``, ``out``, ``model``)."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clear(self, *names: str) -> None:
        """Delete the named subfolders (all of them when none are named)."""
        targets = [self.root / n for n in names] if names else list(self.root.iterdir())
        for target in targets:
            shutil.rmtree(target, ignore_errors=True)

    def cleanup(self) -> None:
        """Delete the whole folder now (idempotent)."""
        self._finalizer()


def max_upload_bytes(megabytes: float) -> int:
    return int(megabytes * 1024 * 1024)


def check_total_size(sizes: list[int], limit_bytes: int) -> None:
    """Refuse an upload whose files add up to more than the per-case limit."""
    total = sum(sizes)
    if total > limit_bytes:
        raise NeuroMapError(
            f"upload is {total / 2**20:.1f} MB, more than the limit of {limit_bytes / 2**20:.3g} MB per case. "
            "Fix: upload only the sequence files of one case (compressed .nii.gz), or ask whoever runs the app "
            "for a larger upload limit."
        )


def safe_name(name: str) -> str:
    """A file name reduced to its last component and harmless characters (never a path)."""
    base = re.split(r"[\\/]", name)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return cleaned or "file"


def guess_modality(name: str) -> str:
    """Modality from a file name with the same token rules as case discovery; IGNORE for a segmentation or
    an unrecognised name (the user then picks it)."""
    stem = nifti_stem(Path(safe_name(name)))
    if stem is None:
        return IGNORE
    _, token = split_name_token(stem)
    if token in SEG_TOKENS or token not in MODALITY_ALIASES:
        return IGNORE
    return canonical_modality(token)


def case_id_from_names(names: list[str], fallback: str = "case") -> str:
    """The shared prefix of BraTS-style names (``Brats18_x_1_t1.nii.gz`` -> ``Brats18_x_1``), else ``fallback``."""
    prefixes = set()
    for name in names:
        stem = nifti_stem(Path(name))
        if stem is not None:
            prefixes.add(split_name_token(stem)[0])
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    return safe_name(prefix or fallback)


def check_nifti_header(name: str, head: bytes) -> None:
    """Refuse content that is not NIfTI, given the file's first bytes (at least 544 when the file is that long).

    ``.nii.gz`` must be gzip and decompress to a header with sizeof_hdr 348 (NIfTI-1, magic n+1/ni1) or 540
    (NIfTI-2, magic n+2); ``.nii`` must start with such a header. Checked on the bytes, not the name, so a text
    file renamed to .nii.gz is caught before nibabel sees it.
    """
    lower = name.lower()
    if not lower.endswith((".nii", ".nii.gz")):
        raise NeuroMapError(f"{name}: not a NIfTI file name. Fix: upload .nii or .nii.gz files (or one .zip).")
    if not head:
        raise NeuroMapError(f"{name}: the file is empty (0 bytes). Fix: upload the scan again (its copy failed).")
    if lower.endswith(".gz"):
        if not head.startswith(GZIP_MAGIC):
            kind = "text" if _looks_like_text(head) else "not gzip data"
            raise NeuroMapError(
                f"{name}: named .nii.gz but its content is {kind}, not a gzip-compressed NIfTI image. "
                "Fix: upload the original scan file."
            )
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, NIFTI2_HEADER + 4)
        except zlib.error as exc:
            raise NeuroMapError(f"{name}: damaged gzip data ({exc}). Fix: copy the file again.") from None
    if not _is_nifti_header(head):
        raise NeuroMapError(
            f"{name}: no NIfTI-1/NIfTI-2 header (the file is another format or damaged). "
            "Fix: convert the scan to NIfTI (.nii.gz), e.g. with dcm2niix."
        )


def _looks_like_text(data: bytes) -> bool:
    sample = data[:512]
    return bool(sample) and all(b in b"\t\n\r" or 32 <= b < 127 for b in sample)


def _is_nifti_header(head: bytes) -> bool:
    if len(head) < NIFTI1_HEADER:
        return False
    for order in "<>":
        size = struct.unpack(f"{order}i", head[:4])[0]
        if size == NIFTI1_HEADER and head[344:348] in (b"n+1\x00", b"ni1\x00"):
            return True
        if size == NIFTI2_HEADER and head[4:8] == b"n+2\x00":
            return True
    return False


def stage_uploads(files: list[tuple[str, bytes]], folder: Path, limit_bytes: int) -> list[StagedFile]:
    """Check uploaded ``(name, content)`` pairs (total size, NIfTI content, distinct names) and write them into
    ``folder`` under cleaned names; nothing is written unless every file passes, and every refused file is named."""
    check_total_size([len(data) for _, data in files], limit_bytes)
    names = [safe_name(name) for name, _ in files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise NeuroMapError(f"the same file name was uploaded twice: {', '.join(dupes)}. Fix: remove the copy.")
    problems = []
    for name, data in files:  # every refused file is named at once, not one per attempt
        try:
            check_nifti_header(name, data[: NIFTI2_HEADER + 4])
        except NeuroMapError as exc:
            problems.append(str(exc))
    if problems:
        raise NeuroMapError("\n".join(problems))
    folder.mkdir(parents=True, exist_ok=True)
    staged = []
    for (name, data), clean in zip(files, names, strict=True):
        target = folder / clean
        target.write_bytes(data)
        staged.append(StagedFile(name, target, guess_modality(clean)))
    return staged


def entry_parts(info: zipfile.ZipInfo) -> list[str]:
    """The folder and file names of a zip entry, after refusing absolute paths, ``..`` and symbolic links."""
    raw = info.filename
    parts = re.split(r"[\\/]", raw)
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw):
        raise NeuroMapError(f"zip entry '{raw}' has an absolute path; refused (nothing was extracted).")
    if ".." in parts:
        raise NeuroMapError(f"zip entry '{raw}' points outside the archive (..); refused (nothing was extracted).")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise NeuroMapError(f"zip entry '{raw}' is a symbolic link; refused (nothing was extracted).")
    return parts


def file_entries(archive: zipfile.ZipFile) -> tuple[list[zipfile.ZipInfo], list[str]]:
    """Every entry checked (`entry_parts`) before anything is extracted: (files that may be scans, names of
    ignored entries: macOS resource forks and hidden files). Folders are left out."""
    files, ignored = [], []
    for info in archive.infolist():
        parts = entry_parts(info)
        if info.is_dir():
            continue
        if parts[0] == "__MACOSX" or parts[-1].startswith("."):
            ignored.append(info.filename)
        else:
            files.append(info)
    return files, ignored


def is_nifti_entry(info: zipfile.ZipInfo) -> bool:
    return nifti_stem(Path(safe_name(info.filename))) is not None


def check_zip_entries(archive: zipfile.ZipFile, limit_bytes: int) -> tuple[list[zipfile.ZipInfo], list[str]]:
    """Inspect every entry before anything is extracted: (NIfTI entries to use, names of ignored entries).

    Refused: absolute paths, ``..`` components, symlinks, a declared unpacked size over the limit, NIfTI files in
    more than one folder (more than one case), two entries with the same file name.
    """
    files, ignored = file_entries(archive)
    used = [i for i in files if is_nifti_entry(i)]
    ignored += [i.filename for i in files if not is_nifti_entry(i)]
    if not used:
        raise NeuroMapError("the zip holds no .nii/.nii.gz file. Fix: zip the case folder with its sequence files.")
    check_total_size([i.file_size for i in used], limit_bytes)
    folders = {str(PurePosixPath(i.filename.replace("\\", "/")).parent) for i in used}
    if len(folders) > 1:
        raise NeuroMapError(
            f"the zip holds NIfTI files in several folders ({', '.join(sorted(folders)[:4])}); the app segments one "
            "case at a time. Fix: zip a single case folder."
        )
    names = [safe_name(i.filename) for i in used]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise NeuroMapError(f"the zip holds several files named {', '.join(dupes)}. Fix: keep one of each.")
    return used, ignored


def open_zip(source: str | Path | BinaryIO) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise NeuroMapError(f"not a readable zip archive ({exc}). Fix: zip it again (zip -r case.zip CASE/).") from None


def unpack(archive: zipfile.ZipFile, folder: Path, targets: dict[zipfile.ZipInfo, Path], limit_bytes: int,
           head_size: int, accept: Callable[[str, bytes], bool]) -> list[Path]:
    """Copy entries to their target files in ``folder``, returning the targets kept. ``accept(name, first
    bytes)`` keeps a file (True), skips it (False) or refuses the zip (NeuroMapError). The bytes actually produced
    are counted against the limit, so a forged size field cannot inflate past it. On any refusal ``folder`` is
    deleted with everything unpacked so far."""
    kept: list[Path] = []
    budget = limit_bytes
    try:
        for info, target in targets.items():
            with archive.open(info) as src:
                head = src.read(head_size)
                if not accept(target.name, head):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                kept.append(target)
                with open(target, "wb") as dst:
                    dst.write(head)
                    budget -= len(head)
                    while chunk := src.read(_COPY_CHUNK):
                        budget -= len(chunk)
                        if budget < 0:
                            raise NeuroMapError(
                                f"the zip unpacks to more than the limit of {limit_bytes / 2**20:.3g} MB per case "
                                "(its size fields are wrong); refused."
                            )
                        dst.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as exc:
        # RuntimeError: encrypted entry; NotImplementedError: a compression method Python cannot read.
        shutil.rmtree(folder, ignore_errors=True)
        raise NeuroMapError(
            f"the zip cannot be unpacked ({exc}). Fix: zip the case folder again, without a password."
        ) from None
    except NeuroMapError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return kept


def extract_case_zip(
    source: str | Path | BinaryIO, folder: Path, limit_bytes: int
) -> tuple[list[StagedFile], list[str]]:
    """Safely unpack one case folder from a zip into ``folder`` (flat): (staged NIfTI files, ignored entries).

    Every entry is checked first (`check_zip_entries`); while copying (`unpack`), the bytes are counted against
    the limit and each file's header is checked as NIfTI. On any refusal the partly extracted files are removed.
    """
    with open_zip(source) as archive:
        entries, ignored = check_zip_entries(archive, limit_bytes)
        targets = {info: folder / safe_name(info.filename) for info in entries}
        kept = unpack(archive, folder, targets, limit_bytes, NIFTI2_HEADER + 4,
                      lambda name, head: check_nifti_header(name, head) is None)
    return [StagedFile(path.name, path, guess_modality(path.name)) for path in kept], ignored


def extract_dicom_zip(source: str | Path | BinaryIO, folder: Path, limit_bytes: int) -> list[str]:
    """Safely unpack a DICOM export from a zip into ``folder`` with its sub-folders (files of different series
    may share a name), keeping only DICOM files (the 'DICM' mark after the 128-byte preamble, what
    `neuromap.io.dicom` reads): the names of the entries not used are returned. Entries are checked and counted
    as in `extract_case_zip`; a zip without any DICOM file is refused."""
    with open_zip(source) as archive:
        files, ignored = file_entries(archive)
        check_total_size([i.file_size for i in files], limit_bytes)
        targets = {i: folder.joinpath(*(safe_name(part) for part in entry_parts(i) if part not in ("", ".")))
                   for i in files}
        counts = Counter(targets.values())
        dupes = sorted(i.filename for i, t in targets.items() if counts[t] > 1)
        if dupes:
            raise NeuroMapError(f"the zip holds entries that unpack to the same file: {', '.join(dupes[:4])}. "
                                "Fix: zip the export folder again.")
        kept = unpack(archive, folder, targets, limit_bytes, DICOM_HEAD,
                      lambda name, head: head[128:DICOM_HEAD] == b"DICM")
    if not kept:
        shutil.rmtree(folder, ignore_errors=True)
        raise NeuroMapError("the zip holds neither NIfTI files (.nii/.nii.gz) nor DICOM files. Fix: zip the case "
                            "folder with its sequence files, or the folder of a DICOM export.")
    unpacked = set(kept)
    return ignored + [i.filename for i, t in targets.items() if t not in unpacked]


@dataclass(frozen=True)
class ZipUpload:
    """A zip of one case: NIfTI files (``staged``, unpacked flat) or a DICOM export (``dicom``: the folder it was
    unpacked into), and the entries not used."""

    staged: list[StagedFile]
    dicom: Path | None
    ignored: list[str]


def extract_zip(source: str | Path | BinaryIO, folder: Path, limit_bytes: int) -> ZipUpload:
    """A zip with NIfTI files is one case folder (`extract_case_zip`); a zip without any is taken as a DICOM
    export (`extract_dicom_zip`)."""
    with open_zip(source) as archive:
        nifti = any(is_nifti_entry(i) for i in file_entries(archive)[0])
    if nifti:
        staged, ignored = extract_case_zip(source, folder, limit_bytes)
        return ZipUpload(staged, None, ignored)
    return ZipUpload([], folder, extract_dicom_zip(source, folder, limit_bytes))


def chosen_sequences(choices: Mapping[Hashable, str], names: Mapping[Hashable, str]) -> dict[str, Hashable]:
    """Modality -> file (or DICOM series) from the page's choices (key -> modality or IGNORE; ``names``: what
    the page calls each key); refused when two are set to one sequence or none is set, so the page can say so
    before anything runs."""
    chosen: dict[str, Hashable] = {}
    for key, modality in choices.items():
        if modality == IGNORE:
            continue
        if modality not in MODALITIES:
            raise NeuroMapError(f"{names[key]}: unknown sequence '{modality}'; choose one of {list(MODALITIES)}.")
        if modality in chosen:
            raise NeuroMapError(
                f"{names[chosen[modality]]} and {names[key]} are both set to {modality}. "
                f"Fix: set one of them to another sequence or to '{IGNORE}'."
            )
        chosen[modality] = key
    if not chosen:
        raise NeuroMapError("nothing is set to a sequence (t1, t1ce, t2, flair). Fix: choose the sequences.")
    return chosen


def sequences_as_nifti(case: Case, modalities: list[str], folder: Path) -> dict[str, Path]:
    """The sequences of ``case`` (a DICOM study's series) as NIfTI files in ``folder``, each on its own grid, for
    the viewer, which reads NIfTI: int16 when the values are whole numbers in its range, else float32."""
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for modality in modalities:
        array, grid = case.layout.read_sequence(case, modality)
        whole = np.array_equal(array, np.round(array)) and np.abs(array).max(initial=0) < 2**15
        files[modality] = folder / f"{case.case_id}_{modality}.nii.gz"
        nib.save(nib.Nifti1Image(array.astype(np.int16 if whole else np.float32), grid.affine), files[modality])
    return files


# What a web user can do instead of a command-line fix, by the flag the message names (first match wins).
WEB_FIXES = (
    ("--raw", "tick 'Raw scans' under the table: the app then co-registers the sequences, removes the skull and "
              "resamples them to 1 mm."),
    ("--map", "upload the missing sequence and set each file's sequence in the table, or choose a model that needs "
              "only the sequences you have."),
    ("--model", "upload the missing sequence files, or choose (or upload) a model that needs only the sequences "
                "you have."),
    ("--labels", "set that file to 'ignore (not used)' in the table; the app does not need a label file."),
)


def web_message(message: str, root: Path, names: dict[str, str]) -> str:
    """A `NeuroMapError` message reworded for the web page: paths inside the session folder ``root`` become the
    file names the user uploaded (``names``: name in the session folder -> uploaded name; the case folder
    becomes 'the uploaded case'), and a 'Fix:' that names a command-line flag becomes what to do on the page."""
    def file_name(match: re.Match) -> str:
        name = PurePosixPath(match.group(0)).name
        return names.get(name, name) if "." in name else "the uploaded case"

    text = re.sub(re.escape(str(root)) + r"[^\s'\",;:)\]]*", file_name, message)
    head, sep, fix = text.partition("Fix:")
    if sep and re.search(r"(^|\s|\()--?[a-z]", fix):
        web_fix = next((advice for flag, advice in WEB_FIXES if flag in fix), None)
        return f"{head}Fix: {web_fix}" if web_fix else head.rstrip()
    return text
