"""The web app's parts without a server: prompts, the output filter on streamed text, the engine's checks and
streaming, and the command line's errors. (tests/test_app_server.py serves the app and drives it.)"""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image
from reference_eval import OriginalEvalModel

from modeling_flamingo.app.cli import main, tiny_model
from modeling_flamingo.app.content_filter import (
    FLAGGED_NOTICE,
    ProfanityClassifierFilter,
    StreamingFilter,
    WordListFilter,
    load_content_filter,
)
from modeling_flamingo.app.engine import FlamingoEngine, GenerationSettings, load_model
from modeling_flamingo.app.prompt import CAPTIONING, FREE, VQA, Demonstration, InputError, build_prompt

# The original evaluation's prompt functions (tests/reference_eval.py mirrors the repository's EvalModel).
ORIGINAL = OriginalEvalModel.__new__(OriginalEvalModel)


def test_captioning_and_vqa_prompts_are_the_original_evaluations():
    demos = [Demonstration("a.png", "A cat on a mat."), Demonstration(None), Demonstration("b.png", " Two  dogs. ")]
    prompt, images = build_prompt(CAPTIONING, demos, "q.png")
    expected = ORIGINAL.get_caption_prompt("A cat on a mat.") + ORIGINAL.get_caption_prompt("Two dogs.")
    assert prompt == expected + ORIGINAL.get_caption_prompt() and images == ["a.png", "b.png", "q.png"]

    demos = [Demonstration("a.png", "red", "What colour is the bus?")]
    prompt, images = build_prompt(VQA, demos, "q.png", "How many cats?")
    expected = ORIGINAL.get_vqa_prompt("What colour is the bus?", "red") + ORIGINAL.get_vqa_prompt("How many cats?")
    assert prompt == expected and images == ["a.png", "q.png"]

    text = "<image>A photo of<|endofchunk|><image>"
    assert build_prompt(FREE, [Demonstration("a.png")], "q.png", free_text=text) == (text, ["a.png", "q.png"])


@pytest.mark.parametrize(
    "mode, demos, query, question, message",
    [
        (CAPTIONING, [Demonstration("a.png")], "q.png", "", "Demonstration 1 has an image but no caption"),
        (CAPTIONING, [Demonstration(None), Demonstration(None, "text")], "q.png", "", "Demonstration 2 has text but no image"),
        (CAPTIONING, [], None, "", "Add a query image"),
        (VQA, [Demonstration("a.png", "red")], "q.png", "Why?", "Demonstration 1 has no question"),
        (VQA, [], "q.png", " ", "Write the question"),
        (CAPTIONING, [Demonstration("a.png", "a <image> b")], "q.png", "", "cannot contain <image>"),
        (FREE, [], "q.png", "", "The prompt is empty"),
    ],
)  # fmt: skip
def test_incomplete_page_fields_get_one_message(mode, demos, query, question, message):
    with pytest.raises(InputError, match=message):
        build_prompt(mode, demos, query, question, free_text="")


def test_streamed_words_are_shown_only_once_judged(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# test list\nbad\nvery rude\n\n")
    check = WordListFilter.from_file(words)
    assert check.is_flagged("so BAD.") and check.is_flagged("Very, rude") and not check.is_flagged("badge rude")

    stream = StreamingFilter(check)
    # "ba" + "dge": the partial word is held back until a space ends it, then judged whole.
    assert [stream.feed(p) for p in ["A ba", "dge", " on", " a"]] == ["A ", "A ", "A badge ", "A badge on "]
    assert stream.finish() == "A badge on a" and not stream.flagged

    stream = StreamingFilter(check)
    assert [stream.feed(p) for p in ["A ba", "d", " dog"]] == ["A ", "A ", FLAGGED_NOTICE]
    assert stream.finish() == FLAGGED_NOTICE
    stream = StreamingFilter(check)
    assert stream.feed("a b") == "a " and stream.feed("ad") == "a " and stream.finish() == FLAGGED_NOTICE  # last word

    stream = StreamingFilter(None)
    assert stream.feed("no fil") == "no " and stream.finish() == "no fil"


def test_default_filter_is_the_offline_profanity_classifier():
    default = load_content_filter("default")
    assert isinstance(default, ProfanityClassifierFilter)
    assert default.is_flagged("you are a fucking idiot") and not default.is_flagged("a cat sleeping on a couch")
    assert load_content_filter("none") is None


def test_bad_word_lists_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a file; give none, default or the path of a word list"):
        load_content_filter(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no words; give one word or phrase per line"):
        load_content_filter(str(empty))


@pytest.fixture(scope="module")
def engine():
    model, processor = tiny_model()
    return FlamingoEngine(model, processor)


def test_stream_equals_generate_and_closing_it_stops_generation(engine, tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), "blue").save(image)
    prompt = "<image>The quick brown fox jumps over the lazy dog."
    settings = GenerationSettings(max_new_tokens=12)
    whole = engine.generate(prompt, [image], settings)
    assert "".join(engine.stream(prompt, [image], settings)) == whole

    calls = []
    hook = engine.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        pieces = engine.stream(prompt, [image], GenerationSettings(max_new_tokens=200))
        next(pieces)
        pieces.close()  # a client that went away
        closed = len(calls)
        stop = threading.Event()
        pieces = engine.stream(prompt, [image], GenerationSettings(max_new_tokens=200), stop=stop)
        next(pieces)
        stop.set()  # the page's stop button, from another thread
        rest = list(pieces)
    finally:
        hook.remove()
    assert 1 <= closed < 200 and 1 <= len(calls) - closed < 200 and len(rest) < 200


def test_bf16_with_a_device_map_generates_what_the_model_does(engine, tmp_path):
    engine.model.save_pretrained(tmp_path / "model")
    engine.processor.save_pretrained(tmp_path / "model")
    model, processor = load_model(str(tmp_path / "model"), precision="bf16", device_map="auto")
    assert model.dtype == torch.bfloat16
    bf16 = FlamingoEngine(model, processor)
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), "green").save(image)
    prompt = "<image>A sink in a small bathroom with a mirror."
    batch = processor(images=[[Image.open(image).convert("RGB")]], text=[prompt], return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    expected = model.generate(**batch, max_new_tokens=10)
    expected = processor.batch_decode(expected, skip_special_tokens=True, prompt_length=batch["input_ids"].shape[1])
    assert bf16.generate(prompt, [image], GenerationSettings(max_new_tokens=10)) == expected[0]


def test_settings_out_of_range_are_refused(engine, tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    for settings, message in [
        (GenerationSettings(max_new_tokens=0), "max_new_tokens must be a whole number from 1 to 256"),
        (GenerationSettings(max_new_tokens=2.5), "max_new_tokens must be a whole number"),
        (GenerationSettings(num_beams=None), "num_beams must be a whole number from 1 to 8"),
        (GenerationSettings(do_sample=True, temperature=0), "temperature must be in"),
    ]:
        with pytest.raises(InputError, match=message):
            engine.generate("<image>x", [image], settings)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--tiny", "--content_filter", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --content_filter") and err.count("\n") == 1
    assert main(["--model", str(tmp_path / "no-model"), "--content_filter", "none"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load --model {tmp_path / 'no-model'}:") and err.count("\n") == 1
    assert torch.is_grad_enabled()  # nothing left switched off


def test_tiny_builds_the_demo_model_and_serves_it_with_the_flags(monkeypatch, capsys):
    import gradio as gr

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs, blocks=self))
    argv = ["--content_filter", "none", "--host", "0.0.0.0", "--port", "7999", "--max_concurrency", "3"]
    assert main(argv) == 0  # no --model: the offline tiny model, as with --tiny
    assert launched["server_name"] == "0.0.0.0" and launched["server_port"] == 7999
    # The page's generation and /generate share one queue group limited to --max_concurrency.
    model_fns = [fn for fn in launched["blocks"].fns.values() if fn.concurrency_id == "model"]
    assert len(model_fns) == 2 and {fn.concurrency_limit for fn in model_fns} == {3}
    assert "generate" in {fn.api_name for fn in model_fns}
    out = capsys.readouterr().out
    assert out.startswith("no --model given: Building the offline tiny model (random weights)")
    assert "Model ready (no content filter, 3 generation(s) at once)" in out
