"""User-agent signals: declared crawlers, browser family, operating system, device.

Parsing a user agent costs about a millisecond for a usual one, and more the longer it
is, but real traffic repeats a few thousand strings, so results are cached per string.
Only the first ``MAX_USER_AGENT_CHARS`` (512) characters are parsed and cached
(``features.limits``): a unique 4 KB agent then costs ~3 ms instead of 17-21, and the
cache holds at most 65,536 strings of 512 characters. The offline path calls the same
function once per distinct string.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import crawleruseragents
from ua_parser import parse

from features.limits import MAX_USER_AGENT_CHARS

DEVICES = ("desktop", "mobile", "app", "other")
OPERATING_SYSTEMS = ("windows", "mac", "ios", "android", "linux", "other")
BROWSERS = ("chrome", "safari", "firefox", "edge", "headless", "other")

# Apps send their own agents (e.g. "ShopApp/5.2 (iPhone; iOS 17.1)"); these markers say so.
_APP_MARKERS = ("app/", "okhttp", "cfnetwork", "dalvik")


class UserAgentSignals(NamedTuple):
    is_crawler: bool
    missing: bool
    device: str  # one of DEVICES: what the agent itself suggests
    os: str  # one of OPERATING_SYSTEMS
    browser: str  # one of BROWSERS
    # ua-parser's own families, as it names them ("Chrome Mobile", "Android", "Pixel 8");
    # "" where it recognised none. The embedding ids hash these (features/definitions.py).
    browser_family: str = ""
    os_family: str = ""
    device_family: str = ""


def parse_user_agent(user_agent: str) -> UserAgentSignals:
    """Signals of one raw User-Agent string ("" when the click had none), read from its
    first ``MAX_USER_AGENT_CHARS`` characters."""
    return _parse_prefix(user_agent[:MAX_USER_AGENT_CHARS])


@functools.lru_cache(maxsize=65_536)
def _parse_prefix(user_agent: str) -> UserAgentSignals:
    if not user_agent:
        return UserAgentSignals(False, True, "other", "other", "other")
    lowered = user_agent.lower()
    crawler = crawleruseragents.is_crawler(user_agent)
    parsed = parse(user_agent)
    os_family = (parsed.os.family if parsed.os else "") or ""
    browser_family = (parsed.user_agent.family if parsed.user_agent else "") or ""
    device_family = (parsed.device.family if parsed.device else "") or ""
    os_name = _os_group(os_family)
    browser = _browser_group(browser_family, lowered)
    if any(marker in lowered for marker in _APP_MARKERS):
        device = "app"
    elif os_name in ("ios", "android"):
        device = "mobile"
    elif os_name in ("windows", "mac", "linux"):
        device = "desktop"
    else:
        device = "other"
    return UserAgentSignals(
        crawler, False, device, os_name, browser, browser_family, os_family, device_family
    )


def _os_group(family: str) -> str:
    f = family.lower()
    if f.startswith("windows"):
        return "windows"
    if f in ("mac os x", "macos") or f.startswith("mac"):
        return "mac"
    if f in ("ios", "ipados"):
        return "ios"
    if f.startswith("android"):
        return "android"
    if f in ("linux", "ubuntu", "fedora", "debian", "chrome os", "chromeos"):
        return "linux"
    return "other"


def _browser_group(family: str, lowered_agent: str) -> str:
    f = family.lower()
    if "headless" in f or "headless" in lowered_agent:
        return "headless"
    if "edge" in f:
        return "edge"
    if "chrome" in f or "chromium" in f:
        return "chrome"
    if "safari" in f:
        return "safari"
    if "firefox" in f:
        return "firefox"
    return "other"


def resolve_device(declared: str | None, user_agent: str) -> str:
    """The click's device group: the declared one when known, else the agent's."""
    if declared:
        d = declared.lower()
        return d if d in DEVICES else "other"
    return _parse_prefix(user_agent[:MAX_USER_AGENT_CHARS]).device
