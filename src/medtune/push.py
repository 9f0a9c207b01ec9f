"""`medtune push`: a run's adapter (or its merged weights) + tokenizer + model card to the Hugging Face Hub.

Uploads go through huggingface_hub (`create_repo`, then one `upload_folder` commit). `HF_ENDPOINT` is read when
pushing, so a mirror or a test server can stand in for huggingface.co. Offline (`HF_HUB_OFFLINE=1`) or without a
token (`HF_TOKEN`, or `hf auth login`), medtune stops with one clear error before touching anything.

What is uploaded is a copy made for the Hub: adapter_config.json names the base by its hub id (so
`PeftModel.from_pretrained` works on any machine), the run folder becomes the repository id and the base's
local folder its hub id in every text file, and recipe.yaml and the card keep only file names of local data
(lists such as data.decontaminate's `task=PATH` included). Any local path still left (the run, the base folder,
the home directory, $MEDTUNE_HOME, any file or folder the recipe names) stops the push, naming the file.

The card's first training example is redacted (`medtune.data.hygiene.redact_identifiers`), and every text file
about to be uploaded is scanned for identifiers of a person (emails, phones, SSNs, record numbers, street
addresses, IPs; names with a spaCy model): any found stops the push, naming the file and the kinds found, never
the text (e.g. sample answers of a run trained with data.phi=report on data holding identifiers).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from medtune.data.hygiene import identifiers_in
from medtune.errors import MedtuneError
from medtune.export.merge import merge_run
from medtune.model_names import hub_id_of
from medtune.models import medtune_home, offline
from medtune.run.card import NOT_MEDICAL_ADVICE, local_paths, public_value, render_card
from medtune.run.layout import ADAPTER_FILES as ADAPTER
from medtune.run.layout import CARD, GENERATION_CONFIG, META, PLOTS, RECIPE, TOKENIZER_FILES
from medtune.run.meta import read_run_meta
from medtune.run.run import Run

log = logging.getLogger("medtune")

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What an adapter push carries: the adapter, what prompting needs, the card and the plots it shows. Not the
# checkpoints (optimizer state) nor medtune.json (it names local paths).
ADAPTER_FILES = [CARD, *ADAPTER, *TOKENIZER_FILES, GENERATION_CONFIG, RECIPE, f"{PLOTS}/*.png"]
BINARY = (".safetensors", ".png", ".model", ".bin", ".gguf")
VOCABULARY = ("tokenizer.json", "vocab.json", "merges.txt")  # the base's vocabulary: not scanned for identifiers


def hub_token() -> str:
    """The token huggingface_hub would use; one clear error when offline or logged out."""
    if offline():
        raise MedtuneError("HF_HUB_OFFLINE=1: pushing needs the Hugging Face Hub; unset it to push")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise MedtuneError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return token


def base_hub_id(run: Path, base_model: str | None) -> str:
    """The hub id of the run's base: `base_model` if given, else the alias's id or the hub id it trained from."""
    if base_model is not None:
        if not REPO_ID.fullmatch(base_model):
            raise MedtuneError(f"base model '{base_model}' is not a hub id ORG/NAME", field="--base-model")
        return base_model
    name = read_run_meta(run).base_model
    hub_id = hub_id_of(name)
    if hub_id is None:
        raise MedtuneError(f"the run's base model is the local folder '{name}', which the Hub cannot resolve; give "
                           "its hub id with --base-model ORG/NAME", file=str(run / META))
    return hub_id


def _local_recipe(recipe: dict, hub_id: str) -> dict:
    """recipe.yaml as pushed: the base by hub id, no output_dir, local files by name only (lists included)."""
    return {**public_value(recipe), "model": hub_id, "output_dir": None}


def prepare_upload(folder: Path, run: Path, repo_id: str, hub_id: str) -> None:
    """Rewrite the files in `folder` (a copy) for the Hub; refuse any local path left in them (see module doc)."""
    meta = read_run_meta(run)
    replace = {str(run.resolve()): repo_id, str(Path(meta.base_model_path).resolve()): hub_id,
               meta.base_model_path: hub_id}
    card = folder / CARD
    if card.is_file() and (folder / ADAPTER[0]).is_file():  # an adapter push: the card names the repository and base
        card.write_text(render_card(run, repo_id=repo_id, base_hub_id=hub_id), encoding="utf-8")
    config = folder / ADAPTER[1]  # adapter_config.json
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data["base_model_name_or_path"] = hub_id
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    recipe = folder / RECIPE
    named: set[str] = set()
    if recipe.is_file():
        original = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
        named = local_paths({k: v for k, v in original.items() if k != "model"})
        recipe.write_text(yaml.safe_dump(_local_recipe(original, hub_id), sort_keys=False), encoding="utf-8")
    forbidden = {**{p: "a local file or folder of the recipe" for p in named},
                 str(run.resolve()): "the run directory", str(Path(meta.base_model_path).resolve()): "the base "
                 "model's local folder", str(medtune_home().resolve()): "$MEDTUNE_HOME", str(Path.home()): "the home "
                 "directory"}
    forbidden = {k: v for k, v in forbidden.items() if len(k) > 1}  # a home of "/" would match everything
    _rewrite_and_check(folder, replace, forbidden)
    _check_identifiers(folder)


def _rewrite_and_check(folder: Path, replace: dict[str, str], forbidden: dict[str, str]) -> None:
    """Replace the run and base paths in every text file of `folder`; refuse a forbidden path left in one."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in BINARY):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        new = text
        for old in sorted(replace, key=len, reverse=True):  # the longest first: a run inside the home directory
            new = new.replace(old, replace[old])
        if new != text:
            path.write_text(new, encoding="utf-8")
        for local, what in forbidden.items():
            if local in new:
                raise MedtuneError(f"refusing to push: it names {what} ({local}); remove it from the file",
                                   file=str(path.relative_to(folder)))


def _check_identifiers(folder: Path) -> None:
    """Refuse the push when the PHI scan finds an identifier of a person in a text file about to be uploaded."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in BINARY
                       and p.name not in VOCABULARY):
        try:
            found = identifiers_in(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        if found:
            raise MedtuneError(f"refusing to push: the PHI scan found {', '.join(found)} in it; remove them "
                               "(train with data.phi=redact when they come from the data) and push again",
                               file=str(path.relative_to(folder)))


def _stage(run: Path, target: Path) -> Path:
    """Copy the adapter files of the run to `target`."""
    for pattern in ADAPTER_FILES:
        for src in run.glob(pattern):
            dst = target / src.relative_to(run)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return target


def push_run(run: str | Path, repo_id: str, *, merged: bool = False, private: bool = False,
             dtype: str = "bf16", base_model: str | None = None) -> str:
    """Upload the run (adapter) or its merged model to `repo_id`; returns the commit URL."""
    import httpx2  # huggingface_hub 2.x's HTTP client
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not REPO_ID.fullmatch(repo_id):
        raise MedtuneError(f"repo id '{repo_id}' is not ORG/NAME", field="--repo-id")
    run = Run(run).validate().path
    token = hub_token()
    hub_id = base_hub_id(run, base_model)
    card = run / CARD
    if not card.is_file() or NOT_MEDICAL_ADVICE not in card.read_text(encoding="utf-8"):
        raise MedtuneError("the run's model card README.md is missing or lacks the not-medical-advice notice",
                           file=str(card))
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    with tempfile.TemporaryDirectory(prefix="medtune-push-") as scratch:
        if merged:
            folder, what = merge_run(run, Path(scratch) / "merged", dtype=dtype), f"merged {dtype} weights"
        else:
            folder, what = _stage(run, Path(scratch) / "adapter"), "LoRA adapter"
        prepare_upload(folder, run, repo_id, hub_id)
        try:
            api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                       commit_message=f"medtune: {what} from {run.name}")
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else "?"
            raise MedtuneError(f"the Hub refused the upload (HTTP {status}): {str(e).splitlines()[0]}",
                               field="--repo-id") from None
        except (OSError, httpx2.TransportError) as e:  # connection refused, DNS, TLS
            raise MedtuneError(f"cannot reach the Hub at {api.endpoint}: {e}") from None
    return commit.commit_url
