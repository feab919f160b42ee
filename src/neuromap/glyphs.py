"""Text that a picture can draw. Matplotlib's default font has no CJK (and many other) characters: a case named
in Chinese or Japanese came out of the overlay title as empty boxes, the name lost. Here every character gets a
font that has it: the default when it can, else any installed font that covers it (matplotlib falls back
per character through a list of families); a character no installed font has is written as its code point
(``<U+60A3>``), so the picture never silently drops part of a name.
"""

from __future__ import annotations

from functools import lru_cache

BASE_FAMILY = "DejaVu Sans"
# matplotlib's "Last Resort" font draws a generic placeholder for every character: that is a box, not a glyph.
PLACEHOLDER_FAMILIES = ("Last Resort",)


def drawable(text: str) -> tuple[str, list[str]]:
    """``text`` with the characters no installed font can draw replaced by their code points, and the font
    families (default first) that draw the rest, for matplotlib's ``fontfamily``."""
    families = [BASE_FAMILY]
    shown = []
    for char in text:
        family = BASE_FAMILY if char.isascii() else _family_with(ord(char))
        if family is None:
            shown.append(f"<U+{ord(char):04X}>")
            continue
        if family not in families:
            families.append(family)
        shown.append(char)
    return "".join(shown), families


def _family_with(code: int) -> str | None:
    return next((family for family, codes in _charmaps() if code in codes), None)


@lru_cache(maxsize=1)
def _charmaps() -> list[tuple[str, frozenset[int]]]:
    """(family, code points it draws) for every installed font, the default family first; read once."""
    from matplotlib import font_manager, ft2font

    maps = []
    for entry in font_manager.fontManager.ttflist:
        if entry.name.startswith(PLACEHOLDER_FAMILIES):
            continue
        try:
            maps.append((entry.name, frozenset(ft2font.FT2Font(entry.fname).get_charmap())))
        except (OSError, RuntimeError):  # an unreadable font file is skipped like a missing one
            continue
    return sorted(maps, key=lambda item: item[0] != BASE_FAMILY)
