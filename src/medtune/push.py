"""`medtune push`: a run's adapter (or its merged weights) + tokenizer + model card to the Hugging Face Hub.

Uploads go through huggingface_hub (`create_repo`, then one `upload_folder` commit). `HF_ENDPOINT` is read when
pushing, so a mirror or a test server can stand in for huggingface.co. Offline (`HF_HUB_OFFLINE=1`) or without a
token (`HF_TOKEN`, or `hf auth login`), medtune stops with one clear error before touching anything.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.export.merge import check_run, merge_run
from medtune.models import offline
from medtune.run.layout import ADAPTER_FILES as ADAPTER
from medtune.run.layout import CARD, PLOTS, RECIPE

log = logging.getLogger("medtune")

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What an adapter push carries: the adapter, what prompting needs, the card and the plots it shows. Not the
# checkpoints (optimizer state) nor medtune.json (it names local paths).
ADAPTER_FILES = [CARD, *ADAPTER, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "chat_template.jinja", "generation_config.json", RECIPE, f"{PLOTS}/*.png"]


def hub_token() -> str:
    """The token huggingface_hub would use; one clear error when offline or logged out."""
    if offline():
        raise MedtuneError("HF_HUB_OFFLINE=1: pushing needs the Hugging Face Hub; unset it to push")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise MedtuneError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return token


def push_run(run: str | Path, repo_id: str, *, merged: bool = False, private: bool = False,
             dtype: str = "bf16") -> str:
    """Upload the run (adapter) or its merged model to `repo_id`; returns the commit URL."""
    import httpx2  # huggingface_hub 2.x's HTTP client
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from medtune.run.card import NOT_MEDICAL_ADVICE

    if not REPO_ID.fullmatch(repo_id):
        raise MedtuneError(f"repo id '{repo_id}' is not ORG/NAME", field="--repo-id")
    run = check_run(run)
    token = hub_token()
    card = run / CARD
    if not card.is_file() or NOT_MEDICAL_ADVICE not in card.read_text(encoding="utf-8"):
        raise MedtuneError("the run's model card README.md is missing or lacks the not-medical-advice notice",
                           file=str(card))
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    with tempfile.TemporaryDirectory(prefix="medtune-push-") as scratch:
        if merged:
            folder, patterns = merge_run(run, Path(scratch) / "merged", dtype=dtype), None
            what = f"merged {dtype} weights"
        else:
            folder, patterns, what = run, ADAPTER_FILES, "LoRA adapter"
        try:
            api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=patterns,
                                       repo_type="model", commit_message=f"medtune: {what} from {run.name}")
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else "?"
            raise MedtuneError(f"the Hub refused the upload (HTTP {status}): {str(e).splitlines()[0]}",
                               field="--repo-id") from None
        except (OSError, httpx2.TransportError) as e:  # connection refused, DNS, TLS
            raise MedtuneError(f"cannot reach the Hub at {api.endpoint}: {e}") from None
    return commit.commit_url
