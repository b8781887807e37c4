"""Embedded default corpus: translated strings from the CLDR data shipped inside ``babel``.

Works offline with no download: for a curated list of locales across many scripts it takes
CLDR's translated display names (languages, territories, scripts, variants, currencies),
calendar names (months, days, quarters, eras, day periods), unit names and unit patterns,
relative date fields and time-zone names, and keeps each string whose translation differs from
the English one at the same CLDR key. That yields real parallel pairs ``(locale, English)`` and,
per language, a monolingual source of its de-duplicated strings (one string per document).

CLDR coverage varies a lot by locale (a few dozen to a few thousand translated strings), so the
corpus has a natural long tail: the English union is the head and thinly covered locales
(Manx, Inuktitut, Cornish, ...) are the tail, more than 100:1 in documents.

Placeholders in patterns (``"{0} Meter"``) are filled with a number that fits the plural
category (``one`` -> 1, ``few`` -> 3, ...), and the English side uses the same number with its
own pattern (falling back to English ``other`` when English lacks the category).

Sources (names follow ISO 639-3 where babel's CLDR alias table has a code, else the CLDR code):

* ``<xxx>`` mono, e.g. ``deu``; ``eng`` mono is the union of the English sides;
* ``<xxx>-eng`` parallel with ``src`` in the locale and ``tgt`` in English.

Licence: the CLDR data is (c) Unicode, Inc., distributed under the Unicode License v3
(https://www.unicode.org/license.txt); babel, which packages it, is BSD-3-Clause. Both permit
redistribution and derived data with the notice kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_recipes.base import SourceRecords, sha256_file

# (CLDR locale, ISO 639-3 code). The ISO code is one of babel's CLDR language aliases for the
# locale (checked by the tests); where CLDR lists a macrolanguage and its main member we pick
# the one Tatoeba uses (swh, pes, cmn, npi) so the corpora share names.
LOCALES: tuple[tuple[str, str], ...] = (
    # Latin
    ("de", "deu"),
    ("fr", "fra"),
    ("es", "spa"),
    ("pt", "por"),
    ("it", "ita"),
    ("pl", "pol"),
    ("tr", "tur"),
    ("vi", "vie"),
    ("id", "ind"),
    ("sw", "swh"),
    # Cyrillic
    ("ru", "rus"),
    ("uk", "ukr"),
    ("bg", "bul"),
    # Arabic
    ("ar", "ara"),
    ("fa", "pes"),
    ("ur", "urd"),
    # Devanagari
    ("hi", "hin"),
    ("mr", "mar"),
    ("ne", "npi"),
    # Han, Japanese, Hangul
    ("zh", "cmn"),
    ("ja", "jpn"),
    ("ko", "kor"),
    # one each
    ("th", "tha"),
    ("el", "ell"),
    ("he", "heb"),
    ("ka", "kat"),
    ("hy", "hye"),
    ("am", "amh"),
    ("bn", "ben"),
    ("ta", "tam"),
    # thinly covered locales: the long tail
    ("sa", "san"),
    ("haw", "haw"),
    ("ii", "iii"),
    ("kw", "cor"),
    ("iu", "iku"),
    ("gv", "glv"),
)

ENGLISH = "eng"

# CLDR sections with translated text. Patterns (dates, numbers) are not text and are skipped.
CATEGORIES: tuple[str, ...] = (
    "languages",
    "territories",
    "scripts",
    "variants",
    "currency_names",
    "currency_names_plural",
    "months",
    "days",
    "quarters",
    "eras",
    "day_periods",
    "time_zones",
    "meta_zones",
    "unit_display_names",
    "unit_patterns",
    "date_fields",
    "measurement_systems",
)

# Number substituted for ``{0}`` by plural category; keys that are not plural categories
# (``per``, ``future``) get the ``other`` number.
PLURAL_NUMBERS = {"zero": "0", "one": "1", "two": "2", "few": "3", "many": "5", "other": "7"}


def _flatten(value: Any, path: tuple[str, ...], out: dict[tuple[str, ...], str]) -> None:
    if isinstance(value, dict):
        for key in value:
            _flatten(value[key], (*path, str(key)), out)
    elif isinstance(value, str):
        out[path] = value


def _locale_strings(locale: str, merge_inherited: bool) -> dict[tuple[str, ...], str]:
    from babel import localedata

    data = localedata.load(locale, merge_inherited=merge_inherited)
    out: dict[tuple[str, ...], str] = {}
    for category in CATEGORIES:
        if category in data:
            _flatten(data[category], (category,), out)
    return out


def _fill(pattern: str, number: str) -> str | None:
    text = pattern.replace("{0}", number).strip()
    if "{" in text or not any(ch.isalpha() for ch in text):
        return None
    return " ".join(text.split())


def _pairs(locale: str, english: dict[tuple[str, ...], str]) -> list[tuple[str, str]]:
    """(locale string, English string) pairs that differ, sorted by CLDR key, de-duplicated."""
    # Only the locale's own data: merging would inherit root's untranslated values.
    own = _locale_strings(locale, merge_inherited=False)
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for path in sorted(own):
        en_pattern = english.get(path)
        last = path[-1]
        if en_pattern is None and last in PLURAL_NUMBERS:
            en_pattern = english.get((*path[:-1], "other"))
        if en_pattern is None:
            continue
        number = PLURAL_NUMBERS.get(last, PLURAL_NUMBERS["other"])
        src, tgt = _fill(own[path], number), _fill(en_pattern, number)
        if src is None or tgt is None or src == tgt:
            continue
        if (src, tgt) not in seen:
            seen.add((src, tgt))
            pairs.append((src, tgt))
    return pairs


def _script(locale: str) -> str | None:
    from babel.core import get_global

    likely = get_global("likely_subtags").get(locale)
    if likely:
        parts = likely.split("_")
        if len(parts) >= 2 and len(parts[1]) == 4:
            return parts[1]
    return None


def _dedupe(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


class EmbeddedCLDR:
    """Recipe for the embedded CLDR corpus (see the module docstring).

    Args:
        locales: optional subset of CLDR locale codes from :data:`LOCALES` (None: all).
        include_parallel: also yield the ``<xxx>-eng`` parallel sources.
        name: recipe name used in the cache directory name.
    """

    def __init__(
        self,
        locales: list[str] | None = None,
        include_parallel: bool = True,
        name: str = "embedded_cldr",
    ) -> None:
        known = dict(LOCALES)
        if locales is not None:
            if isinstance(locales, str) or not list(locales):
                raise ValueError(f"locales must be a non-empty list of CLDR codes, got {locales!r}")
            unknown = [loc for loc in locales if loc not in known]
            if unknown:
                raise ValueError(
                    f"unknown embedded locale(s) {unknown}; choose from {sorted(known)}"
                )
        self.locales = [loc for loc, _ in LOCALES if locales is None or loc in set(locales)]
        self.include_parallel = bool(include_parallel)
        self.name = name

    def fingerprint(self) -> dict[str, Any]:
        import babel
        from babel import localedata

        # The inputs are babel's pickled CLDR files; hash each one this recipe reads.
        data_dir = Path(localedata._dirname)
        paths = [data_dir.parent / "global.dat"]
        paths += [data_dir / f"{stem}.dat" for stem in ["root", "en", *self.locales]]
        hashes = {}
        for path in paths:
            if not path.is_file():
                raise ValueError(f"babel locale data file {str(path)!r} is missing")
            hashes[path.name] = sha256_file(path)
        return {
            "recipe": self.name,
            "module": "data_recipes.embedded_cldr",
            "babel_version": babel.__version__,
            "locales": [[loc, dict(LOCALES)[loc]] for loc in self.locales],
            "categories": list(CATEGORIES),
            "plural_numbers": PLURAL_NUMBERS,
            "include_parallel": self.include_parallel,
            "files": hashes,
        }

    def sources(self) -> Iterator[SourceRecords]:
        english = _locale_strings("en", merge_inherited=True)
        iso = dict(LOCALES)
        per_locale = {loc: _pairs(loc, english) for loc in self.locales}
        english_texts = _dedupe([tgt for loc in self.locales for _, tgt in per_locale[loc]])
        yield SourceRecords(
            name=ENGLISH,
            kind="mono",
            records=[{"text": t} for t in english_texts],
            language=ENGLISH,
            script="Latn",
            attributes={"cldr_locale": "en", "origin": "cldr"},
        )
        for loc in self.locales:
            pairs = per_locale[loc]
            if not pairs:
                raise ValueError(f"embedded locale {loc!r} has zero translated strings in babel")
            lang, script = iso[loc], _script(loc)
            attrs = {"cldr_locale": loc, "origin": "cldr"}
            yield SourceRecords(
                name=lang,
                kind="mono",
                records=[{"text": t} for t in _dedupe([src for src, _ in pairs])],
                language=lang,
                script=script,
                attributes=dict(attrs),
            )
            if self.include_parallel:
                yield SourceRecords(
                    name=f"{lang}-{ENGLISH}",
                    kind="parallel",
                    records=[{"src": s, "tgt": t} for s, t in pairs],
                    language=lang,
                    script=script,
                    attributes=dict(attrs),
                    src_lang=lang,
                    tgt_lang=ENGLISH,
                )
