"""The Gradio page and the `/generate` API endpoint."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData

from modeling_flamingo.app.content_filter import FLAGGED_NOTICE, ContentFilter, StreamingFilter
from modeling_flamingo.app.engine import MAX_BEAMS, MAX_NEW_TOKENS, FlamingoEngine, GenerationSettings
from modeling_flamingo.app.prompt import CAPTIONING, FREE, MODES, VQA, Demonstration, InputError, build_prompt

logger = logging.getLogger(__name__)

NUM_DEMONSTRATIONS = 3
# Real photographs that ship inside scikit-image's wheel (skimage.data): nothing is downloaded at run time.
GALLERY = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "rocket": "rocket.png",
}

INTRO = """# OpenFlamingo: few-shot prompting with images and text
OpenFlamingo reads a prompt in which images and text are interleaved and continues the text. Show it a few
*demonstrations* (an image with its caption, or an image with a question and its answer), then a *query* image: it
answers in the style of the demonstrations. Upload your own images or pick an example at the bottom of the page.
The prompt box shows exactly what the model receives: each `<image>` is where an image goes, and
`<|endofchunk|>` ends a demonstration."""


def _uploaded_path(payload: FileData | None) -> str | None:
    if payload is None:
        return None
    if payload.path is None:
        raise gr.Error("The image did not arrive as a file: upload it again.")
    return payload.path


def upload_image(**kwargs) -> gr.Image:
    """A `gr.Image` that hands over the uploaded file's path without opening it: the app opens every upload itself
    with the bounded `open_image`, so a file that is not an image, or a decompression bomb, gets the app's message
    (the stock component opens the file with PIL first). Set on the instance: a subclass would make gradio write a
    `.pyi` stub beside this module."""
    component = gr.Image(type="filepath", sources=["upload", "clipboard"], height=200, **kwargs)
    component.preprocess = _uploaded_path
    return component


def write_gallery(folder: str | os.PathLike) -> dict[str, str]:
    """Write the example photographs of `skimage.data` as PNG files into `folder`; returns name -> path."""
    import skimage.data
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, filename in GALLERY.items():
        path = folder / filename
        if not path.is_file():
            Image.fromarray(getattr(skimage.data, name)()).save(path)
        paths[name] = str(path)
    return paths


def _settings(max_new_tokens, num_beams, do_sample=False, temperature=1.0) -> GenerationSettings:
    return GenerationSettings(max_new_tokens, num_beams, bool(do_sample), float(temperature))


def build_demo(
    engine: FlamingoEngine,
    content_filter: ContentFilter | None,
    max_concurrency: int = 1,
    gallery_dir: str | os.PathLike | None = None,
) -> gr.Blocks:
    """The page (few-shot captioning, few-shot VQA, free prompt) and the `/generate` endpoint.

    Args:
        engine: checks requests and generates.
        content_filter: judges every shown text (None: no filter).
        max_concurrency: generations at once, the page and the API together; further requests wait in the queue.
        gallery_dir: where the example photographs are written (default: a folder in gradio's temporary folder).
    """
    gallery = write_gallery(gallery_dir or Path(gr.utils.get_upload_folder()) / "openflamingo-gallery")

    def request_from_page(mode, *values) -> tuple[str, list[str]]:
        demo_values = values[: 3 * NUM_DEMONSTRATIONS]
        query_image, query_question, free_text = values[3 * NUM_DEMONSTRATIONS :]
        # A hidden textbox (e.g. the questions outside VQA mode) sends None.
        demonstrations = [
            Demonstration(image, text or "", question or "")
            for image, text, question in zip(*[iter(demo_values)] * 3, strict=True)
        ]
        return build_prompt(mode, demonstrations, query_image, query_question or "", free_text or "")

    def preview(mode, *values) -> str:
        try:
            prompt, _ = request_from_page(mode, *values)
        except InputError as error:
            return f"(not ready: {error})"
        return prompt

    # The stop signal of each browser session's running generation. The stop button sets it instead of cancelling the
    # event through gradio: a cancelled generator cannot say so, and its last streamed update could arrive after a
    # "Stopped." status; here the generation itself ends and reports it.
    stop_signals: dict[str, threading.Event] = {}

    def generate_page(request: gr.Request, mode, *values) -> Iterator[tuple[str, str]]:
        *values, max_new_tokens, num_beams, do_sample, temperature = values
        stop = stop_signals[request.session_hash] = threading.Event()
        try:
            prompt, images = request_from_page(mode, *values)
            settings = _settings(max_new_tokens, num_beams, do_sample, temperature)
            pieces = engine.stream(prompt, images, settings, stop=stop)
            shown = StreamingFilter(content_filter)
            for piece in pieces:
                text = shown.feed(piece)
                yield text, "Generating…"
                if shown.flagged:
                    pieces.close()  # stop the worker: nothing more will be shown
                    break
            text = shown.finish()
            if text == FLAGGED_NOTICE:
                yield text, "The content filter hid this answer."
            else:
                yield text, "Stopped." if stop.is_set() else "Done."
        except InputError as error:
            yield "", f"Error: {error}"
        except Exception as error:  # the server keeps serving; the log has the traceback
            logger.exception("generation failed")
            yield "", f"Error: generation failed ({type(error).__name__}: {error})."
        finally:
            if stop_signals.get(request.session_hash) is stop:
                del stop_signals[request.session_hash]

    def stop_page(request: gr.Request) -> None:
        signal = stop_signals.get(request.session_hash)
        if signal is not None:
            signal.set()

    def generate_api(prompt: str, images: list[str] | None, max_new_tokens: float, num_beams: float) -> str:
        try:
            text = engine.generate(prompt or "", list(images or []), _settings(max_new_tokens, num_beams))
        except InputError as error:
            raise gr.Error(str(error)) from None
        except Exception as error:
            logger.exception("generation failed")
            raise gr.Error(f"generation failed ({type(error).__name__}: {error})") from None
        if content_filter is not None and content_filter.is_flagged(text):
            return FLAGGED_NOTICE
        return text

    with gr.Blocks(title="OpenFlamingo") as demo:
        gr.Markdown(INTRO)
        mode = gr.Radio(list(MODES), value=CAPTIONING, label="Mode", elem_id="mode")
        page_inputs = []
        with gr.Row():
            for number in range(1, NUM_DEMONSTRATIONS + 1):
                with gr.Column(min_width=200):
                    image = upload_image(label=f"Demonstration {number}", elem_id=f"demo-image-{number}")
                    question = gr.Textbox(label=f"Question {number}", elem_id=f"demo-question-{number}", visible=False)
                    text = gr.Textbox(label=f"Caption {number}", elem_id=f"demo-text-{number}")
                    page_inputs += [image, text, question]
            with gr.Column(min_width=200):
                query_image = upload_image(label="Query image", elem_id="query-image")
                query_question = gr.Textbox(
                    label="Question about the query image", elem_id="query-question", visible=False
                )
        free_text = gr.Textbox(
            label="Free prompt: one <image> per filled image slot above (left to right); end demonstrations with <|endofchunk|>",
            elem_id="free-text",
            lines=3,
            visible=False,
        )
        page_inputs += [query_image, query_question, free_text]
        prompt_box = gr.Textbox(label="Prompt sent to the model", elem_id="prompt", interactive=False, lines=3)
        with gr.Accordion("Generation settings", open=False):
            max_new_tokens = gr.Slider(
                1, MAX_NEW_TOKENS, value=20, step=1, label="Max new tokens", elem_id="max-new-tokens"
            )
            num_beams = gr.Slider(
                1, MAX_BEAMS, value=1, step=1, label="Beams (answers stream with 1 beam only)", elem_id="num-beams"
            )
            do_sample = gr.Checkbox(label="Sample (instead of greedy / beam search)", elem_id="do-sample")
            temperature = gr.Slider(
                0.1, 2.0, value=1.0, step=0.05, label="Temperature (when sampling)", elem_id="temperature"
            )
        with gr.Row():
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            stop_button = gr.Button("Stop", elem_id="stop")
        answer = gr.Textbox(label="Answer", elem_id="answer", interactive=False, lines=2)
        status = gr.Markdown(elem_id="status")

        def show_fields(mode):
            vqa, free = mode == VQA, mode == FREE
            questions = [gr.update(visible=vqa) for _ in range(NUM_DEMONSTRATIONS)]
            texts = [
                gr.update(visible=not free, label=f"{'Answer' if vqa else 'Caption'} {number}")
                for number in range(1, NUM_DEMONSTRATIONS + 1)
            ]
            return [*questions, *texts, gr.update(visible=vqa), gr.update(visible=free)]

        questions_and_texts = [page_inputs[i] for i in range(2, 3 * NUM_DEMONSTRATIONS, 3)] + [
            page_inputs[i] for i in range(1, 3 * NUM_DEMONSTRATIONS, 3)
        ]
        mode.change(show_fields, mode, [*questions_and_texts, query_question, free_text], queue=False)
        gr.on(
            [mode.change] + [component.change for component in page_inputs],
            preview,
            [mode, *page_inputs],
            prompt_box,
            queue=False,
            api_visibility="private",
        )
        demo.load(preview, [mode, *page_inputs], prompt_box, queue=False, api_visibility="private")
        generate_button.click(
            generate_page,
            [mode, *page_inputs, max_new_tokens, num_beams, do_sample, temperature],
            [answer, status],
            concurrency_limit=max_concurrency,
            concurrency_id="model",
            api_visibility="private",
        )
        stop_button.click(stop_page, None, None, queue=False, api_visibility="private")

        empty = [None, "", ""]
        gr.Examples(
            [
                [
                    CAPTIONING,
                    gallery["astronaut"],
                    "An astronaut in a spacesuit posing in front of a flag.",
                    "",
                    gallery["coffee"],
                    "A cup of coffee on a saucer.",
                    "",
                    *empty,
                    gallery["chelsea"],
                    "",
                    "",
                ],
                [
                    VQA,
                    gallery["chelsea"],
                    "a cat",
                    "What animal is this?",
                    gallery["rocket"],
                    "a rocket",
                    "What is on the launch pad?",
                    *empty,
                    gallery["coffee"],
                    "What is in the cup?",
                    "",
                ],
                [
                    FREE,
                    gallery["astronaut"],
                    "",
                    "",
                    gallery["rocket"],
                    "",
                    "",
                    *empty,
                    None,
                    "",
                    "<image>A photo of an astronaut.<|endofchunk|><image>A photo of",
                ],
            ],
            [mode, *page_inputs],
            label="Examples (photographs from scikit-image)",
            elem_id="examples",
            # The table shows the mode and the pictures; a click fills every field.
            visible_columns=[0, *range(1, 3 * NUM_DEMONSTRATIONS + 1, 3), 3 * NUM_DEMONSTRATIONS + 1],
        )

        # The programmatic API: hidden components behind the named endpoint /generate.
        with gr.Row(visible=False):
            api_prompt = gr.Textbox(label="prompt")
            api_images = gr.File(file_count="multiple", type="filepath", label="images")
            api_max_new_tokens = gr.Number(value=20, precision=0, label="max_new_tokens")
            api_num_beams = gr.Number(value=1, precision=0, label="num_beams")
            api_answer = gr.Textbox(label="text")
            api_button = gr.Button()
        api_button.click(
            generate_api,
            [api_prompt, api_images, api_max_new_tokens, api_num_beams],
            api_answer,
            api_name="generate",
            concurrency_limit=max_concurrency,
            concurrency_id="model",
        )
    demo.queue(default_concurrency_limit=max_concurrency)
    return demo
