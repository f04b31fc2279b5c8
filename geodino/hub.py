"""Hugging Face Hub ids: the local cache first, one quick reachability check, messages that name the flag.

transformers retries an unreachable hub for about 30 s before it gives up. geodino instead
tries the local cache (no network), then checks once, with a short timeout, whether the hub
answers at all, and fails at once with a message that names the right flag for the kind of
model when it does not. Written by hand because neither transformers nor huggingface_hub
offers a "fail fast when offline" mode short of HF_HUB_OFFLINE, which the user may not set.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from geodino.errors import ModelError

T = TypeVar("T")
PROBE_TIMEOUT_S = 3.0

GATED_HELP = (
    "DINOv3 weights are gated on the Hugging Face Hub. Accept the license at "
    "https://huggingface.co/{hub_id} while logged in, then download once on a machine with "
    "internet access: `hf auth login && hf download {hub_id} --local-dir ./{short}`. "
    "Point geodino at the copy with `--{flag} ./{short}` (a local directory), or set "
    "HF_HOME to a cache that holds it.{extra}"
)
_EXTRA = {"backbone": " An original Meta checkpoint (.pth) works too.",
          "canopy-model": " Meta's CHMv2 head .pth works too, with the SAT ViT-L .pth as --backbone."}


def short_name(hub_id: str, flag: str) -> str:
    return "chmv2" if flag == "canopy-model" else hub_id.split("/")[-1].replace("dinov3-", "")


def gated_help(hub_id: str, flag: str) -> str:
    return GATED_HELP.format(hub_id=hub_id, short=short_name(hub_id, flag), flag=flag, extra=_EXTRA.get(flag, ""))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers one request within ``timeout`` (DNS included: run in a thread)."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
            answer.append(True)
        except urllib.error.HTTPError:  # it answered, even if with an error status
            answer.append(True)
        except Exception:  # noqa: BLE001 (DNS, TLS, socket, timeout: all mean "not reachable")
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(answer and answer[0])


def load_from_hub(name: str, load: Callable[[bool], T], *, flag: str, what: str) -> T:
    """``load(local_files_only)`` from the cache, else from the hub if it answers; else one clear error.

    ``flag`` is the CLI option that takes a local copy instead (backbone, canopy-model);
    ``what`` names the kind of model in the message.
    """
    try:
        return load(True)
    except (OSError, ValueError):
        pass
    if hub_offline():
        reason = "it is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1)"
    elif not hub_reachable():
        reason = "it is not in the local Hugging Face cache and the Hugging Face Hub cannot be reached (no network)"
    else:
        try:
            return load(False)
        except (OSError, ValueError) as e:
            reason = f"the hub refused the download ({str(e).splitlines()[0]})"
    raise ModelError(f"cannot load {what} {name}: {reason}. " + gated_help(name, flag))
