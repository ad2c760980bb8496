"""Synthetic ad traffic with ground truth: humans, customers, purchases and robots.

``simulate()`` writes ``clicks.parquet`` and ``purchases.parquet`` (SPEC §1-2) for a run of
``days`` UTC days. Everything is drawn with numpy from a seed, one random stream per
component, so a seed gives identical files and changing one component does not reshuffle
the others. Times are event times in epoch seconds.

Traffic model
-------------
Volumes are given per day; every population (users, customers, bot identities, shared IPs)
scales with ``clicks_per_day`` so small runs are fast and still contain every kind.

*Humans* (about 75% of clicks). A user population, each user with one device
(desktop / mobile browser / app) and a matching raw User-Agent, a home IP (households
share a few), and, for some desktop users, an office NAT IP used on weekday working hours.
Mobile and app sessions often come from a carrier CGNAT address shared by very many users,
so "many users on one IP" is not by itself robotic. Activity is heavy-tailed per user.
Sessions start following a UTC diurnal profile (evening peak, trough at 2-5 am) that differs
on weekends, with a weekly volume rhythm; a session has a few clicks (geometric, mean ~2.4)
seconds to minutes apart. Ads are chosen with Zipf popularity; placement depends on the
device (``app_feed`` only in the app); search placements carry a query matching the ad's
product category; the publisher is fixed per session.

*Customers*. About 40% of users are customers (most app users); some customers use two
devices. Customers sign in on part of their sessions (``logged_in``/``customer_id``).
Purchase frequency is log-normal across customers (a few heavy buyers), and a 180-day
purchase history before the first day (``click_id`` null) gives them RFM scores.

*Purchases*. A human click converts with a few percent probability (higher when signed in,
higher for frequent buyers) after a delay of 30 s plus an exponential with mean 2 h; 60%
of these purchases carry the click's ``click_id``, the rest leave it null (the latest-click
rule attributes them, sometimes to another click of the user). Customers also buy without
any ad click (organic purchases, ``click_id`` null), so about half of all in-window
purchases carry a ``click_id``. Purchases after the last day are not observed. Most human
clicks never lead to a purchase, so purchase-based "human" labels are sparse and noisy, as
in production. Robots never purchase.

*Robots* (``is_bot``/``bot_kind``; ~25% of clicks, ids look exactly like human ids):

==============  =============================================================================
burst           one identity fires 15-500 clicks within a few minutes on one advertiser's ads
low_slow        a few identities click all day at a steady slow pace (regular gaps), no
                diurnal rhythm, stable user_id/IP/UA, ads uniformly at random
proxy_rotator   residential-looking IPs and human-looking UAs, a fresh user/session/IP every
                2-5 clicks, flat in time, concentrated on a few advertisers and publishers
hijacked        real customer accounts (mostly dormant, some heavy buyers) signed in from
                data-centre IPs on a new device, long sessions on many ads, mostly at night (UTC)
crawler         declared crawler UAs (Googlebot, bingbot, AhrefsBot, ...) from their own
                data-centre ranges, cookieless (new user_id per session), logged out
datacenter      normal desktop UAs (30% HeadlessChrome) from cloud IP ranges, moderate
                velocity (~7 clicks/min), identities reused over a few sessions
mimic           only from ``new_bot_day`` on (drift): app UAs, carrier IPs, human diurnal
                rhythm, moderate velocity, concentrated on a few advertisers
==============  =============================================================================

The ``proxy_lies`` world
------------------------
SLIDR's weak labels and its FPR assume that purchasers are a representative sample of
humans. ``world="proxy_lies"`` breaks that assumption on purpose, so that tests can check
that the method does not fool itself; ``"standard"`` (the default) is the model above,
unchanged. In ``proxy_lies``:

* *Who buys depends on the slice.* Signed-out clicks convert with 0.1% probability for
  customers and never for guests (non-customers), so logged-out slices have almost no
  purchase labels. Signed-in app clicks convert at 7%, signed-in web clicks at 3.5%. Fewer
  app users are customers (55%) and only 60% of those keep the app signed in, so most app
  traffic is signed out.
* *Humans who never buy.* Comparison browsers (4% of web guests, ~8% of human clicks)
  click 10-40 ads of one product category per session, 5-30 s apart, and never purchase;
  a handful of people browse on smart TVs and game consoles (device ``other``, signed
  out, guests).
* *Two more robot kinds* (together ~6.5% of clicks, so robots are ~31%):

  ==============  ===========================================================================
  infected_pc     ad-fraud malware on home computers: hidden clicks at the owner's address
                  with the owner's browser UA, a cookie of its own, short sessions that
                  follow the human hour profile (hour of day does not separate them)
  script          bare HTTP clients (python-requests, curl, Go-http-client, ..., or no
                  agent at all) from cloud IPs, cookieless, device ``other``: the
                  ``other/logged_out`` slice is nearly all robots
  ==============  ===========================================================================

  hijacked (signed-in robots) and proxy_rotator stay as above.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DAY = 86_400.0
HOUR = 3_600.0
HISTORY_DAYS = 180

KINDS = (
    "human",
    "burst",
    "low_slow",
    "proxy_rotator",
    "hijacked",
    "crawler",
    "datacenter",
    "mimic",
    "infected_pc",
    "script",
)
_K = {k: i for i, k in enumerate(KINDS)}
WORLDS = ("standard", "proxy_lies")
PROXY_LIES_KINDS = ("infected_pc", "script")  # robot kinds only the proxy_lies world has
DEVICES = ("desktop", "mobile", "app", "other")  # "other" occurs only in proxy_lies
DESKTOP, MOBILE, APP, OTHER = 0, 1, 2, 3
PLACEMENTS = ("search_top", "search_side", "product_detail", "homepage", "app_feed")
SEARCH_PLACEMENTS = (0, 1)

# Share of all clicks per robot kind (constant per day: robots have no weekly rhythm).
BOT_SHARE = {
    "burst": 0.05,
    "low_slow": 0.04,
    "proxy_rotator": 0.05,
    "hijacked": 0.035,
    "crawler": 0.025,
    "datacenter": 0.05,
}
MIMIC_SHARE = 0.06  # taken from the human share on drift days, so volume stays constant

# --------------------------------------------------------------------------------------
# The proxy_lies world (module docstring): who buys depends on the slice, some humans
# never buy, and two more robot kinds. Arrays per device follow DEVICES[:3].
# --------------------------------------------------------------------------------------
PROXY_LIES_BOT_SHARE = {"infected_pc": 0.04, "script": 0.025}
_PL_CUSTOMER_SHARE = np.array([0.38, 0.30, 0.55])  # standard: 0.85 of app users
_PL_SIGN_IN = np.array([0.55, 0.45, 0.60])  # app: of users, standard: 0.90 of app sessions
_PL_BUY_SIGNED_IN = np.array([0.035, 0.035, 0.07])  # per click, before the buyer multiplier
_PL_BUY_SIGNED_OUT = 0.001  # customers only: guests never buy
_PL_COMPARERS = 0.04  # share of web guests who compare offers and never buy
_PL_COMPARISON_CLICKS = 0.06  # their share of the human click budget
_PL_OTHER_DEVICE_CLICKS = 0.0005  # smart-TV / console humans, share of all clicks

# --------------------------------------------------------------------------------------
# Rhythms (UTC). Hour weights are relative; day-of-week volume multiplies the human budget.
# --------------------------------------------------------------------------------------
_WEEKDAY_HOURS = np.array(
    [
        0.55,
        0.35,
        0.20,
        0.16,
        0.16,
        0.20,
        0.40,
        0.70,
        0.95,
        1.00,
        1.00,
        1.05,
        1.10,
        1.05,
        1.00,
        1.00,
        1.05,
        1.15,
        1.35,
        1.60,
        1.75,
        1.70,
        1.35,
        0.90,
    ]
)
# Weekends: later start, long midday plateau, flatter evening peak.
_WEEKEND_HOURS = np.array(
    [
        0.70,
        0.50,
        0.28,
        0.20,
        0.18,
        0.20,
        0.28,
        0.42,
        0.65,
        0.95,
        1.15,
        1.25,
        1.30,
        1.30,
        1.25,
        1.20,
        1.20,
        1.25,
        1.40,
        1.50,
        1.55,
        1.45,
        1.20,
        0.90,
    ]
)
# Hijacked accounts are worked while their owners sleep.
_NIGHT_HOURS = np.array(
    [
        1.6,
        1.8,
        1.9,
        1.9,
        1.7,
        1.4,
        1.0,
        0.7,
        0.5,
        0.4,
        0.4,
        0.4,
        0.4,
        0.4,
        0.4,
        0.4,
        0.4,
        0.5,
        0.5,
        0.6,
        0.7,
        0.8,
        1.0,
        1.3,
    ]
)
_DOW_VOLUME = np.array([1.00, 0.98, 0.97, 0.99, 0.94, 1.08, 1.12])  # Monday .. Sunday

# --------------------------------------------------------------------------------------
# User agents (weights within a device class).
# --------------------------------------------------------------------------------------
_DESKTOP_UAS = (
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.0.0 Safari/537.36",
        0.22,
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/129.0.0.0 Safari/537.36",
        0.08,
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.0.0 Safari/537.36",
        0.10,
    ),
    (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 "
        "Safari/537.36",
        0.03,
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.0.0 Safari/537.36 Edg/130.0.0.0",
        0.12,
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/129.0.0.0 Safari/537.36 Edg/129.0.0.0",
        0.03,
    ),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:132.0) Gecko/20100101 Firefox/132.0", 0.06),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:131.0) Gecko/20100101 Firefox/131.0", 0.02),
    ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0", 0.02),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/18.1 Safari/605.1.15",
        0.09,
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.6 Safari/605.1.15",
        0.05,
    ),
)
_MOBILE_UAS = (
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
        "Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
        0.22,
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
        "Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
        0.14,
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
        "Gecko) CriOS/130.0.6723.90 Mobile/15E148 Safari/604.1",
        0.05,
    ),
    (
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.0.0 Mobile Safari/537.36",
        0.34,
    ),
    (
        "Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
        0.10,
    ),
    (
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/129.0.0.0 Mobile Safari/537.36",
        0.10,
    ),
    ("Mozilla/5.0 (Android 14; Mobile; rv:132.0) Gecko/132.0 Firefox/132.0", 0.05),
)
_APP_UAS = (
    ("ShopApp/5.2.1 (iPhone; iOS 17.1; Scale/3.00)", 0.12),
    ("ShopApp/5.3.0 (iPhone; iOS 18.1; Scale/3.00)", 0.22),
    ("ShopApp/5.3.0 (iPhone; iOS 17.6; Scale/3.00)", 0.10),
    ("ShopApp/5.3.0 (iPad; iOS 18.1; Scale/2.00)", 0.04),
    ("ShopApp/5.2.1 (Linux; Android 14; Pixel 8)", 0.10),
    ("ShopApp/5.3.0 (Linux; Android 14; SM-S911B)", 0.16),
    ("ShopApp/5.3.0 (Linux; Android 13; SM-A546B)", 0.14),
    ("ShopApp/5.1.4 (Linux; Android 12; moto g(30))", 0.06),
    ("ShopApp/5.3.0 (Linux; Android 14; 23049PCD8G)", 0.06),
)
_HEADLESS_UAS = (
    (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/130.0.6723.58 Safari/537.36",
        0.6,
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/129.0.6668.70 Safari/537.36",
        0.4,
    ),
)
# Declared crawlers: (weight, user agents, address prefixes they crawl from).
_CRAWLERS = (
    (
        0.33,
        (
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, "
            "like Gecko) Chrome/130.0.6723.69 Mobile Safari/537.36 (compatible; Googlebot/2.1; "
            "+http://www.google.com/bot.html)",
        ),
        ((66, 249, 66), (66, 249, 68), (66, 249, 79)),
    ),
    (
        0.20,
        ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",),
        ((157, 55, 39), (40, 77, 167), (207, 46, 13)),
    ),
    (
        0.15,
        ("Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",),
        ((54, 36, 148), (54, 36, 149), (51, 222, 253)),
    ),
    (
        0.10,
        ("Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)",),
        ((185, 191, 171),),
    ),
    (
        0.08,
        ("Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",),
        ((5, 255, 231), (213, 180, 203)),
    ),
    (
        0.06,
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5) AppleWebKit/605.1.15 (KHTML, like "
            "Gecko) Version/13.1.1 Safari/605.1.15 (Applebot/0.1; "
            "+http://www.apple.com/go/applebot)",
        ),
        ((17, 241, 219), (17, 241, 75)),
    ),
    (
        0.04,
        (
            "Mozilla/5.0 (compatible; DotBot/1.2; +https://opensiteexplorer.org/dotbot; "
            "help@moz.com)",
        ),
        ((216, 244, 66),),
    ),
    (0.04, ("Mozilla/5.0 (compatible; MJ12bot/v1.4.8; http://mj12bot.com/)",), ((136, 243, 228),)),
)
# Bare HTTP clients; "" is a request without a User-Agent header.
_SCRIPT_UAS = (
    ("python-requests/2.32.3", 0.22),
    ("python-requests/2.31.0", 0.08),
    ("curl/8.5.0", 0.12),
    ("curl/7.81.0", 0.05),
    ("Go-http-client/1.1", 0.14),
    ("Go-http-client/2.0", 0.05),
    ("Wget/1.21.4", 0.04),
    ("Java/17.0.9", 0.04),
    ("python-urllib3/2.2.3", 0.04),
    ("axios/1.7.7", 0.04),
    ("", 0.18),
)
# Smart TVs and game consoles: real people on devices the device classes do not cover.
_OTHER_DEVICE_UAS = (
    (
        "Mozilla/5.0 (SMART-TV; Linux; Tizen 7.0) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/6.2 Chrome/94.0.4606.31 TV Safari/537.36",
        0.35,
    ),
    (
        "Mozilla/5.0 (Web0S; Linux/SmartTV) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/94.0.4606.128 Safari/537.36 WebAppManager",
        0.25,
    ),
    (
        "Mozilla/5.0 (PlayStation; PlayStation 5/8.20) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/15.4 Safari/605.1.15",
        0.15,
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; Xbox; Xbox Series X) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36 Edge/130.0.0.0",
        0.15,
    ),
    (
        "Mozilla/5.0 (Nintendo Switch; WifiWebAuthApplet) AppleWebKit/606.4 (KHTML, like Gecko) "
        "NF/6.0.1.15.4 NintendoBrowser/5.1.0.20389",
        0.10,
    ),
)

# --------------------------------------------------------------------------------------
# Address space. Prefixes are realistic-looking ISP / carrier / cloud blocks.
# --------------------------------------------------------------------------------------
_RESIDENTIAL = tuple(
    (o,)
    for o in (
        24,
        50,
        67,
        68,
        69,
        71,
        72,
        73,
        75,
        76,
        96,
        98,
        99,
        108,
        81,
        82,
        84,
        86,
        90,
        92,
        109,
        176,
        188,
    )
)
_DATACENTER = (
    (3, 80),
    (18, 204),
    (34, 82),
    (34, 145),
    (35, 186),
    (52, 14),
    (54, 210),
    (104, 196),
    (159, 65),
    (167, 99),
    (138, 68),
    (5, 9),
    (95, 216),
    (51, 15),
    (45, 77),
    (139, 59),
    (20, 42),
    (13, 66),
    (172, 105),
    (64, 225),
)
# Public CGNAT gateways of three mobile carriers.
_CARRIERS = (((172, 56), (172, 58)), ((107, 77), (166, 137)), ((174, 192), (174, 205)))
_CARRIER_SHARE = np.array([0.40, 0.35, 0.25])

# --------------------------------------------------------------------------------------
# Ads context: product categories with search terms, publishers.
# --------------------------------------------------------------------------------------
_CATEGORIES = {
    "electronics": (
        "wireless headphones",
        "bluetooth speaker",
        "4k tv",
        "laptop",
        "gaming mouse",
        "usb c charger",
        "smart watch",
        "tablet",
        "mechanical keyboard",
        "earbuds",
    ),
    "fashion": (
        "running shoes",
        "winter jacket",
        "jeans",
        "sneakers",
        "dress",
        "leather boots",
        "hoodie",
        "sunglasses",
        "handbag",
        "wool sweater",
    ),
    "home": (
        "air fryer",
        "coffee maker",
        "vacuum cleaner",
        "mattress",
        "desk lamp",
        "office chair",
        "blender",
        "cookware set",
        "bed sheets",
        "robot vacuum",
    ),
    "beauty": (
        "moisturizer",
        "shampoo",
        "perfume",
        "lipstick",
        "sunscreen",
        "hair dryer",
        "face serum",
        "electric toothbrush",
        "razor",
        "nail polish",
    ),
    "sports": (
        "yoga mat",
        "dumbbells",
        "bike helmet",
        "tent",
        "treadmill",
        "hiking backpack",
        "protein powder",
        "tennis racket",
        "ski goggles",
        "fitness tracker",
    ),
    "toys": (
        "lego set",
        "board game",
        "dollhouse",
        "rc car",
        "puzzle 1000 pieces",
        "stuffed animal",
        "building blocks",
        "toy kitchen",
        "kids scooter",
        "action figure",
    ),
    "grocery": (
        "coffee beans",
        "green tea",
        "dark chocolate",
        "olive oil",
        "protein bars",
        "dog food",
        "cat litter",
        "baby formula",
        "sparkling water",
        "pasta",
    ),
    "travel": (
        "suitcase",
        "travel pillow",
        "carry on luggage",
        "packing cubes",
        "travel adapter",
        "backpack",
        "passport holder",
        "luggage scale",
        "duffel bag",
        "neck pillow",
    ),
}
# Query variants of a term and how often people type them (it is November: Black Friday).
_QUERY_FORMS = (
    ("{}", 0.42),
    ("best {}", 0.14),
    ("cheap {}", 0.12),
    ("{} sale", 0.10),
    ("{} black friday", 0.12),
    ("{} reviews", 0.10),
)
_WEB_PUBLISHERS = (
    "shop.example",
    "search.example",
    "dailynews.example",
    "techreview.example",
    "dealhunter.example",
    "recipes.example",
    "sportscenter.example",
    "weathernow.example",
    "moviebuzz.example",
    "travelguide.example",
    "homeandgarden.example",
    "parenting.example",
    "autoworld.example",
    "fashionista.example",
    "gamerhub.example",
    "financetoday.example",
    "healthline.example",
    "localnews.example",
    "petlovers.example",
    "diyprojects.example",
    "couponsite.example",
    "forum-talk.example",
    "lyricsworld.example",
    "freegames.example",
    "wallpapers.example",
    "horoscope.example",
    "quizzes.example",
    "celebgossip.example",
    "pricecompare.example",
    "blogring.example",
)
_APP_PUBLISHERS = (
    "com.shopapp.ios",
    "com.shopapp.android",
    "com.newsfeed.reader",
    "com.puzzle.match3",
    "com.weather.live",
    "com.recipes.cook",
    "com.fitness.steps",
    "com.video.shorts",
    "com.chat.messenger",
    "com.deals.daily",
)
_PUBLISHERS = _WEB_PUBLISHERS + _APP_PUBLISHERS
_N_WEB = len(_WEB_PUBLISHERS)
_PUBLISHER_CHANNEL = np.array([0] * _N_WEB + [1] * len(_APP_PUBLISHERS))
_CHANNELS = ("web", "app")

# Placement mix per device (rows follow DEVICES, columns PLACEMENTS). No side column on
# phones; the feed exists only in the app.
_PLACEMENT_MIX = np.array(
    [
        [0.35, 0.15, 0.28, 0.22, 0.00],
        [0.45, 0.00, 0.33, 0.22, 0.00],
        [0.15, 0.00, 0.10, 0.00, 0.75],
        [0.30, 0.15, 0.33, 0.22, 0.00],
    ]
)

N_ADS = 2_000
N_ADVERTISERS = 200


# ======================================================================================
# Public API
# ======================================================================================
@dataclass
class SimulationSummary:
    """What ``simulate`` wrote: counts, the robot mix and where the files are."""

    n_clicks: int
    n_purchases: int  # rows in purchases.parquet, history included
    bot_share: float  # robotic clicks / all clicks
    clicks_by_kind: dict[str, int]
    path_clicks: Path
    path_purchases: Path
    n_history_purchases: int = 0  # purchases before the first day (click_id null)
    n_purchases_with_click: int = 0  # purchases carrying an attributed click_id
    n_users: int = 0  # human users
    n_customers: int = 0
    days: int = 0
    seed: int = 0
    start: str = ""
    new_bot_day: int | None = None
    elapsed_s: float = 0.0
    world: str = "standard"
    # proxy_lies only: clicks of the human segments that never buy, by segment
    human_segments: dict[str, int] = field(default_factory=dict)

    def to_text(self) -> str:
        """A short human-readable summary, one fact per line."""
        world = "" if self.world == "standard" else f", world {self.world!r}"
        lines = [
            f"simulated {self.n_clicks:,} clicks over {self.days} day(s) from {self.start} "
            f"(seed {self.seed}{world}) in {self.elapsed_s:.1f} s",
            f"robots: {self.bot_share:.1%} of clicks"
            + (f"; new kind 'mimic' from day {self.new_bot_day}" if self.new_bot_day else ""),
        ]
        for kind, n in self.clicks_by_kind.items():
            lines.append(f"  {kind:<14}{n:>12,}  {n / max(self.n_clicks, 1):6.1%}")
        if self.human_segments:
            lines.append(
                "humans who never buy: "
                + ", ".join(f"{k} {n:,} clicks" for k, n in self.human_segments.items())
            )
        in_window = self.n_purchases - self.n_history_purchases
        lines.append(
            f"purchases: {in_window:,} in window ({self.n_purchases_with_click:,} with click_id) "
            f"+ {self.n_history_purchases:,} history; {self.n_users:,} users, "
            f"{self.n_customers:,} customers"
        )
        lines.append(f"wrote {self.path_clicks} and {self.path_purchases}")
        return "\n".join(lines)


def simulate(
    out_dir: Path,
    days: int = 4,
    seed: int = 7,
    clicks_per_day: int = 250_000,
    new_bot_day: int | None = None,
    start: str = "2026-11-02",
    progress: Callable[[str], None] | None = None,
    world: str = "standard",
) -> SimulationSummary:
    """Write ``out_dir/clicks.parquet`` and ``out_dir/purchases.parquet``.

    ``days`` UTC days of traffic from ``start`` (ISO date/time, UTC unless it names a zone)
    at about ``clicks_per_day`` clicks a day; from day ``new_bot_day`` (0-based, in
    [1, days-1]) on, a new robot kind ``mimic`` appears. ``world`` is one of WORLDS:
    ``"standard"``, or ``"proxy_lies"``, where purchasers are not a representative sample
    of humans (module docstring). Same arguments, same files.
    Raises ValueError on arguments it cannot honour.
    """
    if world not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}, got {world!r}")
    if int(days) != days or days < 1:
        raise ValueError(f"days must be an integer >= 1, got {days!r}")
    if int(clicks_per_day) != clicks_per_day or clicks_per_day < 100:
        raise ValueError(f"clicks_per_day must be an integer >= 100, got {clicks_per_day!r}")
    if new_bot_day is not None and not (1 <= new_bot_day <= days - 1):
        raise ValueError(
            f"new_bot_day must be in [1, days-1] = [1, {days - 1}] so that the drift has "
            f"clean days before it, got {new_bot_day!r}"
        )
    try:
        t_start = datetime.fromisoformat(start)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"start must be an ISO date such as 2026-11-02, got {start!r}") from exc
    if t_start.tzinfo is None:
        t_start = t_start.replace(tzinfo=UTC)

    say = progress or (lambda _msg: None)
    began = time.perf_counter()
    out_dir = Path(out_dir)
    sim = _World(
        t0=t_start.timestamp(),
        days=int(days),
        cpd=int(clicks_per_day),
        dow0=t_start.astimezone(UTC).weekday(),
        seed=int(seed),
        name=world,
    )
    clicks = _Clicks()

    say("population: users, customers, ads")
    pop = _make_population(sim)
    ads = _make_ads(sim)

    # Daily click budgets: robots are constant, humans follow the weekly rhythm and give up
    # the mimic's share on drift days.
    bot_share = dict(BOT_SHARE)
    generators = [
        ("burst", _gen_burst),
        ("low_slow", _gen_low_slow),
        ("proxy_rotator", _gen_proxy_rotator),
        ("hijacked", _gen_hijacked),
        ("crawler", _gen_crawler),
        ("datacenter", _gen_datacenter),
    ]
    if sim.proxy_lies:
        bot_share.update(PROXY_LIES_BOT_SHARE)
        generators += [("infected_pc", _gen_infected_pc), ("script", _gen_script)]
    dow = (sim.dow0 + np.arange(sim.days)) % 7
    human_share = np.full(sim.days, 1.0 - sum(bot_share.values()))
    mimic_days = np.zeros(sim.days, dtype=np.bool_)
    if new_bot_day is not None:
        mimic_days[new_bot_day:] = True
        human_share[mimic_days] -= MIMIC_SHARE
    say("humans")
    human_budget = sim.cpd * human_share * _DOW_VOLUME[dow]
    if sim.proxy_lies:
        other_device = np.full(sim.days, _PL_OTHER_DEVICE_CLICKS * sim.cpd)
        comparison = (human_budget - other_device) * _PL_COMPARISON_CLICKS
        _gen_humans(sim, pop, ads, clicks, human_budget - other_device - comparison)
        say("humans: comparison browsers, smart TVs and consoles")
        _gen_comparison_browsers(sim, pop, ads, clicks, comparison)
        _gen_other_device_humans(sim, ads, clicks, other_device)
    else:
        _gen_humans(sim, pop, ads, clicks, human_budget)

    bot_budget = {k: s * sim.cpd * sim.days for k, s in bot_share.items()}
    for kind, gen in generators:
        say(f"robots: {kind}")
        gen(sim, pop, ads, clicks, bot_budget[kind])
    if new_bot_day is not None:
        say(f"robots: mimic from day {new_bot_day}")
        _gen_mimic(sim, pop, ads, clicks, MIMIC_SHARE * sim.cpd, int(new_bot_day))

    say("sorting clicks by time")
    cols = clicks.concat()
    order = np.argsort(cols["ts"], kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    width = max(8, len(str(len(order))))
    click_ids = pa.array([f"c{i:0{width}d}" for i in range(len(order))], pa.string())

    say("purchases")
    purchases = _gen_purchases(sim, pop, cols, rank, click_ids)

    say("writing parquet")
    out_dir.mkdir(parents=True, exist_ok=True)
    clicks_table = _clicks_table(sim, pop, ads, cols, order, click_ids)
    path_clicks = out_dir / "clicks.parquet"
    path_purchases = out_dir / "purchases.parquet"
    _write(clicks_table, path_clicks)
    _write(purchases, path_purchases)

    kinds = cols["kind"]
    counts = np.bincount(kinds, minlength=len(KINDS))
    by_kind = {
        k: int(counts[i])
        for i, k in enumerate(KINDS)
        if (k != "mimic" or new_bot_day is not None)
        and (k not in PROXY_LIES_KINDS or sim.proxy_lies)
    }
    n = len(kinds)
    hist = int((purchases.column("ts").to_numpy() < sim.t0).sum())
    summary = SimulationSummary(
        n_clicks=n,
        n_purchases=purchases.num_rows,
        bot_share=float((kinds != _K["human"]).sum() / max(n, 1)),
        clicks_by_kind=by_kind,
        path_clicks=path_clicks,
        path_purchases=path_purchases,
        n_history_purchases=hist,
        n_purchases_with_click=purchases.num_rows - purchases.column("click_id").null_count,
        n_users=pop.n_users,
        n_customers=len(pop.cust_lambda),
        days=sim.days,
        seed=sim.seed,
        start=t_start.isoformat(),
        new_bot_day=new_bot_day,
        world=sim.name,
        human_segments=_human_segments(pop, cols) if sim.proxy_lies else {},
    )
    summary.elapsed_s = time.perf_counter() - began
    say(f"done in {summary.elapsed_s:.1f} s")
    return summary


# ======================================================================================
# Building blocks
# ======================================================================================
@dataclass
class _World:
    """Run-wide constants; ``scale`` sizes every population relative to 250k clicks/day."""

    t0: float
    days: int
    cpd: int
    dow0: int
    seed: int
    name: str = "standard"  # one of WORLDS
    users: _IdPool = field(default_factory=lambda: _IdPool())
    sessions: _IdPool = field(default_factory=lambda: _IdPool())
    ips: _StringPool = field(default_factory=lambda: _StringPool())
    uas: _StringPool = field(default_factory=lambda: _StringPool())

    @property
    def end(self) -> float:
        return self.t0 + self.days * DAY

    @property
    def scale(self) -> float:
        return self.cpd / 250_000

    @property
    def proxy_lies(self) -> bool:
        return self.name == "proxy_lies"

    def rng(self, component: str) -> np.random.Generator:
        # One stream per component (crc32 is stable across processes, unlike hash()).
        return np.random.default_rng([self.seed, zlib.crc32(component.encode())])


class _StringPool:
    """Distinct strings referenced by integer codes; rows carry codes until the very end."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, values: Sequence[str]) -> np.ndarray:
        codes = np.empty(len(values), np.int64)
        for i, v in enumerate(values):
            code = self._index.get(v)
            if code is None:
                code = self._index[v] = len(self.values)
                self.values.append(v)
            codes[i] = code
        return codes

    def arrow(self) -> pa.Array:
        return pa.array(self.values, pa.string())


class _IdPool:
    """Random 64-bit hex ids, unique over the run.

    Random rather than counters so that an id says nothing about when or by which
    generator it was made (a counter would leak the bot kind to a model).
    """

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._n = 0

    def new(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` fresh ids; returns their codes."""
        seen = np.concatenate(self._parts) if self._parts else np.empty(0, np.uint64)
        vals = rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)
        while True:  # collisions are astronomically rare, but ids must be unique
            _, first = np.unique(vals, return_index=True)
            dup = np.ones(n, bool)
            dup[first] = False
            dup |= np.isin(vals, seen)
            if not dup.any():
                break
            vals[dup] = rng.integers(0, np.iinfo(np.uint64).max, int(dup.sum()), dtype=np.uint64)
        self._parts.append(vals)
        codes = np.arange(self._n, self._n + n, dtype=np.int64)
        self._n += n
        return codes

    def arrow(self) -> pa.Array:
        vals = np.concatenate(self._parts) if self._parts else np.empty(0, np.uint64)
        return pa.array([f"{v:016x}" for v in vals.tolist()], pa.string())


class _Clicks:
    """Accumulates click rows as integer codes, per column."""

    COLUMNS = (
        "ts",
        "user",
        "ip",
        "session",
        "ua",
        "logged_in",
        "cust",
        "device",
        "ad",
        "placement",
        "publisher",
        "kind",
    )

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {c: [] for c in self.COLUMNS}

    def add(self, kind: str, ts: np.ndarray, lo: float, hi: float, **cols: object) -> None:
        """Add rows of one kind; rows outside [lo, hi) are dropped; scalars broadcast."""
        ts = np.round(ts, 3)  # millisecond event times
        keep = (ts >= lo) & (ts < hi)
        n = int(keep.sum())
        self.parts["ts"].append(ts[keep])
        self.parts["kind"].append(np.full(n, _K[kind], np.int8))
        cols.setdefault("logged_in", False)
        cols.setdefault("cust", -1)
        for name in self.COLUMNS[1:-1]:
            value = np.asarray(cols[name])
            self.parts[name].append(
                np.broadcast_to(value, keep.shape)[keep] if value.ndim == 0 else value[keep]
            )

    def concat(self) -> dict[str, np.ndarray]:
        return {c: np.concatenate(p) for c, p in self.parts.items()}


def _weighted(rng: np.random.Generator, n: int, weights: np.ndarray) -> np.ndarray:
    """``n`` indices drawn with probability proportional to ``weights``."""
    cdf = np.cumsum(weights, dtype=float)
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(cdf) - 1)


def _weighted_by_row(rng: np.random.Generator, group: np.ndarray, table: np.ndarray) -> np.ndarray:
    """One draw per row from the distribution ``table[group[row]]``."""
    cdf = np.cumsum(table, axis=1)
    cdf /= cdf[:, -1:]
    u = rng.random(len(group))
    return np.minimum((u[:, None] >= cdf[group]).sum(axis=1), table.shape[1] - 1)


def _random_ips(rng: np.random.Generator, n: int, prefixes: Sequence[tuple[int, ...]]) -> list[str]:
    """``n`` IPv4 addresses inside ``prefixes`` (1-3 leading octets); host .1-.254."""
    which = rng.integers(len(prefixes), size=n)
    octets = rng.integers(0, 256, size=(n, 4))
    octets[:, 3] = rng.integers(1, 255, size=n)
    for i, p in enumerate(prefixes):
        rows = which == i
        octets[rows, : len(p)] = p
    return [f"{a}.{b}.{c}.{d}" for a, b, c, d in octets.tolist()]


def _ua_codes(
    world: _World, rng: np.random.Generator, n: int, pool: Sequence[tuple[str, float]]
) -> np.ndarray:
    codes = world.uas.add([ua for ua, _ in pool])
    return codes[_weighted(rng, n, np.array([w for _, w in pool]))]


def _expand_sessions(
    rng: np.random.Generator,
    starts: np.ndarray,
    sizes: np.ndarray,
    gaps: Callable[[int], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Click rows of sessions: (session index per row, ts per row).

    The first click is at the session start, later ones follow gaps drawn by ``gaps(n)``.
    """
    sess = np.repeat(np.arange(len(sizes)), sizes)
    g = gaps(len(sess))
    first = np.cumsum(sizes) - sizes
    g[first] = 0.0
    c = np.cumsum(g)
    return sess, starts[sess] + c - np.repeat(c[first], sizes)


def _diurnal_starts(
    world: _World,
    rng: np.random.Generator,
    per_day: np.ndarray,
    weekday: np.ndarray,
    weekend: np.ndarray,
) -> np.ndarray:
    """Start times: ``per_day[d]`` of them on day d, hours drawn from the day type's profile."""
    day = np.repeat(np.arange(world.days), per_day)
    is_weekend = ((world.dow0 + day) % 7) >= 5
    hour = np.where(
        is_weekend, _weighted(rng, len(day), weekend), _weighted(rng, len(day), weekday)
    )
    return world.t0 + day * DAY + (hour + rng.random(len(day))) * HOUR


def _units_for_budget(
    rng: np.random.Generator, budget: float, draw: Callable[[int], np.ndarray], mean_guess: float
) -> np.ndarray:
    """Sizes of units (bursts, sessions, identities) whose clicks add up to ~``budget``.

    At least one unit, so that even tiny runs contain the kind.
    """
    sizes = draw(int(budget / mean_guess * 1.3) + 4)
    while sizes.sum() < budget:
        sizes = np.concatenate([sizes, draw(int(budget / mean_guess * 0.3) + 4)])
    n = int(np.searchsorted(np.cumsum(sizes), budget)) + 1
    return sizes[: max(1, n)]


def _lognormal_sizes(
    rng: np.random.Generator, median: float, sigma: float, lo: int, hi: int
) -> Callable[[int], np.ndarray]:
    return lambda n: np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(
        np.int64
    )


def _exp_gaps(rng: np.random.Generator, mean: float, floor: float) -> Callable[[int], np.ndarray]:
    return lambda n: floor + rng.exponential(mean, n)


# ======================================================================================
# Population and ads
# ======================================================================================
@dataclass
class _Population:
    n_users: int
    user: np.ndarray  # user id codes
    device: np.ndarray
    ua: np.ndarray
    home_ip: np.ndarray
    office_ip: np.ndarray  # -1: no office
    carrier: np.ndarray
    carrier_ips: list[np.ndarray]  # ip codes of each carrier's CGNAT gateways
    activity: np.ndarray  # relative session rate
    cust: np.ndarray  # customer index, -1: not a customer
    buy_mult: np.ndarray  # per-user conversion multiplier
    customer_ids: list[str]
    cust_lambda: np.ndarray  # expected purchases per 180 days
    cust_amount: np.ndarray  # log-scale offset of basket size
    cust_user: np.ndarray  # primary user of each customer
    comparer: np.ndarray  # bool: compares offers, never buys (proxy_lies only)

    def members(self, user_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(is a population user, population index or 0) of click rows' user codes."""
        idx = user_codes - self.user[0]  # the population's id codes are consecutive
        inside = (idx >= 0) & (idx < self.n_users)
        return inside, np.where(inside, idx, 0)


def _make_population(world: _World) -> _Population:
    rng = world.rng("population")
    n = max(300, round(0.4 * world.cpd))
    device = _weighted(rng, n, np.array([0.45, 0.35, 0.20]))
    ua = np.empty(n, np.int64)
    for d, pool in ((DESKTOP, _DESKTOP_UAS), (MOBILE, _MOBILE_UAS), (APP, _APP_UAS)):
        rows = device == d
        ua[rows] = _ua_codes(world, rng, int(rows.sum()), pool)

    # Households: ~1.3 users per residential address.
    homes = world.ips.add(_random_ips(rng, max(2, round(n / 1.3)), _RESIDENTIAL))
    home_ip = homes[rng.integers(len(homes), size=n)]
    # Offices: a quarter of desktop users sit behind an office NAT, offices of very
    # different sizes (a few big ones put hundreds of users on one address).
    n_offices = max(2, round(n * 0.45 * 0.25 / 25))
    offices = world.ips.add(_random_ips(rng, n_offices, _RESIDENTIAL))
    office_ip = np.full(n, -1, np.int64)
    has_office = (device == DESKTOP) & (rng.random(n) < 0.25)
    office_ip[has_office] = offices[
        _weighted(rng, int(has_office.sum()), rng.pareto(1.2, n_offices) + 1)
    ]
    # Carriers: few CGNAT gateways for very many subscribers.
    per_carrier = max(4, round(60 * world.scale))
    carrier_ips = [world.ips.add(_random_ips(rng, per_carrier, pref)) for pref in _CARRIERS]
    carrier = _weighted(rng, n, _CARRIER_SHARE)
    activity = rng.lognormal(0.0, 1.0, n)

    # Customers: most app users, fewer web users; some customers have a second device.
    cust_share = _PL_CUSTOMER_SHARE if world.proxy_lies else np.array([0.38, 0.30, 0.85])
    is_cust = rng.random(n) < cust_share[device]
    cust = np.full(n, -1, np.int64)
    cust_user = np.flatnonzero(is_cust)
    n_cust = len(cust_user)
    cust[cust_user] = np.arange(n_cust)
    second = (~is_cust) & (rng.random(n) < 0.08)
    cust[second] = rng.integers(n_cust, size=int(second.sum()))
    # Purchase frequency: log-normal, median 1.5 per 180 days, a long tail of heavy buyers.
    cust_lambda = rng.lognormal(np.log(1.5), 1.2, n_cust)
    cust_amount = rng.normal(0.0, 0.5, n_cust)
    ids = rng.choice(900_000_000, n_cust, replace=False) + 100_000_000
    customer_ids = [f"C{v}" for v in ids.tolist()]
    # Frequent buyers also convert more on ads; guests convert least.
    buy_mult = np.full(n, 0.5)
    has_cust = cust >= 0
    buy_mult[has_cust] = np.clip(np.sqrt(cust_lambda[cust[has_cust]] / 1.5), 0.3, 4.0)
    comparer = np.zeros(n, bool)
    if world.proxy_lies:
        # Guests never buy here; a few web guests only ever compare offers.
        buy_mult[~has_cust] = 0.0
        web_guest = ~has_cust & (device != APP)
        comparer = web_guest & (world.rng("comparers").random(n) < _PL_COMPARERS)

    return _Population(
        n_users=n,
        user=world.users.new(rng, n),
        device=device,
        ua=ua,
        home_ip=home_ip,
        office_ip=office_ip,
        carrier=carrier,
        carrier_ips=carrier_ips,
        activity=activity,
        cust=cust,
        buy_mult=buy_mult,
        customer_ids=customer_ids,
        cust_lambda=cust_lambda,
        cust_amount=cust_amount,
        cust_user=cust_user,
        comparer=comparer,
    )


@dataclass
class _Ads:
    advertiser: np.ndarray  # advertiser index of each ad
    category: np.ndarray  # product category of each ad (that of its advertiser)
    popularity: np.ndarray  # human click weight (Zipf)
    adv_start: np.ndarray  # ads are grouped by advertiser: first ad of each advertiser
    adv_count: np.ndarray
    ad_ids: list[str]
    advertiser_ids: list[str]


def _make_ads(world: _World) -> _Ads:
    rng = world.rng("ads")
    # Advertisers differ in size (number of ads) and each sells one category.
    adv_size = rng.pareto(1.5, N_ADVERTISERS) + 1
    adv_count = np.maximum(1, np.floor(adv_size / adv_size.sum() * (N_ADS - N_ADVERTISERS)) + 1)
    adv_count = adv_count.astype(np.int64)
    adv_count[0] += N_ADS - adv_count.sum()  # exact total
    adv_start = np.cumsum(adv_count) - adv_count
    advertiser = np.repeat(np.arange(N_ADVERTISERS), adv_count)
    adv_category = rng.integers(len(_CATEGORIES), size=N_ADVERTISERS)
    # Zipf over a random ranking, so popular ads are spread over advertisers.
    rank = rng.permutation(N_ADS) + 1
    popularity = 1.0 / rank**1.05
    # Numbering is shuffled too: ad numbers carry no information about advertisers.
    ad_numbers = rng.choice(90_000, N_ADS, replace=False) + 10_000
    adv_numbers = rng.choice(9_000, N_ADVERTISERS, replace=False) + 1_000
    return _Ads(
        advertiser=advertiser,
        category=adv_category[advertiser],
        popularity=popularity,
        adv_start=adv_start,
        adv_count=adv_count,
        ad_ids=[f"ad-{v}" for v in ad_numbers.tolist()],
        advertiser_ids=[f"adv-{v}" for v in adv_numbers.tolist()],
    )


def _ads_of(rng: np.random.Generator, ads: _Ads, advertisers: np.ndarray) -> np.ndarray:
    """One ad per row, uniformly among the ads of that row's advertiser."""
    return ads.adv_start[advertisers] + (
        rng.random(len(advertisers)) * ads.adv_count[advertisers]
    ).astype(np.int64)


# ======================================================================================
# Humans
# ======================================================================================
def _session_ips(
    world: _World,
    rng: np.random.Generator,
    pop: _Population,
    s_user: np.ndarray,
    starts: np.ndarray,
) -> np.ndarray:
    """IP code of each human session: office NAT on weekday working hours, carrier CGNAT
    for most phone sessions, the home address otherwise."""
    hour = ((starts - world.t0) % DAY) // HOUR
    weekday = ((world.dow0 + (starts - world.t0) // DAY) % 7) < 5
    s_ip = pop.home_ip[s_user].copy()
    at_office = (pop.office_ip[s_user] >= 0) & weekday & (hour >= 8) & (hour < 18)
    s_ip[at_office] = pop.office_ip[s_user[at_office]]
    on_carrier = (pop.device[s_user] != DESKTOP) & (rng.random(len(starts)) < 0.6)
    for c, gateways in enumerate(pop.carrier_ips):
        rows = on_carrier & (pop.carrier[s_user] == c)
        s_ip[rows] = gateways[rng.integers(len(gateways), size=int(rows.sum()))]
    return s_ip


def _gen_humans(
    world: _World, pop: _Population, ads: _Ads, clicks: _Clicks, per_day: np.ndarray
) -> None:
    rng = world.rng("humans")
    mean_size = 1 / 0.42  # geometric
    n_sess = np.round(per_day / mean_size).astype(np.int64)
    starts = _diurnal_starts(world, rng, n_sess, _WEEKDAY_HOURS, _WEEKEND_HOURS)
    s_user = _weighted(rng, len(starts), pop.activity)
    sizes = np.minimum(rng.geometric(0.42, len(starts)), 30)
    s_ip = _session_ips(world, rng, pop, s_user, starts)
    s_dev = pop.device[s_user]
    # Customers sign in on most app sessions, on about half of web sessions.
    s_cust = pop.cust[s_user]
    sign_in = _PL_SIGN_IN if world.proxy_lies else np.array([0.55, 0.45, 0.90])
    s_logged = (s_cust >= 0) & (rng.random(len(starts)) < sign_in[s_dev])
    if world.proxy_lies:
        # An app stays signed in or out: the choice is the user's, not the session's.
        app_signed_in = world.rng("app_sign_in").random(pop.n_users) < _PL_SIGN_IN[APP]
        app = s_dev == APP
        s_logged[app] = (s_cust[app] >= 0) & app_signed_in[s_user[app]]
    s_pub = np.where(
        s_dev == APP,
        _N_WEB + _weighted(rng, len(starts), 1.0 / np.arange(1, len(_APP_PUBLISHERS) + 1)),
        _weighted(rng, len(starts), 1.0 / np.arange(1, _N_WEB + 1) ** 0.9),
    )
    s_id = world.sessions.new(rng, len(starts))

    # Reading, comparing, coming back: seconds to minutes between ad clicks.
    sess, ts = _expand_sessions(rng, starts, sizes, lambda n: rng.lognormal(np.log(40), 1.1, n))
    dev = s_dev[sess]
    clicks.add(
        "human",
        ts,
        world.t0,
        world.end,
        user=pop.user[s_user[sess]],
        ip=s_ip[sess],
        session=s_id[sess],
        ua=pop.ua[s_user[sess]],
        logged_in=s_logged[sess],
        cust=np.where(s_logged[sess], s_cust[sess], -1),
        device=dev,
        ad=_weighted(rng, len(ts), ads.popularity),
        placement=_weighted_by_row(rng, dev, _PLACEMENT_MIX),
        publisher=s_pub[sess],
    )


def _gen_comparison_browsers(
    world: _World, pop: _Population, ads: _Ads, clicks: _Clicks, per_day: np.ndarray
) -> None:
    """proxy_lies: web guests comparing offers, 10-40 ads of one category 5-30 s apart.

    Human, fast and never buying: the weak labels call every one of these clicks robotic.
    """
    rng = world.rng("comparison")
    users = np.flatnonzero(pop.comparer)
    if len(users) == 0:
        return
    n_sess = np.maximum(1, np.round(per_day / 25.0)).astype(np.int64)
    starts = _diurnal_starts(world, rng, n_sess, _WEEKDAY_HOURS, _WEEKEND_HOURS)
    n = len(starts)
    s_user = users[_weighted(rng, n, pop.activity[users])]
    sizes = rng.integers(10, 41, size=n)
    s_ip = _session_ips(world, rng, pop, s_user, starts)
    s_pub = _weighted(rng, n, 1.0 / np.arange(1, _N_WEB + 1) ** 0.9)
    s_cat = ads.category[_weighted(rng, n, ads.popularity)]
    s_id = world.sessions.new(rng, n)
    sess, ts = _expand_sessions(rng, starts, sizes, lambda k: rng.uniform(5.0, 30.0, k))
    k = len(ts)
    # Every ad of a session is of the session's category, popular ones more often.
    ad = np.empty(k, np.int64)
    row_cat = s_cat[sess]
    for c in range(len(_CATEGORIES)):
        rows = np.flatnonzero(row_cat == c)
        pool = np.flatnonzero(ads.category == c)
        if len(rows) and len(pool):
            ad[rows] = pool[_weighted(rng, len(rows), ads.popularity[pool])]
    dev = pop.device[s_user[sess]]
    clicks.add(
        "human",
        ts,
        world.t0,
        world.end,
        user=pop.user[s_user[sess]],
        ip=s_ip[sess],
        session=s_id[sess],
        ua=pop.ua[s_user[sess]],
        device=dev,
        ad=ad,
        placement=_weighted_by_row(rng, dev, _PLACEMENT_MIX),
        publisher=s_pub[sess],
    )


def _gen_other_device_humans(
    world: _World, ads: _Ads, clicks: _Clicks, per_day: np.ndarray
) -> None:
    """proxy_lies: a handful of people on smart TVs and game consoles (device ``other``).

    Guests outside the population, signed out; they never buy.
    """
    rng = world.rng("other_device_humans")
    mean_size = 1 / 0.5  # geometric
    n_sess = np.maximum(1, np.round(per_day / mean_size)).astype(np.int64)
    starts = _diurnal_starts(world, rng, n_sess, _WEEKDAY_HOURS, _WEEKEND_HOURS)
    n = len(starts)
    n_users = max(3, round(n / 6))
    u_user = world.users.new(rng, n_users)
    u_ip = world.ips.add(_random_ips(rng, n_users, _RESIDENTIAL))
    u_ua = _ua_codes(world, rng, n_users, _OTHER_DEVICE_UAS)
    s_u = rng.integers(n_users, size=n)
    s_id = world.sessions.new(rng, n)
    s_pub = _weighted(rng, n, 1.0 / np.arange(1, _N_WEB + 1) ** 0.9)
    sizes = np.minimum(rng.geometric(0.5, n), 10)
    sess, ts = _expand_sessions(rng, starts, sizes, lambda k: rng.lognormal(np.log(60), 1.0, k))
    k = len(ts)
    u = s_u[sess]
    clicks.add(
        "human",
        ts,
        world.t0,
        world.end,
        user=u_user[u],
        ip=u_ip[u],
        session=s_id[sess],
        ua=u_ua[u],
        device=OTHER,
        ad=_weighted(rng, k, ads.popularity),
        placement=_weighted(rng, k, _PLACEMENT_MIX[OTHER]),
        publisher=s_pub[sess],
    )


def _human_segments(pop: _Population, cols: dict[str, np.ndarray]) -> dict[str, int]:
    """proxy_lies: clicks of the human segments that never buy."""
    human = cols["kind"] == _K["human"]
    inside, u = pop.members(cols["user"])
    comparer = human & inside & pop.comparer[u]
    return {
        "comparison_browser": int(comparer.sum()),
        "guest": int((human & inside & (pop.cust[u] < 0) & ~comparer).sum()),
        "other_device": int((human & (cols["device"] == OTHER)).sum()),
    }


# ======================================================================================
# Robots
# ======================================================================================
def _gen_burst(world: _World, pop: _Population, ads: _Ads, clicks: _Clicks, budget: float) -> None:
    """Competitor click-spam: one identity, one advertiser, tens to hundreds of clicks fast."""
    rng = world.rng("burst")
    sizes = _units_for_budget(rng, budget, _lognormal_sizes(rng, 60, 0.8, 15, 500), 80)
    n = len(sizes)
    starts = world.t0 + rng.random(n) * (world.days * DAY)
    # A few operators reuse their identities over several bursts.
    n_ident = max(1, n // 3)
    i_user = world.users.new(rng, n_ident)
    i_ip = np.where(
        rng.random(n_ident) < 0.6,
        world.ips.add(_random_ips(rng, n_ident, _DATACENTER)),
        world.ips.add(_random_ips(rng, n_ident, _RESIDENTIAL)),
    )
    i_dev = np.where(rng.random(n_ident) < 0.8, DESKTOP, MOBILE)
    i_ua = np.where(
        i_dev == DESKTOP,
        _ua_codes(world, rng, n_ident, _DESKTOP_UAS),
        _ua_codes(world, rng, n_ident, _MOBILE_UAS),
    )
    b_ident = rng.integers(n_ident, size=n)
    # Targets: big spenders are the usual victims.
    b_adv = _weighted(rng, n, np.sqrt(ads.adv_count.astype(float)))
    b_pub = rng.integers(_N_WEB, size=n)
    b_sess = world.sessions.new(rng, n)
    sess, ts = _expand_sessions(rng, starts, sizes, _exp_gaps(rng, 1.2, 0.15))
    ident = b_ident[sess]
    clicks.add(
        "burst",
        ts,
        world.t0,
        world.end,
        user=i_user[ident],
        ip=i_ip[ident],
        session=b_sess[sess],
        ua=i_ua[ident],
        device=i_dev[ident],
        ad=_ads_of(rng, ads, b_adv[sess]),
        placement=np.where((i_dev[ident] == MOBILE) | (rng.random(len(ts)) < 0.7), 0, 1),
        publisher=b_pub[sess],
    )


def _gen_low_slow(
    world: _World, pop: _Population, ads: _Ads, clicks: _Clicks, budget: float
) -> None:
    """Steady all-day clickers: regular gaps, no diurnal rhythm, stable identity."""
    rng = world.rng("low_slow")
    per_day = budget / world.days
    n = max(2, round(per_day / 300))
    rate = per_day / n * rng.uniform(0.6, 1.4, n)  # clicks per day per identity
    mean_gap = DAY / rate
    m = int(np.ceil((world.days * rate).max() * 1.3)) + 8
    # Gamma gaps with shape 8: a metronome with a little jitter.
    gaps = rng.gamma(8.0, 1.0, (n, m)) * (mean_gap[:, None] / 8.0)
    gaps[:, 0] = rng.random(n) * mean_gap  # random phase
    ts_m = world.t0 + np.cumsum(gaps, axis=1)
    ident = np.repeat(np.arange(n), m)
    ts = ts_m.ravel()

    i_user = world.users.new(rng, n)
    i_ip = np.where(
        rng.random(n) < 0.5,
        world.ips.add(_random_ips(rng, n, _DATACENTER)),
        world.ips.add(_random_ips(rng, n, _RESIDENTIAL)),
    )
    i_dev = np.where(rng.random(n) < 0.7, DESKTOP, MOBILE)
    i_ua = np.where(
        i_dev == DESKTOP,
        _ua_codes(world, rng, n, _DESKTOP_UAS),
        _ua_codes(world, rng, n, _MOBILE_UAS),
    )
    # The cookie persists; the session rotates once a day.
    day = np.clip(((ts - world.t0) // DAY).astype(np.int64), 0, world.days - 1)
    sess_codes = world.sessions.new(rng, n * world.days)
    dev = i_dev[ident]
    clicks.add(
        "low_slow",
        ts,
        world.t0,
        world.end,
        user=i_user[ident],
        ip=i_ip[ident],
        session=sess_codes[ident * world.days + day],
        ua=i_ua[ident],
        device=dev,
        ad=rng.integers(N_ADS, size=len(ts)),
        placement=_weighted_by_row(rng, dev, _PLACEMENT_MIX),
        publisher=rng.integers(_N_WEB, size=len(ts)),
    )


def _gen_proxy_rotator(
    world: _World, pop: _Population, ads: _Ads, clicks: _Clicks, budget: float
) -> None:
    """Residential proxy botnet: a fresh identity every 2-5 clicks, few targets."""
    rng = world.rng("proxy_rotator")
    sizes = _units_for_budget(rng, budget, lambda k: rng.integers(2, 6, size=k), 3.5)
    n = len(sizes)
    # Two campaigns, each on three advertisers, cashed out through three publishers.
    targets = rng.choice(N_ADVERTISERS, (2, 3), replace=False)
    outlets = rng.choice(_N_WEB, (2, 3), replace=False)
    camp = rng.integers(2, size=n)
    starts = world.t0 + rng.random(n) * (world.days * DAY)
    i_user = world.users.new(rng, n)
    i_sess = world.sessions.new(rng, n)
    i_ip = world.ips.add(_random_ips(rng, n, _RESIDENTIAL))
    i_dev = np.where(rng.random(n) < 0.6, DESKTOP, MOBILE)
    i_ua = np.where(
        i_dev == DESKTOP,
        _ua_codes(world, rng, n, _DESKTOP_UAS),
        _ua_codes(world, rng, n, _MOBILE_UAS),
    )
    sess, ts = _expand_sessions(rng, starts, sizes, _exp_gaps(rng, 15.0, 2.0))
    k = len(ts)
    c = camp[sess]
    clicks.add(
        "proxy_rotator",
        ts,
        world.t0,
        world.end,
        user=i_user[sess],
        ip=i_ip[sess],
        session=i_sess[sess],
        ua=i_ua[sess],
        device=i_dev[sess],
        ad=_ads_of(rng, ads, targets[c, rng.integers(3, size=k)]),
        placement=_weighted_by_row(rng, i_dev[sess], _PLACEMENT_MIX),
        publisher=outlets[c, rng.integers(3, size=k)],
    )


def _gen_hijacked(
    world: _World, pop: _Population, ads: _Ads, clicks: _Clicks, budget: float
) -> None:
    """Stolen customer accounts worked from data centres, mostly at night."""
    rng = world.rng("hijacked")
    sizes = _units_for_budget(rng, budget, _lognormal_sizes(rng, 35, 0.6, 8, 300), 42)
    n = len(sizes)
    per_day = np.bincount(rng.integers(world.days, size=n), minlength=world.days)
    starts = _diurnal_starts(world, rng, per_day, _NIGHT_HOURS, _NIGHT_HOURS)
    # Accounts: one in five picked by purchase frequency (active buyers, whose RFM score
    # vouches for them: the weak labels call these clicks human), the rest at random,
    # mostly dormant accounts, the usual prey of credential stuffing.
    n_acc = max(2, n // 2)
    n_cust = len(pop.cust_lambda)
    heavy = _weighted(rng, n_acc, pop.cust_lambda)
    anyone = rng.integers(n_cust, size=n_acc)
    acc_cust = np.where(np.arange(n_acc) % 5 == 0, heavy, anyone)
    acc_user = world.users.new(rng, n_acc)  # the attacker's device, not the owner's
    acc_ua = _ua_codes(world, rng, n_acc, _DESKTOP_UAS)
    s_acc = rng.integers(n_acc, size=n)
    s_ip = world.ips.add(_random_ips(rng, n, _DATACENTER))
    s_id = world.sessions.new(rng, n)
    sess, ts = _expand_sessions(rng, starts, sizes, _exp_gaps(rng, 20.0, 1.0))
    k = len(ts)
    a = s_acc[sess]
    clicks.add(
        "hijacked",
        ts,
        world.t0,
        world.end,
        user=acc_user[a],
        ip=s_ip[sess],
        session=s_id[sess],
        ua=acc_ua[a],
        logged_in=True,
        cust=acc_cust[a],
        device=DESKTOP,
        ad=rng.integers(N_ADS, size=k),
        placement=_weighted(rng, k, _PLACEMENT_MIX[DESKTOP]),
        publisher=rng.integers(_N_WEB, size=k),
    )


def _gen_crawler(
    world: _World, pop: _Population, ads: _Ads, clicks: _Clicks, budget: float
) -> None:
    """Declared crawlers following ad links; cookieless, so a new user_id per visit."""
    rng = world.rng("crawler")
    sizes = _units_for_budget(rng, budget, _lognormal_sizes(rng, 12, 0.7, 3, 200), 15)
    n = len(sizes)
    fam = _weighted(rng, n, np.array([w for w, _, _ in _CRAWLERS]))
    s_ua = np.empty(n, np.int64)
    s_ip = np.empty(n, np.int64)
    for f, (_, uas, prefixes) in enumerate(_CRAWLERS):
        rows = fam == f
        k = int(rows.sum())
        s_ua[rows] = world.uas.add(uas)[rng.integers(len(uas), size=k)]
        s_ip[rows] = world.ips.add(_random_ips(rng, k, prefixes))
    starts = world.t0 + rng.random(n) * (world.days * DAY)
    s_user = world.users.new(rng, n)
    s_id = world.sessions.new(rng, n)
    sess, ts = _expand_sessions(rng, starts, sizes, _exp_gaps(rng, 4.0, 0.5))
    k = len(ts)
    clicks.add(
        "crawler",
        ts,
        world.t0,
        world.end,
        user=s_user[sess],
        ip=s_ip[sess],
        session=s_id[sess],
        ua=s_ua[sess],
        device=DESKTOP,
        ad=rng.integers(N_ADS, size=k),
        placement=np.where(rng.random(k) < 0.5, 2, 3),
        publisher=rng.integers(_N_WEB, size=k),
    )


def _gen_datacenter(
    world: _World, pop: _Population, ads: _Ads, clicks: _Clicks, budget: float
) -> None:
    """Scripted browsers in the cloud: normal (or headless) desktop UAs, moderate velocity."""
    rng = world.rng("datacenter")
    sizes = _units_for_budget(rng, budget, _lognormal_sizes(rng, 14, 0.6, 4, 150), 17)
    n = len(sizes)
    n_ident = max(2, n // 3)
    i_user = world.users.new(rng, n_ident)
    i_ip = world.ips.add(_random_ips(rng, n_ident, _DATACENTER))
    i_ua = np.where(
        rng.random(n_ident) < 0.3,
        _ua_codes(world, rng, n_ident, _HEADLESS_UAS),
        _ua_codes(world, rng, n_ident, _DESKTOP_UAS),
    )
    s_ident = rng.integers(n_ident, size=n)
    starts = world.t0 + rng.random(n) * (world.days * DAY)
    s_id = world.sessions.new(rng, n)
    sess, ts = _expand_sessions(rng, starts, sizes, _exp_gaps(rng, 7.0, 1.0))
    k = len(ts)
    i = s_ident[sess]
    clicks.add(
        "datacenter",
        ts,
        world.t0,
        world.end,
        user=i_user[i],
        ip=i_ip[i],
        session=s_id[sess],
        ua=i_ua[i],
        device=DESKTOP,
        ad=_weighted(rng, k, ads.popularity),  # they copy what humans click
        placement=_weighted(rng, k, _PLACEMENT_MIX[DESKTOP]),
        publisher=rng.integers(_N_WEB, size=k),
    )


def _gen_mimic(
    world: _World, pop: _Population, ads: _Ads, clicks: _Clicks, per_day: float, first_day: int
) -> None:
    """Drift: an app-farm that copies human timing and hides behind carrier CGNAT."""
    rng = world.rng("mimic")
    n_days = world.days - first_day
    sizes = _units_for_budget(rng, per_day * n_days, _lognormal_sizes(rng, 14, 0.5, 5, 60), 16)
    n = len(sizes)
    day_counts = np.bincount(first_day + rng.integers(n_days, size=n), minlength=world.days)
    starts = _diurnal_starts(world, rng, day_counts, _WEEKDAY_HOURS, _WEEKEND_HOURS)
    n_ident = max(2, n // 2)
    i_user = world.users.new(rng, n_ident)
    i_ua = _ua_codes(world, rng, n_ident, _APP_UAS)
    s_ident = rng.integers(n_ident, size=n)
    # Same gateways as real phone users.
    gateways = np.concatenate(pop.carrier_ips)
    s_ip = gateways[rng.integers(len(gateways), size=n)]
    s_id = world.sessions.new(rng, n)
    targets = rng.choice(N_ADVERTISERS, 4, replace=False)
    sess, ts = _expand_sessions(rng, starts, sizes, _exp_gaps(rng, 9.0, 1.0))
    k = len(ts)
    i = s_ident[sess]
    clicks.add(
        "mimic",
        ts,
        world.t0 + first_day * DAY,
        world.end,
        user=i_user[i],
        ip=s_ip[sess],
        session=s_id[sess],
        ua=i_ua[i],
        device=APP,
        ad=_ads_of(rng, ads, targets[rng.integers(4, size=k)]),
        placement=_weighted(rng, k, _PLACEMENT_MIX[APP]),
        publisher=_N_WEB + rng.integers(len(_APP_PUBLISHERS), size=k),
    )


def _gen_infected_pc(
    world: _World, pop: _Population, ads: _Ads, clicks: _Clicks, budget: float
) -> None:
    """proxy_lies: ad-fraud malware on home computers, clicking while the machine is in use.

    A hidden browser with a cookie of its own, but the owner's address and browser UA; short
    sessions whose start hours follow the human profile, on a few advertisers' ads, cashed
    out through a few publishers.
    """
    rng = world.rng("infected_pc")
    sizes = _units_for_budget(rng, budget, _lognormal_sizes(rng, 6, 0.6, 2, 40), 7)
    n = len(sizes)
    per_day = np.bincount(rng.integers(world.days, size=n), minlength=world.days)
    starts = _diurnal_starts(world, rng, per_day, _WEEKDAY_HOURS, _WEEKEND_HOURS)
    desktops = np.flatnonzero(pop.device == DESKTOP)
    n_host = max(2, n // 4)
    host = desktops[rng.integers(len(desktops), size=n_host)]
    h_user = world.users.new(rng, n_host)
    s_host = rng.integers(n_host, size=n)
    s_id = world.sessions.new(rng, n)
    targets = rng.choice(N_ADVERTISERS, 6, replace=False)
    outlets = rng.choice(_N_WEB, 4, replace=False)
    sess, ts = _expand_sessions(rng, starts, sizes, _exp_gaps(rng, 25.0, 2.0))
    k = len(ts)
    h = s_host[sess]
    clicks.add(
        "infected_pc",
        ts,
        world.t0,
        world.end,
        user=h_user[h],
        ip=pop.home_ip[host[h]],
        session=s_id[sess],
        ua=pop.ua[host[h]],
        device=DESKTOP,
        ad=_ads_of(rng, ads, targets[rng.integers(6, size=k)]),
        placement=_weighted(rng, k, _PLACEMENT_MIX[DESKTOP]),
        publisher=outlets[rng.integers(4, size=k)],
    )


def _gen_script(world: _World, pop: _Population, ads: _Ads, clicks: _Clicks, budget: float) -> None:
    """proxy_lies: bare HTTP clients (or no User-Agent at all) from cloud IPs, device other.

    Cookieless (a new user_id per run), flat in time, fast, ads uniformly at random.
    """
    rng = world.rng("script")
    sizes = _units_for_budget(rng, budget, _lognormal_sizes(rng, 20, 0.9, 3, 300), 28)
    n = len(sizes)
    n_ident = max(2, n // 3)  # an operator's script keeps its host and agent over runs
    i_ip = world.ips.add(_random_ips(rng, n_ident, _DATACENTER))
    i_ua = _ua_codes(world, rng, n_ident, _SCRIPT_UAS)
    s_ident = rng.integers(n_ident, size=n)
    starts = world.t0 + rng.random(n) * (world.days * DAY)
    s_user = world.users.new(rng, n)
    s_id = world.sessions.new(rng, n)
    sess, ts = _expand_sessions(rng, starts, sizes, _exp_gaps(rng, 4.0, 0.2))
    k = len(ts)
    i = s_ident[sess]
    clicks.add(
        "script",
        ts,
        world.t0,
        world.end,
        user=s_user[sess],
        ip=i_ip[i],
        session=s_id[sess],
        ua=i_ua[i],
        device=OTHER,
        ad=rng.integers(N_ADS, size=k),
        placement=_weighted(rng, k, _PLACEMENT_MIX[OTHER]),
        publisher=rng.integers(_N_WEB, size=k),
    )


# ======================================================================================
# Purchases
# ======================================================================================
def _gen_purchases(
    world: _World,
    pop: _Population,
    cols: dict[str, np.ndarray],
    rank: np.ndarray,
    click_ids: pa.Array,
) -> pa.Table:
    """In-window purchases after human clicks, organic purchases, and the history."""
    rng = world.rng("purchases")
    # Human rows of population users (proxy_lies' smart-TV visitors are not: they never buy)
    # and their population index.
    human = np.flatnonzero(cols["kind"] == _K["human"])
    inside, u = pop.members(cols["user"][human])
    human, u = human[inside], u[inside]
    logged_in = cols["logged_in"][human]
    if world.proxy_lies:
        # Signed-out customers rarely buy, guests (buy_mult 0) and comparers never do.
        signed_in = _PL_BUY_SIGNED_IN[cols["device"][human]]  # population devices: no "other"
        p_buy = np.where(logged_in, signed_in, _PL_BUY_SIGNED_OUT) * pop.buy_mult[u]
        p_buy[pop.comparer[u]] = 0.0
    else:
        p_buy = np.where(logged_in, 0.04, 0.015) * pop.buy_mult[u]
    bought = rng.random(len(human)) < p_buy
    buyer, bu = human[bought], u[bought]
    c_ts = cols["ts"][buyer] + 30.0 + rng.exponential(2 * HOUR, len(buyer))
    # With organic purchases (always without click_id) about half of all in-window
    # purchases carry the attributed click_id.
    c_click = np.where(rng.random(len(buyer)) < 0.6, rank[buyer], -1)
    c_cust = pop.cust[bu]  # guests (-1) check out without an account

    # Organic purchases: customers buying without an ad click, at human hours.
    n_org = max(1, round(0.2 * len(buyer)))
    o_cust = _weighted(rng, n_org, pop.cust_lambda)
    per_day = np.bincount(rng.integers(world.days, size=n_org), minlength=world.days)
    o_ts = _diurnal_starts(world, rng, per_day, _WEEKDAY_HOURS, _WEEKEND_HOURS)

    # History: Poisson(lambda) purchases per customer over the 180 days before the run.
    h_n = rng.poisson(pop.cust_lambda)
    h_cust = np.repeat(np.arange(len(h_n)), h_n)
    h_day = rng.integers(-HISTORY_DAYS, 0, size=len(h_cust))
    h_ts = (
        world.t0
        + h_day * DAY
        + (_weighted(rng, len(h_cust), _WEEKDAY_HOURS) + rng.random(len(h_cust))) * HOUR
    )

    user = np.concatenate([bu, pop.cust_user[o_cust], pop.cust_user[h_cust]])
    cust = np.concatenate([c_cust, o_cust, h_cust])
    ts = np.round(np.concatenate([c_ts, o_ts, h_ts]), 3)
    click = np.concatenate([c_click, np.full(n_org + len(h_cust), -1)])
    # Basket size: log-normal, customers have their own typical spend.
    offset = np.where(cust >= 0, pop.cust_amount[np.maximum(cust, 0)], 0.0)
    amount = np.round(np.exp(np.log(35.0) + offset + rng.normal(0.0, 0.8, len(ts))), 2)

    keep = ts < world.end  # purchases after the run are not observed yet
    order = np.flatnonzero(keep)[np.argsort(ts[keep], kind="stable")]
    user_ids = world.users.arrow()
    cust_ids = pa.array(pop.customer_ids, pa.string())
    cust_o = cust[order]
    click_o = click[order]
    width = max(8, len(str(len(order))))
    return pa.table(
        {
            "purchase_id": pa.array([f"p{i:0{width}d}" for i in range(len(order))], pa.string()),
            "ts": pa.array(ts[order], pa.float64()),
            "user_id": user_ids.take(pa.array(pop.user[user[order]])),
            "customer_id": cust_ids.take(pa.array(np.maximum(cust_o, 0), mask=cust_o < 0)),
            "click_id": click_ids.take(pa.array(np.maximum(click_o, 0), mask=click_o < 0)),
            "amount": pa.array(amount[order], pa.float64()),
        }
    )


# ======================================================================================
# Output
# ======================================================================================
def _query_pool() -> tuple[list[str], np.ndarray]:
    """All queries, grouped by category (10 terms x forms each); returns (pool, form weights)."""
    pool = [
        form.format(term)
        for terms in _CATEGORIES.values()
        for term in terms
        for form, _ in _QUERY_FORMS
    ]
    return pool, np.array([w for _, w in _QUERY_FORMS])


def _clicks_table(
    world: _World,
    pop: _Population,
    ads: _Ads,
    cols: dict[str, np.ndarray],
    order: np.ndarray,
    click_ids: pa.Array,
) -> pa.Table:
    c = {name: v[order] for name, v in cols.items()}
    n = len(order)
    # Queries: only on search placements, a term of the ad's category in one of its forms.
    rng = world.rng("queries")
    pool, form_w = _query_pool()
    n_terms, n_forms = len(next(iter(_CATEGORIES.values()))), len(_QUERY_FORMS)
    term = ads.category[c["ad"]] * n_terms + rng.integers(n_terms, size=n)
    query = term * n_forms + _weighted(rng, n, form_w)
    is_search = np.isin(c["placement"], SEARCH_PLACEMENTS)

    def strings(
        values: Sequence[str] | pa.Array, codes: np.ndarray, mask: np.ndarray | None = None
    ) -> pa.Array:
        arr = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
        return arr.take(pa.array(codes, mask=mask))

    cust = c["cust"]
    return pa.table(
        {
            "click_id": click_ids,
            "ts": pa.array(c["ts"], pa.float64()),
            "user_id": strings(world.users.arrow(), c["user"]),
            "ip": strings(world.ips.arrow(), c["ip"]),
            "session_id": strings(world.sessions.arrow(), c["session"]),
            "user_agent": strings(world.uas.arrow(), c["ua"]),
            "logged_in": pa.array(c["logged_in"], pa.bool_()),
            "customer_id": strings(pop.customer_ids, np.maximum(cust, 0), cust < 0),
            "device": strings(DEVICES, c["device"]),
            "ad_id": strings(ads.ad_ids, c["ad"]),
            "advertiser_id": strings(ads.advertiser_ids, ads.advertiser[c["ad"]]),
            "placement": strings(PLACEMENTS, c["placement"]),
            "query": strings(pool, query, ~is_search),
            "context": pa.StructArray.from_arrays(
                [
                    strings(_PUBLISHERS, c["publisher"]),
                    strings(_CHANNELS, _PUBLISHER_CHANNEL[c["publisher"]]),
                ],
                names=["publisher", "channel"],
            ),
            "is_bot": pa.array(c["kind"] != _K["human"], pa.bool_()),
            "bot_kind": strings(KINDS, c["kind"]),
        }
    )


def _write(table: pa.Table, path: Path) -> None:
    # Write beside the target and rename, so a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
