"""Parity of `modeling_flamingo.evaluation.metrics` with the original's evaluation code (open_flamingo.eval).

The original scores result files: these tests write the files it reads (VQA question/annotation/result JSON, COCO
caption annotation/result JSON), run it, and compare with our in-memory functions on the same data.
"""

import json
import random
import shutil
import sys
from unittest import mock

import pytest

from modeling_flamingo.evaluation import metrics

pytest.importorskip("pycocoevalcap", reason="the `eval` extra is not installed")
from open_flamingo.eval import coco_metric, ok_vqa_utils, vqa_metric  # noqa: E402

# --------------------------------------------------------------------------------------------------------------------
# VQA accuracy
# --------------------------------------------------------------------------------------------------------------------


def _answers(*groups: tuple[str, int]) -> list[str]:
    """Ten annotator answers from (answer, count) pairs."""
    out = [answer for answer, count in groups for _ in range(count)]
    assert len(out) == 10
    return out


# (prediction, 10 ground-truth answers): each case exercises one part of the normalisation or the averaging.
VQA_CASES = [
    ("yes", _answers(("yes", 10))),
    ("yes", _answers(("yes", 1), ("no", 9))),  # leave-one-out: repeated 1, 2, 3, 4 times among 10
    ("yes", _answers(("yes", 2), ("no", 8))),
    ("yes", _answers(("yes", 3), ("no", 7))),
    ("yes", _answers(("yes", 4), ("no", 6))),
    ("Yes.", _answers(("yes", 3), ("no", 7))),  # case, trailing period
    ("yes!", _answers(("Yes", 2), ("yes?", 2), ("no", 6))),
    ("two", _answers(("2", 4), ("3", 6))),  # number words
    ("2", _answers(("two", 3), ("Two", 1), ("three", 6))),
    ("none", _answers(("0", 3), ("zero", 3), ("1", 4))),
    ("a dog", _answers(("dog", 5), ("the dog", 2), ("dogs", 3))),  # articles
    ("the frisbee", _answers(("frisbee", 1), ("a frisbee", 1), ("an frisbee", 1), ("disc", 7))),
    ("dont know", _answers(("don't know", 4), ("dont know", 2), ("no", 4))),  # contractions
    ("its", _answers(("it's", 3), ("its", 3), ("it is", 4))),
    ("hot-dog", _answers(("hot dog", 4), ("hotdog", 3), ("hot - dog", 3))),  # punctuation next to spaces or not
    ("t.v.", _answers(("tv", 3), ("t.v", 3), ("television", 4))),
    ("3.5", _answers(("3.5", 2), ("3 . 5", 1), ("35", 3), ("3.50", 4))),  # periods before digits stay
    ("1,000", _answers(("1000", 3), ("1,000", 3), ("1 000", 4))),  # digit-comma-digit deletes every mark
    ("1,000-2", _answers(("10002", 4), ("1 000 2", 3), ("1000 2", 3))),
    ("red, white", _answers(("red white", 3), ("red,white", 3), ("red", 4))),
    ("yes\n", _answers(("yes\t", 3), (" yes ", 3), ("no", 4))),  # whitespace
    ("(left)", _answers(("left", 3), ("(left)", 3), ("right", 4))),
    ("", _answers(("", 3), ("no", 7))),
    ("we'd've", _answers(("wed've", 3), ("we'd've", 2), ("no", 5))),
    ("Im", _answers(("im", 3), ("i'm", 3), ("Im", 4))),  # capitalised contraction keys never match
    ("u.s.a.", _answers(("usa", 5), ("u.s.a", 5))),
    ("a " * 20 + "." * 40, _answers(("." * 8, 5), ("", 5))),  # only 32 periods are removed
    ("@home", _answers(("home", 3), (" home", 3), ("@ home", 4))),
]


def _write_vqa_files(tmp_path, cases, with_answer_type=True):
    """The question, annotation and result files the original's compute_vqa_accuracy reads (VQAv2 layout)."""
    questions, annotations, results = [], [], []
    for i, (prediction, answers) in enumerate(cases):
        qid = 1000 + 7 * i
        questions.append({"question_id": qid, "image_id": i, "question": f"q{i}?"})
        annotation = {
            "question_id": qid,
            "image_id": i,
            "question_type": "what",
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)],
        }
        if with_answer_type:
            annotation["answer_type"] = "other"
        annotations.append(annotation)
        results.append({"question_id": qid, "answer": prediction})
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {}}
    paths = {name: tmp_path / f"{name}.json" for name in ("questions", "annotations", "results")}
    paths["questions"].write_text(json.dumps({**header, "questions": questions}))
    paths["annotations"].write_text(json.dumps({**header, "annotations": annotations}))
    paths["results"].write_text(json.dumps(results))
    predictions = {r["question_id"]: r["answer"] for r in results}
    references = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
    return paths, predictions, references


def _original_vqa(paths):
    """Overall accuracy and per-question accuracies (x100, rounded to 2) of the original."""
    vqa = vqa_metric.VQA(str(paths["annotations"]), str(paths["questions"]))
    result = vqa.loadRes(str(paths["results"]), str(paths["questions"]))
    evaluator = vqa_metric.VQAEval(vqa, result, n=2)
    evaluator.evaluate()
    return evaluator.accuracy["overall"], evaluator.evalQA


def test_vqa_accuracy_matches_original_on_hand_made_cases(tmp_path):
    paths, predictions, references = _write_vqa_files(tmp_path, VQA_CASES)
    overall, per_question = _original_vqa(paths)
    assert metrics.vqa_accuracy(predictions, references) == overall
    # The original's entry point reads the same files and returns the same number.
    assert (
        vqa_metric.compute_vqa_accuracy(str(paths["results"]), str(paths["questions"]), str(paths["annotations"]))
        == overall
    )
    for qid, prediction in predictions.items():
        assert round(100 * metrics.vqa_item_accuracy(prediction, references[qid]), 2) == per_question[qid], qid
    # Known values of the leave-one-out average: an answer given by k of 10 annotators scores
    # (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
    assert [metrics.vqa_item_accuracy(p, r) for p, r in VQA_CASES[:5]] == pytest.approx([1.0, 0.3, 0.6, 0.9, 1.0])
    assert metrics.vqa_item_accuracy("two", VQA_CASES[7][1]) == pytest.approx(1.0)


def test_vqa_accuracy_matches_original_on_random_answers(tmp_path):
    """Random predictions and answers drawn from pieces that stress every normalisation rule."""
    pieces = ["yes", "no", "Two", "2", "a", "the", "dog", "dogs", "dont", "don't", "t.v.", "3.5", "1,000", "-",
              "hot-dog", "(", "?", "!", ",", ".", "Im", "it's", "its", "none", "0", " ", "\n", "/", "red", "blue"]  # fmt: skip
    rng = random.Random(0)

    def answer() -> str:
        return "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(1, 3)))

    cases = []
    for _ in range(300):
        pool = [answer() for _ in range(rng.randint(1, 4))]
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool) if rng.random() < 0.7 else answer()
        cases.append((prediction, answers))
    paths, predictions, references = _write_vqa_files(tmp_path, cases, with_answer_type=False)
    overall, per_question = _original_vqa(paths)
    assert 0 < overall < 100
    assert metrics.vqa_accuracy(predictions, references) == overall
    ours = {qid: round(100 * metrics.vqa_item_accuracy(p, references[qid]), 2) for qid, p in predictions.items()}
    assert ours == per_question


def test_vqa_accuracy_scores_only_predicted_questions_in_prediction_order(tmp_path):
    paths, predictions, references = _write_vqa_files(tmp_path, VQA_CASES)
    subset = dict(reversed(list(predictions.items())[3:9]))
    expected = round(100 * sum(metrics.vqa_item_accuracy(p, references[q]) for q, p in subset.items()) / 6, 2)
    assert metrics.vqa_accuracy(subset, references) == expected


def test_normalize_vqa_answer():
    assert metrics.normalize_vqa_answer(" The Two dogs, dont!\n") == "2 dogs don't"
    assert metrics.normalize_vqa_answer("1,000.") == "1000"
    assert metrics.normalize_vqa_answer("3.5") == "3.5"


@pytest.mark.parametrize(
    "predictions, references, message",
    [
        ({}, {1: ["yes"]}, "no predictions"),
        ({1: "yes", 2: "no"}, {1: ["yes"]}, "1 predicted id(s) have no references: 2"),
        ({1: "yes"}, {1: "yes"}, "must be a sequence of strings"),
        ({1: "yes"}, {1: []}, "has no references"),
        ({1: 3}, {1: ["3"]}, "not str"),
        ([("a", "b")], {1: ["yes"]}, "must be mappings"),
    ],
)
def test_vqa_accuracy_rejects_bad_input(predictions, references, message):
    with pytest.raises(ValueError, match="VQA accuracy: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        metrics.vqa_accuracy(predictions, references)


# --------------------------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------------------------

GENERATIONS = [
    "A dog on a beach.",
    'A "red" car Output: a cat',
    "two cats Output:Output:",
    " sitting on a bench\nOutput",
    "yes Question: what",
    "a cat, a dog Short answer: no",
    "Answer: 3",
    "blue, red, green",
    "no ,answer",
    "",
    "ShortQuestion",
    '"quoted" , thing, Answerless',
]


@pytest.mark.parametrize("text", GENERATIONS)
def test_postprocessing_matches_original(text):
    # evaluate.py removes the quotes after coco_metric's cut.
    assert metrics.postprocess_captioning_generation(text) == coco_metric.postprocess_captioning_generation(
        text
    ).replace('"', "")
    assert metrics.postprocess_vqa_generation(text) == vqa_metric.postprocess_vqa_generation(text)


def test_postprocessing_values():
    assert metrics.postprocess_captioning_generation('A "red" car Output: a cat') == "A red car "
    assert metrics.postprocess_vqa_generation("a cat, a dog Short answer: no") == "a cat"


# --------------------------------------------------------------------------------------------------------------------
# CIDEr
# --------------------------------------------------------------------------------------------------------------------

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="CIDEr's PTB tokenizer needs java")

CAPTION_REFERENCES = {
    11: ["A dog runs on the beach.", "a brown dog running along the sand", "Dog playing near the ocean waves"],
    5: ["Two people riding bikes down a street.", "Cyclists on a city road", "two men on bicycles, riding"],
    7: ["A plate of food with broccoli.", "A meal with vegetables and rice on a plate", "broccoli and rice"],
    3: ["A cat sleeping on a red couch", "a cat asleep on the sofa", "The cat is lying on a couch."],
    20: ["An airplane flying in a blue sky", "a jet in the sky", "A plane flies overhead."],
}
CAPTION_PREDICTIONS = {
    7: "a plate of broccoli and rice",
    11: 'A "dog" running on the beach!',
    3: "a cat on a couch, sleeping",
    5: "",  # an empty caption scores 0
}  # 20 is not predicted: the original ignores its references (they do not enter the document frequencies)


def _original_cider(tmp_path, predictions, references):
    """The original's compute_cider on files, with METEOR and SPICE (irrelevant to CIDEr) replaced by stubs:
    SPICE downloads Stanford CoreNLP at first use and METEOR starts a 2 GB JVM."""

    class Stub:
        def __init__(self, name):
            self.name = name

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return self.name

    annotations = {
        "images": [{"id": image_id} for image_id in references],
        "annotations": [
            {"image_id": image_id, "id": 100 * image_id + j, "caption": caption}
            for image_id, captions in references.items()
            for j, caption in enumerate(captions)
        ],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    results = [{"image_id": image_id, "caption": caption} for image_id, caption in predictions.items()]
    (tmp_path / "results.json").write_text(json.dumps(results))
    with (
        mock.patch("pycocoevalcap.eval.Spice", lambda: Stub("SPICE")),
        mock.patch("pycocoevalcap.eval.Meteor", lambda: Stub("METEOR")),
        mock.patch("pycocoevalcap.eval.COCOEvalCap.setImgToEvalImgs", autospec=True) as per_image,
    ):
        scores = coco_metric.compute_cider(str(tmp_path / "results.json"), str(tmp_path / "annotations.json"))
    # setImgToEvalImgs(self, scores, imgIds, method) records the per-image scores of each scorer.
    per_image_cider = next(
        dict(zip(call.args[2], call.args[1], strict=True))
        for call in per_image.call_args_list
        if call.args[3] == "CIDEr"
    )
    return scores["CIDEr"] * 100.0, {k: v * 100.0 for k, v in per_image_cider.items()}


@needs_java
def test_cider_matches_original_compute_cider(tmp_path):
    expected, expected_per_image = _original_cider(tmp_path, CAPTION_PREDICTIONS, CAPTION_REFERENCES)
    corpus, per_item = metrics.cider_scores(CAPTION_PREDICTIONS, CAPTION_REFERENCES)
    assert 10 < expected < 300
    assert corpus == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert per_item == pytest.approx(expected_per_image, rel=1e-12, abs=1e-12)
    assert set(per_item) == set(CAPTION_PREDICTIONS)
    assert per_item[5] == 0.0
    assert corpus == pytest.approx(sum(per_item.values()) / len(per_item))
    assert metrics.cider(CAPTION_PREDICTIONS, CAPTION_REFERENCES) == pytest.approx(corpus, rel=1e-12)


@needs_java
def test_cider_of_exact_reference_beats_paraphrase():
    references = {i: refs for i, refs in CAPTION_REFERENCES.items()}
    exact = metrics.cider_per_item({i: refs[0] for i, refs in references.items()}, references)
    worse = metrics.cider_per_item({i: "a picture of something" for i in references}, references)
    assert all(exact[i] > worse[i] for i in references)


def test_cider_without_java_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(metrics.MissingDependencyError, match="apt-get install -y default-jre-headless"):
        metrics.cider({1: "a dog"}, {1: ["a dog"]})


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.tokenizer.ptbtokenizer", None)
    with pytest.raises(metrics.MissingDependencyError, match=r"openflamingo-transformers\[eval\]"):
        metrics.cider({1: "a dog"}, {1: ["a dog"]})
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)
    with pytest.raises(metrics.MissingDependencyError, match="scikit-learn"):
        metrics.roc_auc([0, 1], [0.1, 0.9])


def test_cider_rejects_bad_input():
    with pytest.raises(ValueError, match="CIDEr: 1 predicted id"):
        metrics.cider({1: "a", 2: "b"}, {1: ["a"]})
    with pytest.raises(ValueError, match="CIDEr: no predictions"):
        metrics.cider({}, {1: ["a"]})


# --------------------------------------------------------------------------------------------------------------------
# OK-VQA stemming
# --------------------------------------------------------------------------------------------------------------------

STEM_INPUTS = [
    "dogs", "buses", "leaves", "the children", "running", "swimming", "skiing", "texting", "lying",
    "men's", "boy's", "kid's jeans", "hot dogs", "eating pizzas", "christmas", "tennis", "teeth", "ring",
    "Bears", "NBA Finals", "geese", "mice", "wolves", "surfing boards", "yes", "", "don't", "ice creams",
]  # fmt: skip


@pytest.fixture
def fresh_stemmer(monkeypatch):
    monkeypatch.setattr(metrics, "_stemmer", None)


def _fake_tokenize(text, language="english", preserve_line=False):
    return text.replace("'s", " 's").replace("n't", " n't").split()


def _fake_pos_tag(tokens, tagset=None, lang="eng"):
    # Capitalised plural -> NNPS, plural -> NNS, else NN (a deterministic stand-in for the perceptron tagger).
    return [(t, ("NNPS" if t[:1].isupper() else "NNS") if t.endswith("s") and len(t) > 3 else "NN") for t in tokens]


def test_okvqa_stem_logic_matches_original_with_a_stand_in_tagger(fresh_stemmer, monkeypatch):
    """Same tokens and tags in, same stems out: the table, the "-ing" WordNet verb lemmas (real WordNet) and the
    `inflection` singular of plural nouns. The real tokenizer and tagger are compared below when installed."""
    nltk = pytest.importorskip("nltk")
    monkeypatch.setattr(nltk.tokenize, "word_tokenize", _fake_tokenize)
    monkeypatch.setattr(nltk, "pos_tag", _fake_pos_tag)
    try:
        metrics.check_okvqa_stemmer()
    except metrics.MissingDependencyError as exc:
        pytest.skip(f"no WordNet data: {exc}")  # tests/run.sh installs Debian's wordnet-base
    for text in STEM_INPUTS:
        assert metrics.okvqa_stem(text) == ok_vqa_utils.stemmer.stem(text), text
    assert metrics.okvqa_stem("dogs running") == "dog run"
    assert metrics.okvqa_stem("leaves texting") == "leaf text"
    assert metrics.okvqa_stem("kid's") == "kid 's"
    # postprocess_ok_vqa_generation = cut, then stem, as the original's
    for text in ["swimming dogs, cats Question: x", "leaves Short answer"]:
        assert metrics.postprocess_ok_vqa_generation(text) == ok_vqa_utils.postprocess_ok_vqa_generation(text)


def test_okvqa_stem_matches_original_with_real_nltk_data(fresh_stemmer):
    try:
        metrics.check_okvqa_stemmer()
    except metrics.MissingDependencyError as exc:
        pytest.skip(str(exc))
    for text in STEM_INPUTS:
        assert metrics.okvqa_stem(text) == ok_vqa_utils.stemmer.stem(text), text


def test_okvqa_stem_names_missing_nltk_data(fresh_stemmer, monkeypatch):
    nltk = pytest.importorskip("nltk")

    def missing(message):
        def load(*args, **kwargs):
            raise LookupError(message)

        return load

    # NLTK's messages: current ones quote the resource, older ones colour it.
    monkeypatch.setattr(nltk.tokenize, "word_tokenize", missing("\n  Resource 'punkt_tab' not found.\n  Please"))
    monkeypatch.setattr(nltk, "pos_tag", missing("Resource \x1b[93mmy_tagger\x1b[0m not found."))
    with pytest.raises(metrics.MissingDependencyError) as info:
        metrics.okvqa_stem("dogs")
    message = str(info.value)
    assert "not installed: punkt_tab (tokenizer), my_tagger (POS tagger)" in message
    assert "python -m nltk.downloader" in message


def test_debian_wordnet_is_made_readable_by_nltk(tmp_path, monkeypatch):
    """/usr/share/wordnet (wordnet-base + wordnet-sense-index) becomes an NLTK `corpora/wordnet` in the cache."""
    nltk = pytest.importorskip("nltk")
    if not all((metrics._DEBIAN_WORDNET / name).is_file() for name in metrics._WORDNET_FILES):
        pytest.skip("Debian's wordnet-base/wordnet-sense-index are not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [])
    metrics._install_debian_wordnet(nltk)
    root = tmp_path / "modeling_flamingo" / "nltk_data"
    assert nltk.data.path == [str(root)]
    lexnames = (root / "corpora" / "wordnet" / "lexnames").read_text().splitlines()
    assert lexnames[0] == "00\tadj.all\t3" and lexnames[3] == "03\tnoun.Tops\t1" and lexnames[-1] == "44\tadj.ppl\t3"
    reader = nltk.corpus.reader.WordNetCorpusReader(str(root / "corpora" / "wordnet"), None)
    assert reader.get_version() == "3.0"
    assert min(reader._morphy("swimming", "v"), key=len) == "swim"
    assert reader.synset("dog.n.01").lexname() == "noun.animal"
    metrics._install_debian_wordnet(nltk)  # already there: nothing copied twice, path not duplicated
    assert nltk.data.path == [str(root)]


# --------------------------------------------------------------------------------------------------------------------
# ROC AUC
# --------------------------------------------------------------------------------------------------------------------


def test_roc_auc():
    from sklearn.metrics import roc_auc_score

    # scikit-learn's documented example: 3 of the 4 positive/negative pairs are ordered right.
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    rng = random.Random(0)
    labels = [rng.randint(0, 1) for _ in range(50)]
    scores = [rng.random() for _ in range(50)]
    assert metrics.roc_auc(labels, scores) == roc_auc_score(labels, scores)
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        metrics.roc_auc([0, 1, 1], [0.1, 0.2])


def test_tables_equal_the_originals():
    original = vqa_metric.VQAEval(None, None)
    assert metrics._CONTRACTIONS == {k: v for k, v in original.contractions.items() if k == k.lower()}
    assert metrics._NUMBER_WORDS == original.manualMap
    assert set(metrics._ARTICLES) == set(original.articles)
    assert set(metrics._PUNCTUATION) == set(original.punct)
    assert metrics._OKVQA_MANUAL_STEMS == ok_vqa_utils._MANUAL_MATCHES


def test_import_needs_no_eval_dependency():
    import subprocess

    code = (
        "import sys, modeling_flamingo.evaluation.metrics;"
        "print(sorted(m for m in ('nltk', 'pycocoevalcap', 'sklearn', 'inflection') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
