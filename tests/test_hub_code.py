"""Hub folders that load without the package: remote code, `auto_map`, push_to_hub (local stand-in) and the pipeline.

The central test saves a tiny model and processor of each language-model family, then loads the folder in a fresh
Python process that cannot import `modeling_flamingo` (an import hook refuses it) through transformers' Auto classes
with `trust_remote_code=True`, and compares what it computes with the package's results.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    pipeline,
)
from transformers.dynamic_module_utils import get_imports, get_relative_imports

from modeling_flamingo import (
    FlamingoConfig,
    FlamingoForConditionalGeneration,
    FlamingoImageProcessor,
    FlamingoProcessor,
)
from modeling_flamingo.hub_code import (
    CONFIG_AUTO_MAP,
    IMAGE_PROCESSOR_AUTO_MAP,
    PROCESSOR_AUTO_MAP,
    REMOTE_CODE_FILES,
    RemoteCodeExportError,
    missing_remote_code,
    push_folder_to_hub,
    rewrite_for_hub,
    write_remote_code,
)
from modeling_flamingo.testing import (
    FAMILIES,
    make_tiny_tokenizer,
    tiny_flamingo_config,
    tiny_siglip_vision_config,
    tiny_vision_config,
)

PROMPTS = ["<image>Two cats.<|endofchunk|><image>A sink.<|endofchunk|><image>An image of", "<image>A dog runs"]
MAX_NEW_TOKENS = 4


# Every family with CLIP, and one with SigLIP2, whose fixed-resolution patches are made inside the model.
CASES = (*FAMILIES, "llama+siglip2")


def _images(folder: Path) -> list[Path]:
    """Three small RGB images of different sizes, saved as PNG so both processes read the same pixels."""
    rng = np.random.default_rng(0)
    paths = []
    for index, (h, w) in enumerate([(50, 60), (64, 48), (45, 45)]):
        path = folder / f"image_{index}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _open(paths: list[Path]) -> list[PIL.Image.Image]:
    return [PIL.Image.open(path).convert("RGB") for path in paths]


def _batch_images(images: list) -> list[list]:
    a, b, c = images
    return [[a, b, c], [b]]


def tiny_model_and_processor(case: str) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor]:
    """A seeded tiny model with open gates (so the images matter) and its processor; `case` is a family, with the
    CLIP tower, or `family+tower` for a SigLIP tower."""
    family, _, tower = case.partition("+")
    tokenizer = make_tiny_tokenizer(bos_token="<s>" if family == "llama" else None)
    size = tiny_vision_config().image_size
    image_processor = FlamingoImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = FlamingoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vision = {"vision_config": tiny_siglip_vision_config(tower).to_dict()} if tower else {}
    config = tiny_flamingo_config(family, tokenizer=processor.tokenizer, **vision)
    if tower:
        processor.image_processor = FlamingoImageProcessor.from_flamingo_config(config)
    torch.manual_seed(0)
    model = FlamingoForConditionalGeneration(config).eval()
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(0.7)
            block.ff_gate.fill_(0.4)
    return model, processor


# --- the remote side: runs in a fresh interpreter --------------------------------------------------------------------

REMOTE_SCRIPT = textwrap.dedent(
    r'''
    import importlib.abc
    import socket
    import sys


    class RefusePackage(importlib.abc.MetaPathFinder):
        """Stands for an environment without the package: `modeling_flamingo` cannot be imported."""

        def find_spec(self, name, path=None, target=None):
            if name == "modeling_flamingo" or name.startswith("modeling_flamingo."):
                raise ImportError(f"{name} is not installed here")
            return None


    sys.meta_path.insert(0, RefusePackage())
    try:
        import modeling_flamingo  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("modeling_flamingo could be imported")


    def no_network(*args, **kwargs):
        raise RuntimeError("network access attempted")


    socket.socket.connect = socket.create_connection = socket.getaddrinfo = no_network

    import json
    from pathlib import Path

    import PIL.Image
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, images_folder, out, threads = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(threads)
    prompts = json.loads(sys.argv[5])
    max_new_tokens = int(sys.argv[6])
    images = [PIL.Image.open(images_folder / f"image_{i}.png").convert("RGB") for i in range(3)]

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    causal = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    inputs = processor(images=[images, [images[1]]], text=prompts, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        causal_logits = causal(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    pipe_tokens = pipe(images=images, text=prompts[0], max_new_tokens=max_new_tokens, return_tensors=True)

    # A model and processor loaded with remote code are saved again by transformers itself (no package here).
    resaved = Path(out).with_suffix(".resaved")
    model.save_pretrained(resaved)
    processor.save_pretrained(resaved)
    reloaded = AutoModelForImageTextToText.from_pretrained(resaved, trust_remote_code=True).eval()
    reprocessor = AutoProcessor.from_pretrained(resaved, trust_remote_code=True)
    reinputs = reprocessor(images=[images, [images[1]]], text=prompts, return_tensors="pt")
    with torch.no_grad():
        resaved_logits = reloaded(**reinputs).logits

    leaked = sorted(name for name in sys.modules if name.split(".")[0] == "modeling_flamingo")
    torch.save(
        {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "pixel_values": inputs["pixel_values"],
            "logits": logits,
            "causal_logits": causal_logits,
            "tokens": tokens,
            "pipeline_tokens": pipe_tokens[0]["generated_token_ids"],
            "resaved_logits": resaved_logits,
            "classes": json.dumps(
                {
                    "config": type(config).__module__,
                    "text_config": type(config.text_config).__module__,
                    "model": type(model).__module__,
                    "causal": type(causal).__module__,
                    "processor": type(processor).__module__,
                    "image_processor": type(processor.image_processor).__module__,
                    "leaked": leaked,
                }
            ),
        },
        out,
    )
    '''
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> SimpleNamespace:
    """Each family saved with the package, the package's results, and the same computed by a package-less process."""
    root = tmp_path_factory.mktemp("hub")
    image_paths = _images(root)
    images = _open(image_paths)
    expected, folders = {}, {}
    # Both sides compute with one thread, so that the reductions split the same way; the package-less processes run
    # as many at a time as there are cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for family in CASES:
            expected[family], folders[family] = _save_and_compute(family, root, images)
    finally:
        torch.set_num_threads(threads)

    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_", "PYTHONPATH"))
    }
    env |= {
        "HF_MODULES_CACHE": str(root / "modules"),
        "HF_HOME": str(root / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    remote, errors = {}, {}
    pending = list(CASES)
    running: dict[str, subprocess.Popen] = {}
    while pending or running:
        while pending and len(running) < max(1, min(4, os.cpu_count() or 1)):
            family = pending.pop(0)
            args = [str(folders[family]), str(root), str(root / f"{family}.pt"), "1", json.dumps(PROMPTS)]
            running[family] = subprocess.Popen(
                [sys.executable, "-c", REMOTE_SCRIPT, *args, str(MAX_NEW_TOKENS)],
                cwd=root,  # not the repository: nothing importable from the working directory
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        family, process = next(iter(running.items()))
        output, _ = process.communicate(timeout=300)
        del running[family]
        if process.returncode == 0:
            remote[family] = torch.load(root / f"{family}.pt", weights_only=True)
        else:
            errors[family] = output[-4000:]
    return SimpleNamespace(root=root, folders=folders, images=images, expected=expected, remote=remote, errors=errors)


def _save_and_compute(family: str, root: Path, images: list) -> tuple[dict, Path]:
    """Save the family's tiny model and processor into a folder, and compute the package's results."""
    model, processor = tiny_model_and_processor(family)
    folder = root / family
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    inputs = processor(images=_batch_images(images), text=PROMPTS, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    single = processor(images=images, text=PROMPTS[0], return_tensors="pt")
    single_tokens = model.generate(**single, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0]
    return dict(inputs) | {"logits": logits, "tokens": tokens, "single_tokens": single_tokens}, folder


# --- (a) loading without the package ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", CASES)
def test_folder_loads_without_the_package_and_matches(saved, family):
    assert family not in saved.errors, f"the package-less process failed:\n{saved.errors[family]}"
    remote, expected = saved.remote[family], saved.expected[family]

    classes = json.loads(remote["classes"])
    assert classes.pop("leaked") == []
    text_config = classes.pop("text_config")
    assert all(module.startswith("transformers_modules.") for module in classes.values()), classes
    if family == "mosaic_gpt":  # the custom text config came from the folder too
        assert text_config.startswith("transformers_modules.")

    for key in ("input_ids", "attention_mask", "pixel_values"):
        torch.testing.assert_close(remote[key], expected[key], atol=0, rtol=0)
    torch.testing.assert_close(remote["logits"], expected["logits"], atol=1e-6, rtol=0)
    torch.testing.assert_close(remote["causal_logits"], expected["logits"], atol=1e-6, rtol=0)
    torch.testing.assert_close(remote["resaved_logits"], expected["logits"], atol=1e-6, rtol=0)
    assert remote["tokens"].tolist() == expected["tokens"].tolist()
    assert remote["pipeline_tokens"].tolist() == expected["single_tokens"].tolist()


def test_saved_folder_layout(saved):
    folder = saved.folders["mosaic_gpt"]
    assert missing_remote_code(folder) == []
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == CONFIG_AUTO_MAP
    assert config["text_config"]["model_type"] == "mosaic_gpt" and "auto_map" not in config["text_config"]
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == PROCESSOR_AUTO_MAP
    assert processor_config["image_processor"]["auto_map"] == IMAGE_PROCESSOR_AUTO_MAP
    # The tokenizer stays a plain transformers tokenizer.
    assert "auto_map" not in json.loads((folder / "tokenizer_config.json").read_text())
    # What transformers' loader checks: third-party imports must be installed, relative ones are copied along.
    siblings = {Path(name).stem for name in REMOTE_CODE_FILES}
    for name in REMOTE_CODE_FILES:
        assert "modeling_flamingo" not in get_imports(folder / name)
        assert set(get_relative_imports(folder / name)) <= siblings


def test_saving_keeps_the_transformers_config_and_is_idempotent(tmp_path):
    model, processor = tiny_model_and_processor("gpt_neox")
    PreTrainedModel.save_pretrained(model, tmp_path / "plain")  # transformers alone
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())

    folder = tmp_path / "hub"
    processor.save_pretrained(folder)  # processor first: the config comes later
    model.save_pretrained(folder)
    first = {path.name: path.read_bytes() for path in folder.iterdir()}
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == first

    config = json.loads((folder / "config.json").read_text())
    assert config.pop("auto_map") == CONFIG_AUTO_MAP
    assert config == plain
    assert missing_remote_code(folder) == []


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    """A saved gpt_neox model and processor (with their remote code), for loading in this process."""
    folder = tmp_path_factory.mktemp("hub_folder")
    model, processor = tiny_model_and_processor("gpt_neox")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("trust", [None, False, True])
def test_package_classes_win_where_the_package_is_imported(hub_folder, trust):
    # What docs/hub.md promises: once the package is imported, every Auto class it registers resolves to the package's
    # class, whatever trust_remote_code says: transformers prefers a registered class from outside its own package
    # to a folder's code. (AutoModelForCausalLM used to ask for remote code, and with trust_remote_code=True loaded
    # the folder's copy.)
    expected = {
        AutoConfig: FlamingoConfig,
        AutoModelForImageTextToText: FlamingoForConditionalGeneration,
        AutoModelForCausalLM: FlamingoForConditionalGeneration,
        AutoProcessor: FlamingoProcessor,
        AutoImageProcessor: FlamingoImageProcessor,
    }
    for auto_class, package_class in expected.items():
        loaded = auto_class.from_pretrained(hub_folder, trust_remote_code=trust)
        assert type(loaded) is package_class, (auto_class.__name__, type(loaded).__module__)


def test_auto_model_is_not_mapped_and_says_so(hub_folder):
    # No head-less base model (docs/hub.md says why): AutoModel refuses the config instead of returning logits where
    # hidden states are expected, and the hidden states come from the model with output_hidden_states=True.
    with pytest.raises(ValueError, match="Unrecognized configuration class .*FlamingoConfig.* AutoModel"):
        AutoModel.from_pretrained(hub_folder)
    model = AutoModelForCausalLM.from_pretrained(hub_folder)
    ids = torch.tensor([[5, 6, 7]])
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape == (1, 3, model.config.text_config.hidden_size)


# --- (b) the export refuses what a hub folder could not import -------------------------------------------------------


def test_shipped_imports_become_sibling_imports():
    source = textwrap.dedent(
        """\
        from __future__ import annotations

        from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig as Config
        from ..configuration.configuration_mosaic_gpt import (
            MosaicGPTConfig,
        )


        def build():
            from modeling_flamingo.modeling_mosaic_gpt import MosaicGPTForCausalLM

            return MosaicGPTForCausalLM
        """
    )
    rewritten = rewrite_for_hub(source, "modeling_flamingo.processing.some_module")
    assert "from .configuration_flamingo import FlamingoConfig as Config\n" in rewritten
    assert "from .configuration_mosaic_gpt import MosaicGPTConfig\n" in rewritten
    assert "    from .modeling_mosaic_gpt import MosaicGPTForCausalLM\n" in rewritten
    assert "modeling_flamingo" not in rewritten


@pytest.mark.parametrize(
    "line",
    [
        "from modeling_flamingo.convert.hub import resolve_pretrained_path",  # a module hub folders do not ship
        "from modeling_flamingo.processing import FlamingoProcessor",  # through a package __init__
        "from modeling_flamingo import FlamingoConfig",
        "import modeling_flamingo.modeling_flamingo",  # has no sibling form
        "from ..convert.hub import resolve_pretrained_path",  # relative, resolved against the package
    ],
)
@pytest.mark.parametrize("where", ["module", "function", "try"])
def test_leftover_package_imports_are_refused(line, where):
    if where == "function":
        source = f"def f():\n    {line}\n"
    elif where == "try":
        source = f"try:\n    {line}\nexcept ImportError:\n    pass\n"
    else:
        source = f"{line}\n"
    with pytest.raises(RemoteCodeExportError, match="modeling_flamingo"):
        rewrite_for_hub(source, "modeling_flamingo.processing.some_module")


def test_package_only_methods_are_dropped_and_checked():
    source = "class A:\n    def keep(self):\n        pass\n\n    @classmethod\n    def load(cls):\n" + (
        "        from modeling_flamingo.convert.hub import x\n        return x\n"
    )
    rewritten = rewrite_for_hub(source, "modeling_flamingo.some_module", drop=("A.load",))
    assert "def keep" in rewritten and "load" not in rewritten and "classmethod" not in rewritten
    with pytest.raises(RemoteCodeExportError, match="does not exist"):
        rewrite_for_hub(source, "modeling_flamingo.some_module", drop=("A.missing",))


def test_a_failing_export_leaves_the_folder_alone(tmp_path, monkeypatch):
    import modeling_flamingo.hub_code as hub_code

    # Without its package-only list, the real modelling module would keep `from_pretrained`'s converter import.
    monkeypatch.setattr(hub_code, "_PACKAGE_ONLY_DEFS", {})
    (tmp_path / "config.json").write_text('{"model_type": "openflamingo"}')
    with pytest.raises(RemoteCodeExportError, match="convert"):
        write_remote_code(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "openflamingo"}


# --- (c) push_to_hub against a local stand-in -------------------------------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> SimpleNamespace:
    """`HfApi.create_repo`/`create_commit` write into a local folder; any real connection fails the test."""
    import huggingface_hub
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import EntryNotFoundError

    def no_network(*args, **kwargs):
        raise AssertionError("a real network connection was attempted")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)

    hub = SimpleNamespace(root=tmp_path / "remote", commits=[])

    def create_repo(self, repo_id, **kwargs):
        repo_id = repo_id if "/" in repo_id else f"someone/{repo_id}"
        (hub.root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        for op in operations:
            assert isinstance(op, CommitOperationAdd), op
            target = hub.root / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = op.path_or_fileobj
            data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
            target.write_bytes(data if isinstance(data, bytes) else data.read())
        hub.commits.append((repo_id, sorted(op.path_in_repo for op in operations), commit_message))
        return SimpleNamespace(oid=f"{len(hub.commits):040x}", commit_url="local")

    def load_card(*args, **kwargs):  # transformers looks for an existing model card: a new repo has none
        raise EntryNotFoundError("no README.md")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr("transformers.utils.hub.ModelCard.load", load_card)
    return hub


def _assert_hub_ready(remote: Path, weights: bool = True, processor: bool = True) -> None:
    assert missing_remote_code(remote) == []
    if weights:
        assert (remote / "model.safetensors").is_file() and (remote / "generation_config.json").is_file()
    if processor:
        assert (remote / "tokenizer.json").is_file() and (remote / "tokenizer_config.json").is_file()
        assert json.loads((remote / "processor_config.json").read_text())["auto_map"] == PROCESSOR_AUTO_MAP


def test_push_folder_to_hub_uploads_the_whole_converted_folder(saved, fake_hub, tmp_path):
    folder = tmp_path / "converted"
    shutil.copytree(saved.folders["mosaic_gpt"], folder)
    (folder / "README.md").write_text("# tiny\n")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("not uploaded")

    push_folder_to_hub(folder, "org/tiny-flamingo", commit_message="Add model")
    remote = fake_hub.root / "org/tiny-flamingo"
    local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()} == local
    assert all((remote / name).read_bytes() == (folder / name).read_bytes() for name in local)
    _assert_hub_ready(remote)
    assert len(fake_hub.commits) == 1 and fake_hub.commits[0][2] == "Add model"


def test_push_folder_to_hub_upgrades_or_refuses_an_old_folder(saved, fake_hub, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(saved.folders["llama"], folder)
    for name in REMOTE_CODE_FILES:  # as converted before remote code existed
        (folder / name).unlink()
    for name in ("config.json", "processor_config.json"):
        data = json.loads((folder / name).read_text())
        data.pop("auto_map")
        (folder / name).write_text(json.dumps(data))
    assert missing_remote_code(folder)

    with pytest.raises(RemoteCodeExportError, match="not hub-ready"):
        push_folder_to_hub(folder, "org/old", refresh_remote_code=False)
    assert fake_hub.commits == []

    push_folder_to_hub(folder, "org/old")
    _assert_hub_ready(fake_hub.root / "org/old")


def test_model_and_processor_push_to_hub(fake_hub, tmp_path):
    model, processor = tiny_model_and_processor("gpt_neox")
    model.push_to_hub("tiny-flamingo")
    _assert_hub_ready(fake_hub.root / "someone/tiny-flamingo", processor=False)
    processor.push_to_hub("tiny-flamingo")
    _assert_hub_ready(fake_hub.root / "someone/tiny-flamingo")
    assert all(set(REMOTE_CODE_FILES) <= set(files) for _, files, _ in fake_hub.commits)

    # save_pretrained(push_to_hub=True) uploads from inside transformers' save: the remote code goes up too.
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="org/saved")
    # (ProcessorMixin.save_pretrained needs a str here: it splits the path even when given a repo_id.)
    processor.save_pretrained(str(tmp_path / "local"), push_to_hub=True, repo_id="org/saved")
    _assert_hub_ready(fake_hub.root / "org/saved")
    assert all(set(REMOTE_CODE_FILES) <= set(files) for repo, files, _ in fake_hub.commits if repo == "org/saved")


# --- (d) the image-text-to-text pipeline takes interleaved few-shot prompts ------------------------------------------


def test_pipeline_matches_generate_on_few_shot_prompts(tmp_path):
    model, processor = tiny_model_and_processor("llama")
    images = _open(_images(tmp_path))
    pipe = pipeline("image-text-to-text", model=model, processor=processor)

    # One few-shot prompt: a flat list of its images, one `<image>` each.
    inputs = processor(images=images, text=PROMPTS[0], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    out = pipe(images=images, text=PROMPTS[0], max_new_tokens=MAX_NEW_TOKENS, return_tensors=True)
    assert out[0]["generated_token_ids"].tolist() == expected[0].tolist()
    new_text = processor.batch_decode(expected, skip_special_tokens=True, prompt_length=inputs["input_ids"].shape[1])
    out = pipe(images=images, text=PROMPTS[0], max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert out[0]["generated_text"] == new_text[0]

    # A batch: one list of images per prompt (left padding, as the processor sets it).
    batch = processor(images=_batch_images(images), text=PROMPTS, return_tensors="pt")
    expected = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS)
    out = pipe(images=_batch_images(images), text=PROMPTS, max_new_tokens=MAX_NEW_TOKENS, return_tensors=True)
    assert [row["generated_token_ids"].tolist() for row in out] == expected.tolist()
