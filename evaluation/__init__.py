"""Few-shot evaluation of OpenFlamingo models with the original protocol (captioning, VQA, classification).

`modeling_flamingo.evaluation` is the top-level `evaluation/` folder of the repository.
"""
