"""Which series of a DICOM study is T1, T1ce, T2 and FLAIR.

Scanners name series freely ("AX T1 POST GAD", "t2_tse_tra", "T2 FLAIR AX", "Sag MPRAGE"), so the choice
reads the SeriesDescription and ProtocolName first, then the acquisition tags when the names say nothing:
contrast agent (0018,0010) for post-contrast T1, inversion time for FLAIR, TR/TE for T1 versus T2. Localizers,
diffusion, perfusion, susceptibility, angiography and derived maps are ignored with the reason. Where two
series fit one sequence an axial one is preferred (the models segment axial slices); any tie left is an
error that lists every series, because guessing the wrong T1ce silently would corrupt the segmentation.
``--map MOD=VALUE`` overrides the choice by SeriesInstanceUID, series number or exact description.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from neuromap.config import MODALITIES, canonical_modality
from neuromap.errors import NeuroMapError
from neuromap.io.dicom import Series

# Every shipped BraTS model reads at least these two; T1 and T2 are optional (another model is picked).
REQUIRED = ("t1ce", "flair")
LOCALIZER = re.compile(r"\b(loc|locali[sz]er|scout|survey|3 ?plane|tri ?pilot|aa ?head\w*|aa ?scout|calibration|"
                       r"asset ?cal|cal|pure|refscan)\b")
OTHER = re.compile(r"\b(dwi|dti|diff\w*|adc|trace|swi|swan|susc\w*|perf\w*|dsc|dce|pwi|p?c?asl|mra|tof|angio\w*|"
                   r"mrv|veno\w*|mrs|svs|csi|bold|fmri|t2 ?\*|t2star|hemo\w*|mip|minip|cbf|cbv|mtt|ttp|fa|"
                   r"tensor|sub|subtract\w*|mpr|reformat\w*|moco)(?!\w)")
T1_FLAIR = re.compile(r"\bt1\w* flair|flair \w*\s?t1\b")  # GE's T1-weighted FLAIR is a T1, not a FLAIR
FLAIR = re.compile(r"flair|tirm|dark ?fluid|\bt2 ?f\b|\bfla\b")
T2 = re.compile(r"\bt2(w|weighted)?\b|\bt2 ?(tse|fse|se|ax|axial|tra|blade|propeller|space|cube)\b")
T1 = re.compile(r"\bt1(w|weighted|c|ce|gd|post|pre)?\b|\bmp ?rage\b|\bspgr\b|\bbravo\b|\btfl\b|\bvibe\b|\bfl3d\b")
POST = re.compile(r"\bpost\w*|\+ ?c\b|\bc ?\+|\+ ?gd|\bgad\w*|\bgd\b|\bce\b|contrast|\bt1c\b|t1ce|t1gd|\bkm\b|\bmdc\b")
PRE = re.compile(r"\bpre\w*|\bnati(ve|v)\b|\bwo\b|without|\bnon ?contrast|\bplain\b")
NO_AGENT = {"", "none", "no", "n/a", "na", "0"}


@dataclass
class Verdict:
    """What a series looks like: a modality (or None) and the evidence, in words a person can check."""

    modality: str | None
    why: str


def _number(text: str) -> float | None:
    try:
        return float(text.split("\\")[0]) if text else None
    except ValueError:
        return None


def classify(series: Series) -> Verdict:
    """The sequence a series holds, from its names, else its acquisition tags; None for anything else."""
    words = re.sub(r"[_/\-.,;:()\[\]]+", " ", f"{series.description} {series.protocol}".lower())
    words = re.sub(r"\s+", " ", words).strip()
    named = f"'{series.description or series.protocol}'"
    agent = series.tags.get("ContrastBolusAgent", "")
    has_agent = agent.strip().lower() not in NO_AGENT
    if "LOCALIZER" in series.tags.get("ImageType", "").upper() or LOCALIZER.search(words):
        return Verdict(None, "localizer / calibration scan")
    if series.tags.get("Modality", "MR") not in ("MR", ""):
        return Verdict(None, f"not MR (modality {series.tags['Modality']})")
    if OTHER.search(words):
        return Verdict(None, f"not a structural T1/T2/FLAIR sequence ({named})")
    if T1_FLAIR.search(words) or (T1.search(words) and not FLAIR.search(words)):
        modality, why = "t1", f"description {named}"
    elif FLAIR.search(words):
        modality, why = "flair", f"description {named}"
    elif T2.search(words):
        modality, why = "t2", f"description {named}"
    else:
        modality, why = _from_acquisition(series)
    if modality == "t1":
        if PRE.search(words):
            why += "; pre-contrast by its name" + (f" (contrast agent tag '{agent}' disregarded)" if has_agent else "")
        elif POST.search(words) or has_agent:
            modality = "t1ce"
            why += f"; contrast agent tag '{agent}'" if has_agent else "; post-contrast by its name"
    if modality and series.problem:
        return Verdict(None, f"looks like {modality} ({why}) but {series.problem}")
    return Verdict(modality, why) if modality else Verdict(None, why)


def _from_acquisition(series: Series) -> tuple[str | None, str]:
    """FLAIR: inversion time >= 1500 ms with long TE; T2: long TR and TE; T1: short TE with short TR or an
    MPRAGE-like inversion (300-1300 ms)."""
    tr, te, ti = (_number(series.tags.get(k, "")) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    shown = ", ".join(f"{k} {v:g} ms" for k, v in (("TR", tr), ("TE", te), ("TI", ti)) if v is not None)
    if ti is not None and ti >= 1500 and te is not None and te >= 60:
        return "flair", f"acquisition tags ({shown})"
    if te is not None and te >= 60 and tr is not None and tr >= 1500:
        return "t2", f"acquisition tags ({shown})"
    if te is not None and te <= 30 and ((tr is not None and tr <= 1000) or (ti is not None and 300 <= ti <= 1300)):
        return "t1", f"acquisition tags ({shown})"
    return None, f"sequence not recognised from its description or {shown or 'acquisition tags (none)'}"


@dataclass
class StudyChoice:
    """The series a study's case uses, by modality, and every other series with the reason it was left out."""

    series: list[Series]
    used: dict[str, Series] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)  # series UID -> reason
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # DICOM files that are not images, one note each
    ambiguous: dict[str, list[Series]] = field(default_factory=dict)  # modality -> the series that tie for it

    def listing(self) -> str:
        """Every series, one line each: number, description, size, UID, and what became of it."""
        lines = [f"Series found ({len(self.series)}):"]
        for s in self.series:
            modality = next((m for m, u in self.used.items() if u is s), None)
            status = f"-> {modality} ({self.why[modality]})" if modality else f"ignored: {self.ignored.get(s.uid, '')}"
            lines.append(f"  {s.label()}  {status}")
        return "\n".join(lines)

    def reference(self, modalities: list[str]) -> Series:
        """The series whose grid the outputs use: T1ce, else FLAIR, else the first modality."""
        return self.used[next((m for m in ("t1ce", "flair") if m in modalities), modalities[0])]

    def report(self) -> dict:
        def entry(s: Series) -> dict:
            return {"number": s.number, "description": s.description, "protocol": s.protocol, "uid": s.uid,
                    "size": s.size, "files": len(s.files)}

        used = {m: {**entry(s), "why": self.why[m]} for m, s in self.used.items()}
        ignored = [{**entry(s), "reason": self.ignored[s.uid]} for s in self.series if s.uid in self.ignored]
        return {"series_used": used, "series_ignored": ignored, "skipped_files": self.skipped}


def _matches(series: list[Series], value: str) -> list[Series]:
    """Series named by ``value``: its UID, its series number, or its exact description or protocol name."""
    wanted = " ".join(value.split()).lower()
    for test in (lambda s: s.uid == value.strip(),
                 lambda s: wanted.isdigit() and s.number == int(wanted),
                 lambda s: wanted in (" ".join(s.description.split()).lower(), " ".join(s.protocol.split()).lower())):
        found = [s for s in series if test(s)]
        if found:
            return found
    return []


def map_study(series: list[Series], overrides: dict[str, str] | None = None, where: str = "",
              chosen_in: str | None = None) -> StudyChoice:
    """Choose one series per modality (overrides first); raise NeuroMapError on ties or a missing T1ce/FLAIR.
    ``chosen_in`` (e.g. "the web app's series table"): ``overrides`` are the whole choice, made by a person there,
    and no other series is used (the report keeps what NeuroMap read from each series)."""
    choice = propose(series, overrides, where, chosen_in)
    if choice.ambiguous:
        ties = list(choice.ambiguous)
        raise NeuroMapError(
            f"{where}: several series fit {', '.join(ties)}, so the mapping is ambiguous.\n{choice.listing()}\n"
            f"Fix: choose with --map, e.g. --map {ties[0]}=SERIES_UID (or the series number or exact description)."
        )
    missing = [m for m in REQUIRED if m not in choice.used]
    if missing:
        raise NeuroMapError(
            f"{where}: no series recognised as {', '.join(missing)} (every model needs T1ce and FLAIR).\n"
            f"{choice.listing()}\nFix: name them with --map, e.g. --map {missing[0]}=SERIES_UID "
            "(or the series number or exact description)."
        )
    return choice


def propose(series: list[Series], overrides: dict[str, str] | None = None, where: str = "",
            chosen_in: str | None = None) -> StudyChoice:
    """What `map_study` chooses, without refusing: a tie leaves its modality in ``ambiguous`` (the first of the
    tied series stands in ``used``) and a missing T1ce/FLAIR is simply absent, so a page can show the choice and
    let a person settle it. An override that names no single readable series is still an error."""
    choice = StudyChoice(series)
    for key, value in (overrides or {}).items():
        modality = canonical_modality(key)
        found = _matches(series, str(value))
        if len(found) != 1:
            what = "matches no series" if not found else f"matches {len(found)} series"
            raise NeuroMapError(f"{where}: --map {key}={value} {what}.\n{choice.listing()}\n"
                                "Fix: give the SeriesInstanceUID, the series number or the exact description.")
        if found[0].problem:
            raise NeuroMapError(f"{where}: --map {key}={value}: series {found[0].label()} {found[0].problem}.")
        choice.used[modality] = found[0]
        if not chosen_in:
            choice.why[modality] = f"--map {key}={value}"
        elif (verdict := classify(found[0])).modality == modality:
            choice.why[modality] = f"{verdict.why}; confirmed in {chosen_in}"
        else:
            choice.why[modality] = f"chosen in {chosen_in}"
    taken = {s.uid for s in choice.used.values()}
    candidates: dict[str, list[tuple[Series, Verdict]]] = {}
    for s in series:
        if s.uid in taken:
            continue
        verdict = classify(s)
        if verdict.modality is None:
            choice.ignored[s.uid] = verdict.why
        elif chosen_in or verdict.modality in choice.used:
            choice.ignored[s.uid] = f"looks like {verdict.modality} ({verdict.why}); " + (
                f"not chosen in {chosen_in}" if chosen_in else "--map chose another series")
        else:
            candidates.setdefault(verdict.modality, []).append((s, verdict))
    for modality, group in candidates.items():
        best = [c for c in group if c[0].is_axial] or group
        chosen, verdict = best[0]
        choice.used[modality], choice.why[modality] = chosen, verdict.why
        tied = len(best) > 1
        if tied:
            choice.ambiguous[modality] = [s for s, _ in best]
            choice.why[modality] += " - AMBIGUOUS"
        for s, other in group:
            if s is not chosen:
                choice.ignored[s.uid] = f"also fits {modality} ({other.why}); " + (
                    "AMBIGUOUS" if tied and any(s is b for b, _ in best) else "the axial series was preferred")
    choice.used = {m: choice.used[m] for m in MODALITIES if m in choice.used}
    absent = [m for m in MODALITIES if m not in choice.used]
    if absent:
        choice.warnings.append(f"DICOM study: no series recognised as {', '.join(absent)}, so only models reading "
                               f"{', '.join(choice.used)} can be used (see the report's DICOM series list)")
    return choice
