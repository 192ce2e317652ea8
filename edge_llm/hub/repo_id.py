"""Hub repo ids as the Hub spells them: ``owner/name``."""

from __future__ import annotations

import re

from ..errors import HubError

# owner/name as the Hub spells them: letters, digits, '-', '_', '.'; no '--' or '..' (reserved in the cache).
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def is_repo_id(ref: str) -> bool:
    return bool(REPO_ID.match(ref)) and "--" not in ref and ".." not in ref and not ref.endswith(".")


def check_repo_id(ref: str) -> None:
    if not is_repo_id(ref):
        raise HubError(f"{ref!r} is not a Hub repo id; expected owner/name, "
                       "e.g. mlx-community/Llama-3.2-1B-Instruct-4bit")
