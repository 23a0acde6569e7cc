"""OK-VQA end to end through NLTK's real code paths, compared with the original (`open_flamingo.eval`).

Both stemmers call the same NLTK functions (`nltk.tokenize.word_tokenize`, `nltk.pos_tag`, WordNet's lemmatizer), so
they agree whatever NLTK data is installed; what must be checked is that ours feeds them the same text, reads the
same tags and applies the same rules, with NLTK loading its data as a user's installation does. The released NLTK
data (`punkt_tab`, `averaged_perceptron_tagger_eng`) cannot be installed from a package registry here, so this test
writes NLTK data packages of its own in NLTK's formats under an `nltk_data` root put first on `nltk.data.path`:

- `tokenizers/punkt_tab/english/`: an untrained Punkt model (its four parameter files empty: no abbreviations,
  collocations or sentence starters), so every ". " ends a sentence;
- `taggers/averaged_perceptron_tagger_eng/`: the three JSON files of an averaged perceptron trained by NLTK's own
  `PerceptronTagger.train` on the hand-tagged phrases below (Penn Treebank tags);
- WordNet: Debian's WordNet 3.0 (wordnet-base, wordnet-sense-index; tests/run.sh installs them), the release.

Not covered: the released Punkt parameters and tagger weights themselves (both implementations load the same files
from a user's NLTK data, so they cannot make the two differ; see docs/evaluation_metrics.md).
"""

from __future__ import annotations

import json
import random

import pytest
from eval_data import cli_flags, make_vqa, tiny_model_folder
from reference_eval import OriginalEvalModel, init_single_process_group, load_original_evaluate, original_args

from modeling_flamingo.evaluation import metrics
from modeling_flamingo.evaluation.__main__ import main
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel

nltk = pytest.importorskip("nltk")
from nltk.tag.perceptron import PerceptronTagger  # noqa: E402
from open_flamingo.eval import ok_vqa_utils  # noqa: E402

# Training phrases for the stand-in tagger: short OK-VQA-like answers, tagged by the Penn Treebank guidelines.
TAGGED = [
    "the/DT dogs/NNS are/VBP running/VBG", "two/CD cats/NNS", "hot/JJ dogs/NNS", "a/DT red/JJ bus/NN",
    "buses/NNS and/CC trains/NNS", "the/DT children/NNS play/VBP", "eating/VBG pizzas/NNS", "surfing/VBG",
    "the/DT man/NN is/VBZ skiing/VBG", "wolves/NNS", "mice/NNS", "geese/NNS", "bears/NNS eat/VBP fish/NN",
    "a/DT boy/NN", "kid/NN 's/POS jeans/NNS", "New/NNP York/NNP Yankees/NNPS", "Chicago/NNP Bears/NNPS",
    "the/DT Beatles/NNPS", "police/NN officers/NNS", "ice/NN creams/NNS", "tennis/NN rackets/NNS",
    "the/DT leaves/NNS fall/VBP", "he/PRP is/VBZ texting/VBG", "lying/VBG down/RB", "st./NNP louis/NNP",
    "yes/UH", "no/DT", "red/JJ", "wooden/JJ tables/NNS", "apples/NNS and/CC oranges/NNS",
]  # fmt: skip
ANSWERS = [
    "dogs", "hot dogs", "buses", "the children", "running", "swimming", "skiing", "texting", "lying", "leaves",
    "men's", "boy's", "kid's jeans", "eating pizzas", "christmas", "tennis rackets", "teeth", "ring", "Bears",
    "NBA Finals", "New York Yankees", "geese", "mice", "wolves", "surfing boards", "yes", "", "don't",
    "ice creams", "st. louis", "dr. pepper", "apples. oranges", "two cats.", "wooden tables", "firefighters",
]  # fmt: skip
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


@pytest.fixture(scope="module")
def nltk_data(tmp_path_factory):
    """An NLTK data root holding the English Punkt model and POS tagger described in the module docstring."""
    root = tmp_path_factory.mktemp("nltk_data")
    punkt = root / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True)
    for name in PUNKT_FILES:
        (punkt / name).write_text("")
    tagger = PerceptronTagger(load=False)
    sentences = [[tuple(pair.rsplit("/", 1)) for pair in phrase.split()] for phrase in TAGGED]
    state = random.getstate()
    random.seed(0)  # training shuffles the sentences between iterations
    try:
        tagger.train(sentences, nr_iter=5)
    finally:
        random.setstate(state)
    folder = root / "taggers" / "averaged_perceptron_tagger_eng"
    folder.mkdir(parents=True)
    for param, name in zip(tagger.encode_json_obj(), tagger.param_files("eng"), strict=True):
        (folder / name).write_text(json.dumps(param))
    return root


def _clear_nltk_caches():
    nltk.tag._get_tagger.cache_clear()
    nltk.tokenize._get_punkt_tokenizer.cache_clear()


@pytest.fixture
def real_nltk(nltk_data, monkeypatch):
    """NLTK finds the data of `nltk_data` first; loaded models and our stemmer are dropped before and after."""
    monkeypatch.setattr(nltk.data, "path", [str(nltk_data), *nltk.data.path])
    monkeypatch.setattr(metrics, "_stemmer", None)
    _clear_nltk_caches()
    yield nltk_data
    _clear_nltk_caches()


def test_okvqa_stem_matches_original_through_nltk(real_nltk):
    metrics.check_okvqa_stemmer()  # the probes of every resource pass: nothing is missing
    assert str(nltk.data.find("taggers/averaged_perceptron_tagger_eng/")).startswith(str(real_nltk))
    assert str(nltk.data.find("tokenizers/punkt_tab/english/")).startswith(str(real_nltk))
    for text in ANSWERS:
        assert metrics.okvqa_stem(text) == ok_vqa_utils.stemmer.stem(text), text
        generation = f"{text} Question: what else?"
        assert metrics.postprocess_ok_vqa_generation(generation) == ok_vqa_utils.postprocess_ok_vqa_generation(
            generation
        ), generation
    # Every rule ran: plural (proper) nouns singularized, "-ing" lemmatized, the hand-made table, sentence splits.
    tags = {tag for text in ANSWERS for _, tag in nltk.pos_tag(nltk.tokenize.word_tokenize(text))}
    assert {"NNS", "NNPS", "VBG"} <= tags
    assert metrics.okvqa_stem("wooden tables") == ok_vqa_utils.stemmer.stem("wooden tables") != "wooden tables"
    assert nltk.tokenize.sent_tokenize("apples. oranges") == ["apples.", "oranges"]


# Generations put in place of the tiny model's (random bytes, which no rule touches), chosen per query question on
# both sides: the references of `make_vqa` ("a dog", "cat", "two", ...) match some of them only once stemmed.
GENERATIONS = ["dogs Question: what is", "cats, dogs", "two cats Short answer", "red buses", "cats", "running dogs"]


def _canned(prompts) -> list[str]:
    """The generation of each prompt: one of GENERATIONS, picked by the text of its query question."""
    return [GENERATIONS[sum(map(ord, p.rsplit("Question:", 1)[-1])) % len(GENERATIONS)] for p in prompts]


def test_okvqa_evaluation_matches_original(real_nltk, tmp_path, monkeypatch):
    """`--eval_ok_vqa` against the original's `evaluate_vqa(dataset_name="ok_vqa")` on the same tiny weights, with
    answer-like generations put in place of the model's on both sides: the same stemmed answer per question and the
    same, non-zero score (prompts and raw generations are compared in tests/test_eval_parity.py)."""
    folder, original, tokenizer = tiny_model_folder(tmp_path)
    init_single_process_group(tmp_path)
    original_model = OriginalEvalModel(original, tokenizer, image_size=42)
    paths = make_vqa(tmp_path / "data", "ok_vqa")
    common = {"num_samples": 5, "query_set_size": 8, "batch_size": 2}
    monkeypatch.setattr(original_model, "get_outputs", lambda batch_text, **kw: _canned(batch_text))
    monkeypatch.setattr(FlamingoEvalModel, "generate", lambda self, batch_text, *a, **kw: _canned(batch_text))
    monkeypatch.chdir(tmp_path)  # the original writes its temporary result file to the working directory
    expected_score = load_original_evaluate().evaluate_vqa(
        original_args(**paths, **common), original_model, seed=7, num_shots=2, dataset_name="ok_vqa"
    )
    results_file = tmp_path / "ours.json"
    argv = ["--model", str(folder), "--eval_ok_vqa", *cli_flags(paths), "--shots", "2", "--trial_seeds", "7"]
    argv += ["--results_file", str(results_file)] + [f"--{k}={v}" for k, v in common.items()]
    assert main(argv) == 0
    score = json.loads(results_file.read_text())["ok_vqa"][0]["trials"][0]
    (predictions,) = (results_file.with_suffix("") / "predictions").glob("*.jsonl")
    records = [json.loads(line) for line in predictions.open()]

    assert len(records) == 5
    assert [r["prediction"] for r in records] == [
        ok_vqa_utils.postprocess_ok_vqa_generation(r["generation"]) for r in records
    ]
    assert any(r["prediction"] != metrics.postprocess_vqa_generation(r["generation"]) for r in records)  # stemmed
    assert score == pytest.approx(expected_score, abs=1e-9)
    assert score > 0
