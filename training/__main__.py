"""`python -m modeling_flamingo.training` / `accelerate launch -m modeling_flamingo.training`: see `cli.py`."""

from modeling_flamingo.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
