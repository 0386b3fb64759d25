"""Faithfulness: do an output's facts come from its input? The hallucinated-entity rate.

ROUGE rewards the words a summary shares with its reference, so a fluent summary of the wrong facts
("buys a yellow lamp for 38 dollars" for a dialogue about an 18-dollar black scarf) can still score
well, and on DialogSum a generic sentence reaches ROUGE-1 ~0.25. Entity-level factual consistency
(Nan et al. 2021, "Entity-level Factual Consistency of Abstractive Text Summarization") asks instead
which of the output's named entities and numbers appear in the source: the share that do not is the
hallucinated-entity rate.

That work finds entities with a named-entity tagger. None can be installed offline here (spaCy's
models come from GitHub, not PyPI), and a tagger relies on capitals that an uncased model's output
(all-MiniLM's tokenizer lowercases) does not have. So the entities are found with rules, stated here:

- numbers: digits (``18``, ``9.50``, ``10:30``, ``1,000``) and number words (``three``, ``forty``),
  compared by value, so "3 days" is supported by "three days";
- names: words written with a capital that are not the first word of a sentence or turn, and, for
  outputs in any case, words of the *name lexicon*: the words the evaluated data (inputs and
  references) writes capitalised mid-sentence more often than not (``Rosa``, ``Friday``, ``Oslo``);
  so "rosa" in a lowercased output is a name, while "the" never is;
- not counted: speaker tags (``#Person1#``), which every dialogue contains, and the pronoun "I".

An entity is supported when the input contains it (case-insensitive words; numbers by value). Per
output: hallucinated / entities; outputs without entities are left out of the mean and counted.
Not caught: invented common nouns ("lamp" for "scarf") and invented names an uncased output writes
that appear nowhere in the data. Tested on hand-written cases (tests/test_faithfulness.py).
"""
from __future__ import annotations

import re
from collections import Counter

# words: a speaker tag, a number (with , . : inside), or letters with inner apostrophes / hyphens
_WORD = re.compile(r"#\w+#|\d+(?:[.,:]\d+)*|[^\W\d_]+(?:['’-][^\W\d_]+)*")
# a new sentence or turn starts after . ! ? or a colon, and at every line start
_BOUNDARY = re.compile(r"[.!?:\n]")
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
NUMBER_WORDS = {w: str(i) for i, w in enumerate(_UNITS)}
NUMBER_WORDS.update({w: str(20 + 10 * i) for i, w in enumerate(_TENS)})
NUMBER_WORDS.update({"hundred": "100", "thousand": "1000", "million": "1000000", "dozen": "12"})
_NOT_NAMES = {"i", "i'm", "i'll", "i've", "i'd"}


def _words(text: str):
    """(word, starts_a_sentence) pairs."""
    end = None
    for match in _WORD.finditer(text):
        yield match.group(), end is None or bool(_BOUNDARY.search(text, end, match.start()))
        end = match.end()


def _number(word: str) -> str | None:
    """The value of a number word or digits as a canonical string, else None."""
    lowered = word.lower()
    if lowered in NUMBER_WORDS:
        return NUMBER_WORDS[lowered]
    if word[0].isdigit():
        digits = word.replace(",", "")
        try:
            value = float(digits)
        except ValueError:
            return word  # 10:30 and the like: compared as written
        return str(int(value)) if value.is_integer() else str(value)
    return None


def name_lexicon(texts) -> set[str]:
    """Lowercased words the texts write capitalised mid-sentence more often than lowercase."""
    capitalised, lower = Counter(), Counter()
    for text in texts:
        for word, initial in _words(text or ""):
            if word.startswith("#") or word[0].isdigit():
                continue
            if word[0].isupper() and not initial:
                capitalised[word.lower()] += 1
            elif word[0].islower():
                lower[word] += 1
    return {w for w, n in capitalised.items() if n > lower[w] and w not in _NOT_NAMES}


def entities(text: str, lexicon: set[str] = frozenset()) -> list[str]:
    """The output's entities, normalised: numbers as values, names lowercased; in order of appearance."""
    found = []
    for word, initial in _words(text or ""):
        if word.startswith("#"):
            continue  # speaker tags
        number = _number(word)
        if number is not None:
            found.append(number)
            continue
        lowered = word.lower()
        if lowered in _NOT_NAMES:
            continue
        if lowered in lexicon or (word[0].isupper() and not initial):
            found.append(lowered)
    return found


def _support(source: str) -> set[str]:
    """What an input can support: its lowercased words and the values of its numbers."""
    out = set()
    for word, _ in _words(source or ""):
        out.add(word.lower())
        number = _number(word)
        if number is not None:
            out.add(number)
    return out


def hallucinated(output: str, source: str, lexicon: set[str] = frozenset()) -> list[str]:
    """The output's entities its source does not contain (each occurrence)."""
    support = _support(source)
    return [e for e in entities(output, lexicon) if e not in support]


def scores(predictions: list[str], sources: list[str], lexicon: set[str]) -> tuple[dict, dict]:
    """(summary, per-example): `hallucinated_entity_rate` is the mean over outputs with entities of
    the share of their entities missing from their input; per example None where there are none."""
    per, invented, total = [], [], 0
    for output, source in zip(predictions, sources):
        found = entities(output, lexicon)
        missing = hallucinated(output, source, lexicon) if found else []
        per.append(len(missing) / len(found) if found else None)
        invented.append(missing)
        total += len(found)
    rated = [r for r in per if r is not None]
    summary = {"hallucinated_entity_rate": sum(rated) / len(rated) if rated else None,
               "entities_per_output": total / len(predictions) if predictions else 0.0,
               "outputs_without_entities": len(per) - len(rated),
               "hallucinated_entities": sum(len(m) for m in invented)}
    return summary, {"hallucinated_entity_rate": per, "invented_entities": invented}


def spans(text: str, invented) -> list[tuple[int, int]]:
    """Character spans of the words in `text` that are among the `invented` entities (as `entities`
    normalises them), so a report can mark them."""
    wanted = set(invented)
    out = []
    for match in _WORD.finditer(text or ""):
        word = match.group()
        if word.startswith("#"):
            continue
        number = _number(word)
        if (number if number is not None else word.lower()) in wanted:
            out.append(match.span())
    return out
