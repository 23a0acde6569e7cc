"""Scores and answer post-processing of the OpenFlamingo evaluation, equal to the original's numbers.

The original (`open_flamingo/eval/`: `coco_metric.py`, `vqa_metric.py`, `ok_vqa_utils.py`, `evaluate.py`) writes
result files and runs third-party evaluators on them. Here the same computations take in-memory mappings:

- CIDEr: pycocoevalcap's PTB tokenizer (Stanford CoreNLP, run with `java`) and its `Cider` scorer, x100. The original
  runs every COCOEvalCap scorer (BLEU, METEOR, ROUGE-L, SPICE, which downloads CoreNLP models at first use) and only
  reports CIDEr, which does not depend on the others; we run the tokenizer and CIDEr alone.
- VQA accuracy: the original's copy of the VQA evaluation code. Unlike the official script it normalises *every*
  ground-truth answer (punctuation, number words, articles, contractions), not only when annotators disagree; we
  match the original.
- OK-VQA: the original stems predictions with NLTK (tokenizer, POS tagger, WordNet lemmatizer) and `inflection`.
- Hateful Memes: scikit-learn's ROC AUC.

The third-party packages are the optional extra `eval` (`pip install "openflamingo-transformers[eval]"`) and are
imported only when a function needs them. A missing package, a missing `java` or missing NLTK data raises one
`MissingDependencyError` saying what to install.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "MissingDependencyError",
    "check_okvqa_stemmer",
    "cider",
    "cider_per_item",
    "cider_scores",
    "normalize_vqa_answer",
    "okvqa_stem",
    "postprocess_captioning_generation",
    "postprocess_ok_vqa_generation",
    "postprocess_vqa_generation",
    "roc_auc",
    "vqa_accuracy",
    "vqa_item_accuracy",
]

_EVAL_EXTRA = 'pip install "openflamingo-transformers[eval]"'


class MissingDependencyError(RuntimeError):
    """A package, program or data file that a metric needs is not installed; the message says how to get it."""


def _import(module: str, package: str, needed_for: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{needed_for} needs the `{package}` package, which is not installed: {_EVAL_EXTRA}"
        ) from exc


# --------------------------------------------------------------------------------------------------------------------
# Post-processing of generated text
# --------------------------------------------------------------------------------------------------------------------


def postprocess_captioning_generation(text: str) -> str:
    """Cut a generated caption where the model starts a new `Output:` demo, and drop double quotes.

    The original applies `split("Output", 1)[0]` (coco_metric.py) and then removes `"` (evaluate.py); no strip.
    """
    return text.split("Output", 1)[0].replace('"', "")


_VQA_STOP = re.compile("Question|Answer|Short")


def postprocess_vqa_generation(text: str) -> str:
    """Cut a generated VQA answer at the first "Question"/"Answer"/"Short" (the next demo), then at the first ", "."""
    return _VQA_STOP.split(text, maxsplit=1)[0].split(", ", 1)[0]


def postprocess_ok_vqa_generation(text: str) -> str:
    """The OK-VQA post-processing: `postprocess_vqa_generation` then `okvqa_stem`."""
    return okvqa_stem(postprocess_vqa_generation(text))


# --------------------------------------------------------------------------------------------------------------------
# CIDEr
# --------------------------------------------------------------------------------------------------------------------


def _check_java() -> None:
    if shutil.which("java") is None:
        raise MissingDependencyError(
            "CIDEr needs `java` (pycocoevalcap's PTB tokenizer is Stanford CoreNLP) and none is on PATH: install a "
            "Java runtime, e.g. `apt-get install -y default-jre-headless`"
        )


def _check_keys(predictions: Mapping, references: Mapping, what: str) -> None:
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise ValueError(f"{what}: predictions and references must be mappings from item id to text")
    if len(predictions) == 0:
        raise ValueError(f"{what}: no predictions to score")
    missing = [key for key in predictions if key not in references]
    if missing:
        shown = ", ".join(repr(key) for key in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{what}: {len(missing)} predicted id(s) have no references: {shown}")
    for key, text in predictions.items():
        if not isinstance(text, str):
            raise ValueError(f"{what}: the prediction for {key!r} is {type(text).__name__}, not str")


def _reference_list(key: Hashable, refs: Any, what: str) -> list[str]:
    if isinstance(refs, str) or not isinstance(refs, Sequence):
        raise ValueError(f"{what}: the references of {key!r} must be a sequence of strings, got {type(refs).__name__}")
    if len(refs) == 0:
        raise ValueError(f"{what}: {key!r} has no references")
    if not all(isinstance(ref, str) for ref in refs):
        raise ValueError(f"{what}: the references of {key!r} must all be strings")
    return list(refs)


# Java's PTBTokenizer writes to the standard error it inherits: one "PTBTokenizer tokenized N tokens at ..." line per
# run and, for the first character it cannot tokenize, a java.util.logging record (a date line, then "WARNING:
# Untokenizable: ..."). Left alone they land inside the progress bars.
_PTB_NOISE = re.compile(r"^(PTBTokenizer tokenized \d+ tokens|\w{3} \d{1,2}, \d{4} .*edu\.stanford\.nlp\.)")
_UNTOKENIZABLE = "WARNING: Untokenizable:"
_stderr_lock = threading.Lock()


@contextmanager
def _child_stderr_captured(lines: list[str]) -> Iterator[None]:
    """Point file descriptor 2 at a temporary file while inside, so that child processes (java) write there; `lines`
    receives the captured lines on exit, also when the body raised. pycocoevalcap starts java without capturing its
    standard error, so the descriptor it inherits is the only place to catch it."""
    with _stderr_lock, tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines.extend(capture.read().decode("utf-8", errors="replace").splitlines())


def _tokenize_quietly(tokenizer: Any, captions: dict) -> tuple[dict, int]:
    """`tokenizer.tokenize(captions)` with java's messages captured: returns the tokens and the number of characters
    java deleted as untokenizable (0 if none). Lines that are not the tokenizer's usual messages (e.g. a java error)
    are passed on to standard error."""
    lines: list[str] = []
    try:
        with _child_stderr_captured(lines):
            tokens = tokenizer.tokenize(captions)
    finally:  # a java error explains the failure that follows: never swallow it
        other = [line for line in lines if not _PTB_NOISE.match(line) and not line.startswith(_UNTOKENIZABLE)]
        if other:
            print("\n".join(other), file=sys.stderr)
    if not any(line.startswith(_UNTOKENIZABLE) for line in lines):
        return tokens, 0
    return tokens, _count_untokenizable(captions)


def _count_untokenizable(captions: dict) -> int:
    """Characters java's PTBTokenizer deletes from `captions`. Its default (`untokenizable=firstDelete`, what
    pycocoevalcap runs) warns about the first one only; the same lexer with `allDelete` deletes the same characters
    and warns about each. Run only when a first warning was seen; the tokens scored are those of pycocoevalcap's run."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    text = "\n".join(c["caption"].replace("\n", " ") for v in captions.values() for c in v)
    jar_dir = os.path.dirname(os.path.abspath(ptb.__file__))
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write(text)
    try:
        result = subprocess.run(
            ["java", "-cp", ptb.STANFORD_CORENLP_3_4_1_JAR, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines"]
            + ["-options", "untokenizable=allDelete", f.name],
            cwd=jar_dir,
            capture_output=True,
        )
    finally:
        os.remove(f.name)
    # If this run failed, the first run's warning still tells of one character at least.
    return max(1, result.stderr.decode("utf-8", errors="replace").count(_UNTOKENIZABLE))


def cider_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> tuple[float, dict[Hashable, float]]:
    """Corpus CIDEr and per-item CIDEr (both x100) of `predictions` against `references`, from one scorer call.

    Equal to the original's `compute_cider(...)["CIDEr"] * 100`: captions and references go through pycocoevalcap's
    `PTBTokenizer` (lower-cased, punctuation removed; references and predictions tokenized in separate runs as
    COCOEvalCap does), then `Cider` (CIDEr-D, n=4, sigma=6). Only predicted ids are scored, in the order of
    `references` (COCO orders images by the annotation file); references of other ids are ignored, as in the original.

    Per-item scores: CIDEr's document frequencies come from the references of *all* scored items, so an item's score
    depends on which items are scored with it; the corpus score is the mean of the per-item scores.

    Args:
        predictions: item id -> generated caption (already post-processed).
        references: item id -> ground-truth captions; must hold every predicted id.

    Returns:
        `(corpus_cider, {item_id: item_cider})`.
    """
    _check_keys(predictions, references, "CIDEr")
    ids = [key for key in references if key in predictions]
    gts = {key: [{"caption": ref} for ref in _reference_list(key, references[key], "CIDEr")] for key in ids}
    res = {key: [{"caption": predictions[key]}] for key in ids}

    ptb = _import("pycocoevalcap.tokenizer.ptbtokenizer", "pycocoevalcap", "CIDEr")
    cider_module = _import("pycocoevalcap.cider.cider", "pycocoevalcap", "CIDEr")
    _check_java()
    tokenizer = ptb.PTBTokenizer()
    gts_tokens, gts_dropped = _tokenize_quietly(tokenizer, gts)
    res_tokens, res_dropped = _tokenize_quietly(tokenizer, res)
    if gts_dropped or res_dropped:
        logger.warning(
            f"CIDEr: Java's PTB tokenizer deleted {gts_dropped + res_dropped} character(s) it cannot tokenize "
            f"({res_dropped} in the predictions, {gts_dropped} in the references); the original's scores delete them "
            "too."
        )
    if list(gts_tokens) != ids or list(res_tokens) != ids:
        # The tokenizer maps output lines back to ids by position: a lost line would shift every later caption.
        raise RuntimeError("CIDEr: the PTB tokenizer returned a different number of lines than it was given")
    score, scores = cider_module.Cider().compute_score(gts_tokens, res_tokens)
    return float(score * 100.0), {key: float(item * 100.0) for key, item in zip(ids, scores, strict=True)}


def cider(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """CIDEr x100 of `predictions` against `references`, as the original reports it (see `cider_scores`)."""
    return cider_scores(predictions, references)[0]


def cider_per_item(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[Hashable, float]:
    """Per-item CIDEr x100 from the same scorer call as `cider` (document frequencies over all scored items)."""
    return cider_scores(predictions, references)[1]


# --------------------------------------------------------------------------------------------------------------------
# VQA accuracy
# --------------------------------------------------------------------------------------------------------------------

# The normalisation tables of the VQA evaluation code (data, so they must be the same entries). Entries of the
# original whose key has upper-case letters ("Im", "Ive", "Id've", "I'dve") are left out: keys are looked up after
# lower-casing, so they can never match.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The original's pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (typo'd) lookahead that never fails before a
# ".", so it removes every "." not followed by a digit. It is applied with `sub(..., re.UNICODE)`, where the flag
# lands in the `count` argument: at most re.UNICODE == 32 periods are removed. Both quirks are kept.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32


def _strip_punctuation(text: str) -> str:
    # Whether a mark is deleted or replaced by a space is decided on the *input* text (a mark next to a space, or a
    # digit-comma-digit anywhere, means delete); the replacements then apply to the running output.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        delete = delete_all or (mark + " " in text) or (" " + mark in text)
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The normalisation the original applies to the prediction and to every ground-truth answer.

    Newlines/tabs become spaces and the ends are stripped; punctuation is deleted or replaced by a space; then
    lower-case, number words ("two") become digits, articles are dropped and contractions without apostrophe
    ("dont") get one.
    """
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(answer))


def _item_accuracy(prediction: str, references: list[str]) -> float:
    prediction = normalize_vqa_answer(prediction)
    answers = [normalize_vqa_answer(ref) for ref in references]
    # Leave-one-out over the annotators: for each answer, the prediction scores min(1, matches among the *other*
    # answers / 3); the item accuracy is the mean. The original drops the left-out answer by dict inequality, which
    # removes exactly one entry because every annotation carries its own `answer_id`.
    matches = sum(answer == prediction for answer in answers)
    scores = [min(1, float(matches - (answer == prediction)) / 3) for answer in answers]
    return float(sum(scores)) / len(scores)


def vqa_item_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy (0-1) of one prediction against its ground-truth answers (usually 10), unrounded.

    `prediction` is the post-processed generation (stemmed for OK-VQA); `references` are the raw annotator answers.
    """
    if not isinstance(prediction, str):
        raise ValueError(f"VQA accuracy: the prediction is {type(prediction).__name__}, not str")
    return _item_accuracy(prediction, _reference_list("the question", references, "VQA accuracy"))


def vqa_accuracy(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """VQA accuracy (0-100, rounded to 2 decimals) over the predicted questions, as the original's
    `compute_vqa_accuracy`: the mean of the per-question accuracies (`vqa_item_accuracy`) in prediction order.

    Args:
        predictions: question id -> post-processed answer.
        references: question id -> ground-truth answers; must hold every predicted id (others are ignored).
    """
    _check_keys(predictions, references, "VQA accuracy")
    accuracies = [
        _item_accuracy(prediction, _reference_list(key, references[key], "VQA accuracy"))
        for key, prediction in predictions.items()
    ]
    return round(100 * float(sum(accuracies)) / len(accuracies), 2)


# --------------------------------------------------------------------------------------------------------------------
# OK-VQA stemming
# --------------------------------------------------------------------------------------------------------------------

# Hand-made stems of the OK-VQA v1.1 procedure (data of the original's `ok_vqa_utils.py`, where its authors matched
# raw answers to the released stemmed answers): applied before any automatic rule.
_OKVQA_MANUAL_STEMS = {
    "police": "police", "las": "las", "vegas": "vegas", "yes": "yes", "jeans": "jean", "hell's": "hell",
    "domino's": "domino", "morning": "morn", "clothes": "cloth", "are": "are", "riding": "ride", "leaves": "leaf",
    "dangerous": "danger", "clothing": "cloth", "texting": "text", "kiting": "kite", "firefighters": "firefight",
    "ties": "tie", "married": "married", "teething": "teeth", "gloves": "glove", "tennis": "tennis",
    "dining": "dine", "directions": "direct", "waves": "wave", "christmas": "christmas", "drives": "drive",
    "pudding": "pud", "coding": "code", "plating": "plate", "quantas": "quanta", "hornes": "horn",
    "graves": "grave", "mating": "mate", "paned": "pane", "alertness": "alert", "sunbathing": "sunbath",
    "tenning": "ten", "wetness": "wet", "urinating": "urine", "sickness": "sick", "braves": "brave",
    "firefighting": "firefight", "lenses": "lens", "reflections": "reflect", "backpackers": "backpack",
    "eatting": "eat", "designers": "design", "curiousity": "curious", "playfulness": "play", "blindness": "blind",
    "hawke": "hawk", "tomatoe": "tomato", "rodeoing": "rodeo", "brightness": "bright", "circuses": "circus",
    "skateboarders": "skateboard", "staring": "stare", "electronics": "electron", "electicity": "elect",
    "mountainous": "mountain", "socializing": "social", "hamburgers": "hamburg", "caves": "cave",
    "transitions": "transit", "wading": "wade", "creame": "cream", "toileting": "toilet", "sautee": "saute",
    "buildings": "build", "belongings": "belong", "stockings": "stock", "walle": "wall", "cumulis": "cumuli",
    "travelers": "travel", "conducter": "conduct", "browsing": "brows", "pooping": "poop",
    "haircutting": "haircut", "toppings": "top", "hearding": "heard", "sunblocker": "sunblock", "bases": "base",
    "markings": "mark", "mopeds": "mope", "kindergartener": "kindergarten", "pies": "pie",
    "scrapbooking": "scrapbook", "couponing": "coupon", "meetings": "meet", "elevators": "elev", "lowes": "low",
    "men's": "men", "childrens": "children", "shelves": "shelve", "paintings": "paint", "raines": "rain",
    "paring": "pare", "expressions": "express", "routes": "rout", "pease": "peas", "vastness": "vast",
    "awning": "awn", "boy's": "boy", "drunkenness": "drunken", "teasing": "teas", "conferences": "confer",
    "ripeness": "ripe", "suspenders": "suspend", "earnings": "earn", "reporters": "report", "kid's": "kid",
    "containers": "contain", "corgie": "corgi", "porche": "porch", "microwaves": "microwave",
    "batter's": "batter", "sadness": "sad", "apartments": "apart", "oxygenize": "oxygen", "striping": "stripe",
    "purring": "pure", "professionals": "profession", "piping": "pipe", "farmer's": "farmer", "potatoe": "potato",
    "emirates": "emir", "womens": "women", "veteran's": "veteran", "wilderness": "wilder", "propellers": "propel",
    "alpes": "alp", "charioteering": "chariot", "swining": "swine", "illness": "ill", "crepte": "crept",
    "adhesives": "adhesive", "regent's": "regent", "decorations": "decor", "rabbies": "rabbi",
    "overseas": "oversea", "travellers": "travel", "casings": "case", "smugness": "smug", "doves": "dove",
    "nationals": "nation", "mustange": "mustang", "ringe": "ring", "gondoliere": "gondolier",
    "vacationing": "vacate", "reminders": "remind", "baldness": "bald", "settings": "set", "glaced": "glace",
    "coniferous": "conifer", "revelations": "revel", "personals": "person", "daughter's": "daughter",
    "badness": "bad", "projections": "project", "polarizing": "polar", "vandalizers": "vandal",
    "minerals": "miner", "protesters": "protest", "controllers": "control", "weddings": "wed",
    "sometimes": "sometime", "earing": "ear",
}  # fmt: skip

# WordNet 3.0's lexicographer files (the `lexnames` file of the WordNet database; Debian's wordnet-base lacks it,
# NLTK's reader needs it). Their syntactic category follows from the prefix.
_WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
_LEXNAME_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_DEBIAN_WORDNET = Path("/usr/share/wordnet")
_WORDNET_FILES = [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")]
_WORDNET_FILES += [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")] + ["index.sense"]

_NLTK_DATA_HELP = (
    "Get them with NLTK's downloader on a machine with internet access: `python -m nltk.downloader punkt_tab "
    "averaged_perceptron_tagger_eng wordnet` (copy the resulting nltk_data folder over and point NLTK_DATA at it "
    "if this machine is offline). WordNet alone can also come from Debian/Ubuntu: `apt-get install -y "
    "wordnet-base wordnet-sense-index`, which is used automatically."
)
_NLTK_RESOURCE = re.compile(r"Resource\W+([\w.-]+?)\W*\s+not found")
_stemmer_lock = threading.Lock()
_stemmer: Any = None


def _nltk_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modeling_flamingo" / "nltk_data"


def _install_debian_wordnet(nltk: Any) -> None:
    """Make Debian's WordNet 3.0 (/usr/share/wordnet) readable by NLTK when NLTK has no `wordnet` of its own.

    NLTK wants the database as `<root>/corpora/wordnet/` with a `lexnames` file and refuses symbolic links out of
    its root, so the files are copied once into a cache folder (about 35 MB), which is added to `nltk.data.path`.
    """
    try:
        nltk.data.find("corpora/wordnet")
        return
    except LookupError:
        pass
    root = _nltk_cache_dir()
    target = root / "corpora" / "wordnet"
    if not (target / "lexnames").is_file():
        if not all((_DEBIAN_WORDNET / name).is_file() for name in _WORDNET_FILES):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
        try:
            for name in _WORDNET_FILES:
                shutil.copyfile(_DEBIAN_WORDNET / name, staging / name)
            lines = [
                f"{i:02d}\t{name}\t{_LEXNAME_CATEGORY[name.split('.')[0]]}" for i, name in enumerate(_WORDNET_LEXNAMES)
            ]
            # Written last: its presence marks a complete copy.
            (staging / "lexnames").write_text("\n".join(lines) + "\n")
            try:
                os.replace(staging, target)
            except OSError:  # another process finished first
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


class _OkvqaStemmer:
    """NLTK's tokenizer + POS tagger + WordNet lemmatizer, loaded and checked once."""

    def __init__(self) -> None:
        nltk = _import("nltk", "nltk", "OK-VQA stemming")
        self.inflection = _import("inflection", "inflection", "OK-VQA stemming")
        _install_debian_wordnet(nltk)
        self.nltk = nltk
        self.lemmatizer = nltk.stem.WordNetLemmatizer()
        self.verb = nltk.corpus.reader.VERB
        missing = []
        # Each probe loads one resource; NLTK raises LookupError naming the resource it looked for.
        for resource, role, probe in (
            ("punkt_tab", "tokenizer", lambda: nltk.tokenize.word_tokenize("a test")),
            ("averaged_perceptron_tagger_eng", "POS tagger", lambda: nltk.pos_tag(["test"])),
            ("wordnet", "lemmatizer", lambda: self.lemmatizer.lemmatize("testing", self.verb)),
        ):
            try:
                probe()
            except LookupError as exc:
                reported = _NLTK_RESOURCE.search(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)))  # older NLTK: colours
                missing.append(f"{reported[1] if reported else resource} ({role})")
        if missing:
            raise MissingDependencyError(
                f"OK-VQA stemming needs NLTK data that is not installed: {', '.join(missing)}. {_NLTK_DATA_HELP}"
            )

    def __call__(self, text: str) -> str:
        words = []
        for word, tag in self.nltk.pos_tag(self.nltk.tokenize.word_tokenize(text)):
            if word in _OKVQA_MANUAL_STEMS:
                word = _OKVQA_MANUAL_STEMS[word]
            elif word.endswith("ing"):
                word = self.lemmatizer.lemmatize(word, self.verb)
            elif tag.startswith("NNS") or tag.startswith("NNPS"):  # plural (proper) nouns
                word = self.inflection.singularize(word)
            words.append(word)
        return " ".join(words)


def _get_stemmer() -> _OkvqaStemmer:
    global _stemmer
    with _stemmer_lock:
        if _stemmer is None:
            _stemmer = _OkvqaStemmer()
        return _stemmer


def check_okvqa_stemmer() -> None:
    """Raise `MissingDependencyError` now if `okvqa_stem` cannot run (call it before a long OK-VQA generation)."""
    _get_stemmer()


def okvqa_stem(text: str) -> str:
    """Stem an OK-VQA answer as the original (OK-VQA v1.1 procedure): NLTK `word_tokenize` + `pos_tag`; per token,
    a hand-made table first, else words ending in "ing" get WordNet's verb lemma, else plural nouns (tags NNS/NNPS)
    are singularized by `inflection`; tokens are joined by spaces.

    Needs the NLTK data `punkt_tab`, `averaged_perceptron_tagger_eng` and `wordnet` (checked at the first call; a
    `MissingDependencyError` says how to install what is missing).
    """
    if not isinstance(text, str):
        raise ValueError(f"okvqa_stem: expected str, got {type(text).__name__}")
    return _get_stemmer()(text)


# --------------------------------------------------------------------------------------------------------------------
# ROC AUC
# --------------------------------------------------------------------------------------------------------------------


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC of `scores` for binary `labels` (1 = positive), scikit-learn's `roc_auc_score` as the original.

    The original scores Hateful Memes with the probability of "yes" (label 1).
    """
    if len(labels) != len(scores):
        raise ValueError(f"ROC AUC: {len(labels)} labels but {len(scores)} scores")
    metrics = _import("sklearn.metrics", "scikit-learn", "ROC AUC")
    return float(metrics.roc_auc_score(list(labels), list(scores)))
