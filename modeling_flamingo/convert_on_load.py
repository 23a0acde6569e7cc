"""`from_pretrained` of an original OpenFlamingo hub repo: the one way from the model and the processor to the converter.

`FlamingoPreTrainedModel.from_pretrained` and `FlamingoProcessor.from_pretrained` pass their name through
`resolve_pretrained_path`. A local path, or a name that cannot be a hub repo id, comes back unchanged without the
converter being imported; a hub repo id goes to `modeling_flamingo.convert.hub` (imported only then), which returns a
repo in transformers format unchanged and converts an original release (a repo holding only `checkpoint.pt`) once into
a local cache folder. This module imports nothing of the converter itself, so the model and processor modules, which
the converter imports, do not import it back.
"""

from __future__ import annotations

import os
import re
from typing import Any

# `from_pretrained` keyword arguments that matter to locating a repo.
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_repo_id(spec: str) -> bool:
    """`org/name`, not an existing local path."""
    return bool(_REPO_ID.match(spec)) and not os.path.exists(spec)


def resolve_pretrained_path(name_or_path: Any, **from_pretrained_kwargs: Any) -> Any:
    """A name `from_pretrained` can load for `name_or_path`.

    Args:
        name_or_path: a local path or hub repo id (anything else is returned unchanged).
        **from_pretrained_kwargs: the `from_pretrained` call's keyword arguments; those in `HUB_KWARGS` (`cache_dir`,
            `revision`, `token`, `local_files_only`, `subfolder`) locate the repo, the others are ignored.

    Returns:
        `name_or_path` unchanged for local paths and repos in transformers format; for an original OpenFlamingo
        release repo, the folder of its conversion (see `modeling_flamingo.convert.hub.resolve_hub_repo`).

    Raises:
        OSError: an original OpenFlamingo repo that cannot be converted on its own, or a failed conversion.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        return name_or_path
    name = os.fspath(name_or_path)
    if from_pretrained_kwargs.get("subfolder") or not looks_like_repo_id(name):
        return name_or_path
    from modeling_flamingo.convert.hub import resolve_hub_repo

    hub_kwargs = {key: from_pretrained_kwargs[key] for key in HUB_KWARGS if key in from_pretrained_kwargs}
    converted = resolve_hub_repo(name, **hub_kwargs)
    return name_or_path if converted is None else converted
