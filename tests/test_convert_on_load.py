"""`from_pretrained` reaches the converter only through `modeling_flamingo.convert_on_load`, and only for a hub repo
id: loading a local folder imports no part of `modeling_flamingo.convert` (which imports the model and processor)."""

from __future__ import annotations

import os
import subprocess
import sys

from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoImageProcessor, FlamingoProcessor
from modeling_flamingo.processing.processing_flamingo import add_flamingo_tokens
from modeling_flamingo.testing import make_tiny_tokenizer, tiny_flamingo_config

LOAD = """
import sys
from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor

FlamingoForConditionalGeneration.from_pretrained(sys.argv[1])
FlamingoProcessor.from_pretrained(sys.argv[1])
print(sorted(m for m in sys.modules if m == "modeling_flamingo.convert" or m.startswith("modeling_flamingo.convert.")))
"""


def test_loading_a_local_folder_imports_no_converter(tmp_path):
    tokenizer = add_flamingo_tokens(make_tiny_tokenizer())
    config = tiny_flamingo_config("gpt_neox", tokenizer)
    FlamingoForConditionalGeneration(config).save_pretrained(tmp_path)
    image_processor = FlamingoImageProcessor.from_flamingo_config(config)
    FlamingoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
