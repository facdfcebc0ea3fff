"""``push_to_hub`` of a pruned model: the portable checkpoint and its model card in one upload.

transformers' ``push_to_hub`` saves into a temporary folder and then writes README.md over whatever the save
wrote, so the pruning card (:mod:`hf_ispasp.portable.card`) would be lost; :func:`push_pruned` runs the same steps
with public ``huggingface_hub`` calls.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..version import __version__
from . import MODELING_FILE, finish_checkpoint
from .card import README, WIDTHS_PICTURE, is_ispasp_card, write_model_card

__all__ = ["push_pruned"]

logger = logging.getLogger(__name__)

# Remote weight files that a push replaces as a whole: a stale shard index would shadow a new single file.
_REPLACED_ON_PUSH = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors", MODELING_FILE)


def _remote_readme(api: Any, repo_id: str, revision: str | None, token: Any) -> str | None:
    """The repository's README.md at ``revision`` (its default branch if the revision does not exist yet)."""
    from huggingface_hub.errors import RemoteEntryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id=repo_id, filename=README, revision=revision, token=token)
    except RemoteEntryNotFoundError:
        return None
    except RevisionNotFoundError:
        if revision is None:
            raise
        return _remote_readme(api, repo_id, None, token)
    return Path(path).read_text(encoding="utf-8")


def push_pruned(
    model: nn.Module, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
    create_pr: bool = False, max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
) -> Any:
    """``model.push_to_hub(repo_id)`` of a pruned model (the transformers signature): checkpoint and card together.

    transformers' ``push_to_hub`` saves into a temporary folder and then writes README.md over whatever the save
    wrote (the repository's card with ``tags`` added, or a generic template), so the pruning card would be lost.
    This runs the same steps with public ``huggingface_hub`` calls instead: ``create_repo``; read the repository's
    README.md; save the portable checkpoint (weights, ``config.json``, ``modeling_pruned.py`` where needed);
    write our card and picture unless the repository's README is not ours (then it stays, with ``tags`` added
    as transformers adds them); ``upload_folder``, which also deletes remote weight files and a
    stale ``modeling_pruned.py`` that this checkpoint no longer has. ``tags`` include ``model.model_tags``, as in
    transformers. Returns the ``CommitInfo``.
    """
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import HfHubHTTPError

    tags = list(dict.fromkeys([*(getattr(model, "model_tags", None) or []), *([tags] if isinstance(tags, str)
                                                                               else tags or [])])) or None
    api = HfApi(library_name="hf_ispasp", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    remote = _remote_readme(api, repo_id, revision, token)
    with tempfile.TemporaryDirectory() as tmp:
        type(model).save_pretrained(model, tmp, max_shard_size=max_shard_size)
        kind = finish_checkpoint(model, tmp)
        if kind is None:
            raise ValueError(f"the {type(model).__name__} has no width record: push_pruned is for models pruned by "
                             "hf_ispasp; use the transformers push_to_hub for others")
        if remote is None or is_ispasp_card(remote):
            write_model_card(model, tmp, checkpoint=kind, repo_id=repo_id, tags=tags)
        else:
            logger.warning(
                "The README.md of %s was not written by hf_ispasp, so the pruning card does not replace it. To "
                "replace it: hf_ispasp.model_card(model, repo_id=%r).push_to_hub(%r), and upload %s "
                "(hf_ispasp.widths_svg(model)).", repo_id, repo_id, repo_id, WIDTHS_PICTURE,
            )
            if tags:
                card = ModelCard(remote)
                card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
                card.save(Path(tmp) / README)
        if revision is not None and not revision.startswith("refs/pr"):
            try:
                api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
            except HfHubHTTPError as err:  # as transformers: a PR on a repo we cannot write may target any branch
                if not (create_pr and err.response is not None and err.response.status_code == 403):
                    raise
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message or "Upload model pruned with hf_ispasp",
            commit_description=commit_description, token=token, revision=revision, create_pr=create_pr,
            delete_patterns=list(_REPLACED_ON_PUSH),
        )
