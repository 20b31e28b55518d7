"""Downloads from the Hugging Face Hub and ModelScope, with their failures turned into one-line errors.

huggingface_hub honours HF_HOME, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE; ModelScope its MODELSCOPE_CACHE.
"""

from __future__ import annotations

from pathlib import Path

from medtune.core.errors import BadInput, MedtuneError, require
from medtune.core.safety import check_hub_id


def hf_snapshot(repo_id: str, patterns: list[str], repo_type: str = "model") -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    what = "dataset" if repo_type == "dataset" else "model"
    check_hub_id(repo_id, what)  # never a path: '..', '/' or '--' could leave the cache
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, allow_patterns=patterns))
    except RepositoryNotFoundError as exc:
        raise BadInput(
            f"no such {what} on the Hub: {repo_id}",
            hint=f"check the id; private or gated {what}s need `huggingface-cli login` or HF_TOKEN",
        ) from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise MedtuneError(
            f"could not download {what} {repo_id} from the Hub: {str(exc).splitlines()[0]}",
            hint="check the network or HF_ENDPOINT; offline, HF_HUB_OFFLINE=1 uses the HF_HOME cache",
        ) from exc


def modelscope_snapshot(repo_id: str, patterns: list[str] | None = None, repo_type: str = "model") -> Path:
    check_hub_id(repo_id, repo_type)
    ms = require("modelscope", purpose=f"modelscope: {repo_type}s")
    try:
        if repo_type == "dataset":
            return Path(ms.dataset_snapshot_download(repo_id))
        return Path(ms.snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # modelscope raises many exception types
        raise MedtuneError(
            f"could not download {repo_type} {repo_id} from ModelScope: {str(exc).splitlines()[0]}",
            hint="check the id and the network (MODELSCOPE_CACHE sets the cache)",
        ) from exc
