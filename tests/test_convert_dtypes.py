"""One table of weight dtypes (`modeling_flamingo.weight_dtypes`) behind the converter's `--dtype` names and the
evaluation's `--precision` names."""

from __future__ import annotations

import torch

from modeling_flamingo.convert import converter
from modeling_flamingo.convert.__main__ import build_parser
from modeling_flamingo.evaluation.eval_model import PRECISIONS
from modeling_flamingo.weight_dtypes import DTYPES, SHORT_DTYPES, WEIGHT_DTYPES


def test_both_spellings_name_the_same_dtypes():
    assert [(name, short) for name, short, _ in WEIGHT_DTYPES] == [
        ("float32", "fp32"),
        ("bfloat16", "bf16"),
        ("float16", "fp16"),
    ]
    for name, short, dtype in WEIGHT_DTYPES:
        assert DTYPES[name] is SHORT_DTYPES[short] is dtype is getattr(torch, name)
    assert PRECISIONS == SHORT_DTYPES


def test_the_converter_uses_the_shared_table():
    assert converter.DTYPES is DTYPES
    dtype_flag = next(action for action in build_parser()._actions if "--dtype" in action.option_strings)
    assert sorted(dtype_flag.choices) == sorted(DTYPES)
