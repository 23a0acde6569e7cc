"""`from_pretrained` on the original OpenFlamingo hub repos, which hold only `checkpoint.pt`.

`resolve_pretrained_path("openflamingo/OpenFlamingo-3B-vitl-mpt1b")` (`modeling_flamingo.convert_on_load`, which
sends hub repo ids to `resolve_hub_repo` here) converts the release once (fetching its
checkpoint, language model, tokenizer and CLIP tower through the hub cache) into

    $HF_HOME/modeling_flamingo/converted/<org>--<name>--<release commit>--<inputs digest>/

and returns that folder; later calls find it there without converting again (also offline). The digest covers the
resolved commit of every other input (language model and its tokenizer, vision tower), so a language model repo that
moves to new weights gets a new conversion instead of the stale one. A file lock (`.<folder>.lock` beside it) makes
concurrent processes convert once: the others wait and load the result. `$HF_HOME` is read at
call time (default `~/.cache/huggingface`, or `$XDG_CACHE_HOME/huggingface`); `$MODELING_FLAMINGO_CACHE` replaces the
whole `.../converted` root. Downloads go to the hub cache (`cache_dir`, else `$HF_HUB_CACHE`, else `$HF_HOME/hub`).
Repos and folders already in transformers format are returned unchanged.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

# The entry point `from_pretrained` uses, importable from here as before it moved out of the converter.
from modeling_flamingo.convert_on_load import HUB_KWARGS, resolve_pretrained_path  # noqa: F401

from .converter import ConversionSpec, convert
from .presets import PRESETS, Preset, get_preset
from .sources import (
    ConversionError,
    HubOptions,
    check_hub_reachable,
    hub_file,
    unreachable_advice,
)
from .transaction import conversion_files, previous_conversion_problem

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = ("1", "ON", "YES", "TRUE")


def hf_home() -> Path:
    """`$HF_HOME`, read now (huggingface_hub reads it once, at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expanduser(os.path.expandvars(home)))


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The hub cache folder: `cache_dir`, else `$HF_HUB_CACHE` (or the older `$HUGGINGFACE_HUB_CACHE`), else
    `$HF_HOME/hub`."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return os.path.expanduser(os.path.expandvars(env)) if env else str(hf_home() / "hub")


def converted_cache_root() -> Path:
    """Where converted releases live: `$MODELING_FLAMINGO_CACHE`, else `$HF_HOME/modeling_flamingo/converted`."""
    override = os.environ.get("MODELING_FLAMINGO_CACHE")
    if override:
        return Path(os.path.expanduser(os.path.expandvars(override)))
    return hf_home() / "modeling_flamingo" / "converted"


def converted_path(repo_id: str, commit: str, other_inputs: dict[str, str] | None = None) -> Path:
    """The cache folder of one conversion: the release repo at `commit`, with `other_inputs` ({repo id: commit} of
    the language model, tokenizer and vision repos) summed up in a digest."""
    name = f"{repo_id.replace('/', '--')}--{commit}"
    if other_inputs:
        text = "\n".join(f"{repo}@{sha}" for repo, sha in sorted(other_inputs.items()))
        name += "--" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return converted_cache_root() / name


def offline_mode(local_files_only: bool | None = None) -> bool:
    """Whether to stay off the network: `local_files_only`, or `$HF_HUB_OFFLINE` / `$TRANSFORMERS_OFFLINE` now or at
    huggingface_hub's import."""
    if local_files_only:
        return True
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _resolve_commit(repo_id: str, revision: str | None, hub: HubOptions) -> str | None:
    """The commit a revision points to: asked from the hub when online, else read from the cache's refs."""
    if revision and _COMMIT.match(revision):
        return revision
    check_hub_reachable(hub)
    if not hub.local_files_only:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            return HfApi().model_info(repo_id, revision=revision, token=hub.token).sha
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return None
        except Exception:  # no network: fall back to what the cache knows
            pass
    ref = Path(hub.cache_dir) / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text(encoding="utf-8").strip() or None
    return None


def _input_commits(preset: Preset, commit: str, hub: HubOptions) -> dict[str, str]:
    """{repo id: commit} of the inputs besides the release repo: language model (whose tokenizer the preset uses, at
    the same revision) and vision tower."""
    wanted = {preset.language_model: preset.language_model_revision, preset.vision_model: None}
    commits = {}
    for repo, revision in wanted.items():
        sha = _resolve_commit(repo, revision, hub)
        if sha is None:
            raise OSError(f"{preset.repo_id}: {_not_found(repo, hub)}")
        commits[repo] = sha
    return commits


def _not_found(repo: str, hub: HubOptions) -> str:
    if hub.unreachable:
        return f"cannot resolve {repo} from the local hub cache, and {unreachable_advice(hub)}"
    if hub.local_files_only:
        return f"cannot find {repo} in the local hub cache (offline mode)"
    return f"cannot find {repo} on the hub"


def _progress_enabled() -> bool:
    from huggingface_hub.utils import are_progress_bars_disabled

    return not are_progress_bars_disabled()


def resolve_hub_repo(name: str, **hub_kwargs) -> str | None:
    """The converted folder of an original OpenFlamingo release `name`, or None for a repo `from_pretrained` loads as
    it is (`modeling_flamingo.convert_on_load.resolve_pretrained_path` sends here the names that look like hub repo
    ids and are no local path).

    Args:
        name: a hub repo id.
        **hub_kwargs: `from_pretrained`'s `cache_dir`, `revision`, `token`, `local_files_only` (other keys are
            ignored).

    Returns:
        None for repos in transformers format (they have a config.json) and names that are no reachable repo; for an
        original OpenFlamingo release repo (a preset: holds only `checkpoint.pt`), the folder of its conversion,
        converting it first if this commit was never converted.

    Raises:
        OSError: an original OpenFlamingo repo this function cannot convert on its own (the LLaMA-based legacy release,
            or a repo that is not a known release), or a failed conversion.
    """
    hub = HubOptions(
        cache_dir=hub_cache_dir(hub_kwargs.get("cache_dir")),
        token=hub_kwargs.get("token"),
        local_files_only=offline_mode(hub_kwargs.get("local_files_only")),
    )
    revision = hub_kwargs.get("revision")
    preset = get_preset(name)

    try:
        config = hub_file(name, "config.json", revision, hub, missing_ok=True)
    except ConversionError:
        config = None
        if preset is None:
            return None  # not reachable / not a repo: let transformers report it
    if config is not None:
        return None  # already in transformers format

    if preset is not None and preset.language_model is None:
        raise OSError(
            f"{preset.repo_id} needs the LLaMA-7B weights, which are not on the hub: convert it with "
            f"`openflamingo-convert --preset {preset.repo_id} --language-model /path/to/llama-7b-hf --output-dir DIR` "
            "and load DIR."
        )
    commit = _resolve_commit(name, revision, hub)
    if commit is None:
        if preset is None:
            return None
        raise OSError(f"{name}: cannot find this OpenFlamingo release: {_not_found(name, hub)}")

    if preset is None:
        try:
            checkpoint = hub_file(name, "checkpoint.pt", commit, hub, missing_ok=True)
        except ConversionError:
            checkpoint = None
        if checkpoint is None:
            return None
        raise OSError(
            f"{name} holds an original OpenFlamingo checkpoint.pt but is not one of the released models "
            f"({', '.join(PRESETS)}), so its language model is unknown: convert it with `openflamingo-convert "
            f"--checkpoint {name} --vision-model openai/clip-vit-large-patch14 --language-model LM "
            "--cross-attn-every-n-layers N --output-dir DIR` and load DIR."
        )

    inputs = _input_commits(preset, commit, hub)
    target = converted_path(preset.repo_id, commit, inputs)
    if _is_complete(target):
        return str(target)

    from filelock import FileLock
    from transformers.utils import logging

    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion per target at a time: a second process waits here, then finds the first one's result.
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if _is_complete(target):
            return str(target)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            problem = previous_conversion_problem(target) if target.is_dir() else "a file, not a folder"
            raise OSError(
                f"the conversion cache folder {target} for {preset.repo_id} exists but is not a complete conversion: "
                f"{problem}; delete that folder and call from_pretrained again to convert anew"
            )
        logger = logging.get_logger(__name__)
        logger.warning(f"Converting {preset.repo_id}@{commit} to transformers format (once) into {target}")
        spec = ConversionSpec.from_preset(
            preset.repo_id,
            checkpoint_revision=commit,
            language_model_revision=inputs[preset.language_model],
            vision_model_revision=inputs[preset.vision_model],
        )
        try:
            convert(spec, target, hub=hub, progress=_progress_enabled())
        except ConversionError as exc:
            raise OSError(f"converting {preset.repo_id}: {exc}") from exc
    return str(target)


def _is_complete(target: Path) -> bool:
    """A finished conversion: its marker is written last, and the folder appears only by rename once complete (files
    added to it later do not matter here)."""
    return target.is_dir() and conversion_files(target) is not None
