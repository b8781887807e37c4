"""The embedded CLDR corpus: coverage, long tail, alignment with English, determinism."""

import pytest
from babel.core import get_global

from data_recipes.embedded_cldr import ENGLISH, LOCALES, EmbeddedCLDR


@pytest.fixture(scope="module")
def sources():
    return {s.name: s for s in EmbeddedCLDR().sources()}


def _mono(sources):
    return {n: s for n, s in sources.items() if s.kind == "mono"}


def test_many_languages_and_scripts(sources):
    mono = _mono(sources)
    assert len(mono) >= 20
    scripts = {s.script for s in mono.values()}
    assert None not in scripts
    assert len(scripts) >= 5
    for script in ("Latn", "Cyrl", "Arab", "Deva", "Hans", "Jpan", "Kore", "Ethi", "Geor"):
        assert script in scripts


def test_long_tail(sources):
    sizes = {n: len(s.records) for n, s in _mono(sources).items()}
    assert max(sizes.values()) / min(sizes.values()) >= 100
    assert max(sizes, key=sizes.get) == ENGLISH
    # Thin locales are really thin, big ones really big.
    assert sizes["glv"] < 50 and sizes["rus"] > 2000


def test_parallel_pairs_align_with_english(sources):
    pairs = {(r["src"], r["tgt"]) for r in sources["deu-eng"].records}
    assert ("Deutschland", "Germany") in pairs
    assert ("Januar", "January") in pairs
    assert ("日本", "Japan") in {(r["src"], r["tgt"]) for r in sources["jpn-eng"].records}
    assert ("Россия", "Russia") in {(r["src"], r["tgt"]) for r in sources["rus-eng"].records}
    english = {r["text"] for r in sources[ENGLISH].records}
    for name, src in sources.items():
        if src.kind != "parallel":
            continue
        lang = name.split("-")[0]
        assert (src.src_lang, src.tgt_lang, src.language) == (lang, ENGLISH, lang)
        mono = {r["text"] for r in sources[lang].records}
        assert src.records, name
        for rec in src.records:
            assert rec["src"] != rec["tgt"]
            assert rec["tgt"] in english
            assert rec["src"] in mono
            assert "{" not in rec["src"] and "{" not in rec["tgt"]


def test_mono_sources_are_deduplicated_and_non_empty(sources):
    for name, src in _mono(sources).items():
        texts = [r["text"] for r in src.records]
        assert len(texts) == len(set(texts)), name
        assert all(t and t == t.strip() for t in texts), name


def test_deterministic(sources):
    again = list(EmbeddedCLDR().sources())
    assert [s.name for s in again] == list(sources)
    for src in again:
        assert src.records == sources[src.name].records
    assert EmbeddedCLDR().fingerprint() == EmbeddedCLDR().fingerprint()


def test_iso_codes_come_from_babel_aliases():
    aliases = get_global("language_aliases")
    for cldr, iso in LOCALES:
        babel_codes = {k for k, v in aliases.items() if v == cldr and len(k) == 3}
        assert iso in babel_codes or (not babel_codes and iso == cldr), (cldr, iso, babel_codes)


def test_locale_subset_and_bad_locale():
    recipe = EmbeddedCLDR(locales=["el", "gv"], include_parallel=False)
    names = [s.name for s in recipe.sources()]
    assert names == ["eng", "ell", "glv"]
    assert recipe.fingerprint() != EmbeddedCLDR().fingerprint()
    with pytest.raises(ValueError, match="xx"):
        EmbeddedCLDR(locales=["de", "xx"])
