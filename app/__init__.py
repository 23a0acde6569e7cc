"""The web demo: few-shot captioning, few-shot VQA and free interleaved prompts on Gradio, with an output filter.

`python -m modeling_flamingo.app --tiny` (offline) or `--model PATH_OR_ID`; see docs/app.md.
"""
