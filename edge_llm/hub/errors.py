"""huggingface_hub's exceptions -> one-line HubErrors that say what happened and what to do.

huggingface_hub 2.4 (``huggingface_hub.errors``, ``utils/_http.py:hf_raise_for_status``): GatedRepoError
subclasses RepositoryNotFoundError, so it is caught first; HfHubHTTPError is both an httpx2 HTTPError and an
OSError, so it is caught before plain transport errors (``errors.HTTPError``: refused connections, DNS,
timeouts) and before OSError (a full disk while writing).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from ..errors import HubError


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str, endpoint: str) -> Iterator[None]:
    """Turns huggingface_hub's exceptions into one-line HubErrors that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError as e:  # a subclass of RepositoryNotFoundError: first
        url = f"{endpoint}/{repo_id}"
        if e.response is not None and e.response.status_code == 403:
            raise HubError(f"{repo_id} is gated and your token's account has no access yet: request it at {url}, "
                           "then pull again") from None
        raise HubError(f"{repo_id} is gated: request access at {url}, then set HF_TOKEN to a token of that account "
                       "(or run `hf auth login`)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: revision {revision!r} not found on {endpoint}; "
                       "pass an existing branch, tag or commit with --revision") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such model repo on {endpoint} (nor a local folder of that name); check the "
                       "name, or set HF_TOKEN if the repo is private") from None
    except RemoteEntryNotFoundError as e:
        raise HubError(f"{repo_id}: a file listed by the Hub is missing ({e.response.url}); try again later") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "an error"
        raise HubError(f"the Hub at {endpoint} answered {status} for {repo_id}; try again later") from None
    except (HTTPError, LocalEntryNotFoundError) as e:  # connection refused, DNS, timeouts, dropped transfers
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubError(f"cannot reach the Hub at {endpoint} ({reason}); check the network or HF_ENDPOINT, or set "
                       "HF_HUB_OFFLINE=1 to use only cached models") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise HubError(f"disk full while pulling {repo_id} ({e.filename or 'Hub cache'}); free some space "
                           "or set HF_HUB_CACHE to a larger disk, then pull again") from None
        if "Consistency check failed" in str(e):
            raise HubError(f"a download of {repo_id} was cut short by the network; pull again") from None
        raise
