"""Upload an export directory to the Hugging Face Hub; the token is never printed or stored."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import XecomlaError


def push_to_hub(directory: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """Upload an export directory with the user's login or HF_TOKEN; the token is never printed."""
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN") or None
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            folder_path=str(directory),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=f"xecomla export ({Path(directory).name})",
        )
    except Exception as exc:  # hub errors: auth, permissions, network
        hint = "run `hf auth login` or set HF_TOKEN" if is_auth_error(exc) else "check the repo id and your network"
        text = str(exc).replace(token, "***") if token else str(exc)  # scrubbed before it is cut to one line
        reason = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
        raise XecomlaError(f"push to the Hugging Face Hub repo '{repo_id}' failed ({reason}): {hint}") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    return str(url)


def is_auth_error(exc: BaseException) -> bool:
    """A 401/403 response, or a message about a token or a login."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status in (401, 403) or "token" in str(exc).lower() or "login" in str(exc).lower()
