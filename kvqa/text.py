"""The one text normaliser: what makes two texts "the same text" everywhere in the pipeline.

`normalise_text` is the form in which texts are compared: the grounding reader reads it (on top of it,
`generate.reader.reading_form` applies the reader's own rewrites), dedup's exact duplicates and embedding
cache keys are it with `punctuation=False`, and the catalog matches label tokens (answers, synonyms, empty
questions) in it. One set of rules, so "oesophagitis" and "esophagitis", "colour" and "color", a curly and a
straight apostrophe, an en dash and a hyphen are equal for every use.

The rules: lower case; Unicode quotes and dashes to ASCII; the British -> American spelling table
`SPELLING` (plus the label files' known misspellings); with `punctuation=False`, punctuation dropped except
`/` and `-` (they join words: "lower-right", "yes/no"); runs of white space collapsed to one space.
"""

from __future__ import annotations

import re

# British -> American spelling (and the label files' known misspellings), as substrings: each entry covers
# its word's forms ("oesophag" covers oesophagus, oesophageal, oesophagitis). Applied in this order to lower
# case text.
SPELLING: tuple[tuple[str, str], ...] = (
    ("colour", "color"), ("centre", "center"), ("artefact", "artifact"), ("oesophag", "esophag"),
    ("haemorrhoid", "hemorrhoid"), ("haemorrhag", "hemorrhag"), ("caecum", "cecum"), ("rigth", "right"),
    ("tumour", "tumor"), ("visualis", "visualiz"), ("millimetre", "millimeter"),
)

# Unicode quotes and dashes -> ASCII (curly quotes and apostrophes, guillemets, hyphen and dash
# characters, the minus sign).
ASCII_PUNCTUATION = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2039": "'", "\u203a": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
})

_SPELLING_RE = re.compile("|".join(re.escape(uk) for uk, _ in SPELLING))
_AMERICAN = dict(SPELLING)
# Everything but word characters, white space, "/" and "-".
_PUNCTUATION_RE = re.compile(r"[^\w\s/-]")


def normalise_text(text: str, *, punctuation: bool = True) -> str:
    """Lower case, plain ASCII quotes and dashes, American spelling, spaces collapsed; with
    `punctuation=False` also every punctuation mark but `/` and `-` dropped (the unit of exact duplication
    and of embedding in dedup)."""
    t = text.lower().translate(ASCII_PUNCTUATION)
    t = _SPELLING_RE.sub(lambda m: _AMERICAN[m.group(0)], t)
    if not punctuation:
        t = _PUNCTUATION_RE.sub(" ", t)
    return " ".join(t.split())
