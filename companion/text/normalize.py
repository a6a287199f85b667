"""Rewrite written text into words CSM can say: numbers, times, dates, money, URLs, markdown, emoji.

CSM reads its text through a plain BPE tokenizer and says digits, symbols and markup badly or not at
all ("gibberish on numbers, times, brackets", csm#141). ``normalize`` applies, in this order:
markdown -> HTML tags -> URLs and e-mails -> dates, times, money, percentages, units, ordinals,
phone numbers, ranges, fractions -> abbreviations -> remaining numbers -> symbols -> emoji -> brackets
-> punctuation and spacing. Each step is a small function over the whole text.

Conventions (documented in docs/session.md): ``3/4/2025`` is month/day/year unless the first number is
over 12; a date that is not on the calendar (``13/13/2024``, ``02/30/2024``) is read as numbers with
"slash" or "dash", not as a date; a four-digit number from 1100 to 2099 without a thousands comma reads
as a year; ``C#`` and the other notes A-G before ``#`` read "sharp"; ``10^100`` is "ten to the power of
one hundred" (``^2`` "squared", ``^3`` "cubed").
"""

from __future__ import annotations

import calendar
import re
import unicodedata
from collections.abc import Callable

from companion.text.numbers import cardinal, decimal, digits, ordinal, year

MONTHS = "January February March April May June July August September October November December".split()
_MONTH_ABBR = {m[:3].lower(): m for m in MONTHS}
_MONTH_RE = "(?:(?:" + "|".join(MONTHS) + r")\b|(?:" + "|".join([m[:3] for m in MONTHS] + ["Sept"]) + r")(?:\.|\b))"
_MERIDIEM = r"([AaPp])(?:\.[Mm]\.|\s?[Mm]\b)"
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"

CURRENCIES = {  # symbol -> (one, many, cent one, cent many)
    "$": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", "", ""),
    "₹": ("rupee", "rupees", "paisa", "paise"),
}
_CODES = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "INR": "₹"}
SCALE_WORDS = {"k": "thousand", "K": "thousand", "m": "million", "M": "million", "bn": "billion", "B": "billion"}

UNITS = {  # written unit -> (singular, plural)
    "km": ("kilometer", "kilometers"),
    "km/h": ("kilometer per hour", "kilometers per hour"),
    "kg": ("kilogram", "kilograms"),
    "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"),
    "mg": ("milligram", "milligrams"),
    "ml": ("milliliter", "milliliters"),
    "mph": ("mile per hour", "miles per hour"),
    "lb": ("pound", "pounds"),
    "lbs": ("pound", "pounds"),
    "oz": ("ounce", "ounces"),
    "ft": ("foot", "feet"),
    "ms": ("millisecond", "milliseconds"),
    "kB": ("kilobyte", "kilobytes"),
    "KB": ("kilobyte", "kilobytes"),
    "MB": ("megabyte", "megabytes"),
    "GB": ("gigabyte", "gigabytes"),
    "TB": ("terabyte", "terabytes"),
    "Hz": ("hertz", "hertz"),
    "kHz": ("kilohertz", "kilohertz"),
    "MHz": ("megahertz", "megahertz"),
    "GHz": ("gigahertz", "gigahertz"),
    "°C": ("degree Celsius", "degrees Celsius"),
    "°F": ("degree Fahrenheit", "degrees Fahrenheit"),
    "°": ("degree", "degrees"),
}

# Abbreviation (with its period) -> words. Titles never end a sentence; the others keep a period
# when a capitalized word follows (``... and Sons Ltd. Next ...``).
TITLES = {"Dr.": "Doctor", "Mr.": "Mister", "Mrs.": "Missus", "Ms.": "Miz", "Prof.": "Professor",
          "Sr.": "Senior", "Jr.": "Junior", "Mt.": "Mount", "Capt.": "Captain", "Gen.": "General"}
ABBREVIATIONS = {"e.g.": "for example", "i.e.": "that is", "etc.": "et cetera", "vs.": "versus",
                 "approx.": "approximately", "Inc.": "Incorporated", "Ltd.": "Limited", "Ave.": "Avenue",
                 "Dept.": "Department", "Fig.": "Figure", "a.m.": "A M", "p.m.": "P M"}
SYMBOLS = {"&": " and ", "+": " plus ", "=": " equals ", "@": " at ", "~": " about ", "×": " times ",
           "÷": " divided by ", "#": " number ", "%": " percent ", "|": ", ", "*": " ", "_": " ",
           "^": " ", "\\": " ", "/": " slash ", "<": ", ", ">": ", ", "$": " ", "€": " ", "£": " ",
           "¥": " ", "₹": " "}
_FRACTIONS = {2: ("half", "halves"), 3: ("third", "thirds"), 4: ("quarter", "quarters")}


def normalize(text: str) -> str:
    """Speakable words for ``text``; line breaks become sentence ends; the result is one line."""
    for step in STEPS:
        text = step(text)
    return text


def _sub(pattern: str, repl: Callable[[re.Match[str]], str], flags: int = 0) -> Callable[[str], str]:
    compiled = re.compile(pattern, flags)
    return lambda text: compiled.sub(repl, text)


_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colors, cursor moves (ESC [ 31 m)
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window titles, links (ESC ] ... BEL)
    r"|\x1b[@-_]?"  # any other escape
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _controls(text: str) -> str:
    """Terminal escape sequences and control characters are not text: drop them before anything reads them."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def _unicode(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).replace("\u2044", "/")
    for a, b in (("\u2018", "'"), ("\u2019", "'"), ("\u201c", '"'), ("\u201d", '"'), ("\u2212", "-"),
                 ("\u2026", "..."), ("\u00a0", " "), ("\r\n", "\n"), ("\r", "\n"), ("\t", " ")):
        text = text.replace(a, b)
    return text


def _markdown(text: str) -> str:
    text = re.sub(r"```[^\n]*\n(.*?)```", r"\1", text, flags=re.S)  # fenced code: keep the content
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"\[\d+(?:[,\u2013-]\s*\d+)*\]", "", text)  # citation marks [1], [2-4]
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)  # images: their alt text
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<((?:https?://|www\.)[^>\s]+)>", r"\1", text)  # autolinks
    text = re.sub(r"^\s*(?:[-*_]\s*){3,}$", "", text, flags=re.M)  # horizontal rules
    text = re.sub(r"^\s*\|?\s*:?-{3,}.*$", "", text, flags=re.M)  # table separator rows
    text = re.sub(r"^\s{0,3}(?:#{1,6}|>+|[-*+\u2022]|\d{1,3}[.)])\s+", "", text, flags=re.M)  # heads, quotes, lists
    for mark in (r"\*\*", "__", r"~~", r"\*"):
        text = re.sub(rf"{mark}(?=\S)(.+?)(?<=\S){mark}", r"\1", text)
    text = re.sub(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)", r"\1", text)
    return text


def _lines_to_sentences(text: str) -> str:
    """A line that does not end a sentence gets a period, so headings and list items stay apart."""
    lines = [ln.strip() for ln in text.split("\n")]
    ends = tuple('.!?:;,"\'')
    return " ".join(ln if ln.endswith(ends) else ln + "." for ln in lines if ln)


def _say_host(host: str) -> str:
    return " dot ".join(part for part in host.split(".") if part)


def _url(m: re.Match[str]) -> str:
    url = m.group(0)
    trail = re.search(r"[.,;:!?]+$", url)
    if trail:
        url = url[: trail.start()]
    url = re.sub(r"^https?://", "", url)
    url = re.sub(r"^www\.", "", url)
    url = re.split(r"[?#]", url)[0]
    host, _, path = url.partition("/")
    parts = [p for p in re.split(r"/", path) if p]
    spoken = _say_host(host)
    for p in parts:
        spoken += " slash " + re.sub(r"[-_.]+", " ", p)
    return spoken + (trail.group(0) if trail else "")


def _email(m: re.Match[str]) -> str:
    user, host = m.group(0).split("@")
    return f"{_say_host(user)} at {_say_host(host)}"


def _full_year(year_str: str | None) -> int | None:
    if not year_str:
        return None
    return int(year_str) + (2000 if len(year_str) == 2 else 0)


def _on_calendar(month: int, day: int, year_str: str | None) -> bool:
    """Whether ``month``/``day`` (of the year, when given; else of a leap year) is a real date."""
    if not 1 <= month <= 12:
        return False
    y = _full_year(year_str)
    return 1 <= day <= calendar.monthrange(y if y is not None and y >= 1 else 2024, month)[1]


def _not_a_date(parts: list[str], sep: str) -> str:
    """Numbers that look like a date but are not one: each number read, joined by ``sep``."""
    return f" {sep} ".join(_number(p) for p in parts)


def _date_words(month: int, day: int, year_str: str | None) -> str:
    words = f"{MONTHS[month - 1]} {ordinal(day)}"
    if year_str:
        y = int(year_str) + (2000 if len(year_str) == 2 else 0)
        words += f", {year(y)}"
    return words


def _iso_date(m: re.Match[str]) -> str:
    mo, d = int(m.group(2)), int(m.group(3))
    if not _on_calendar(mo, d, m.group(1)):
        return _not_a_date([m.group(1), m.group(2), m.group(3)], "dash")
    return _date_words(mo, d, m.group(1))


def _slash_date(m: re.Match[str]) -> str:
    a, b = int(m.group(1)), int(m.group(2))
    month, day = (b, a) if a > 12 else (a, b)
    if not _on_calendar(month, day, m.group(3)):
        return _not_a_date([m.group(1), m.group(2), m.group(3)], "slash")
    return _date_words(month, day, m.group(3))


def _month_day(m: re.Match[str]) -> str:
    month = _MONTH_ABBR[m.group(1)[:3].lower()]
    day = int(m.group(2))
    if not _on_calendar(MONTHS.index(month) + 1, day, m.group(3)):
        return f"{month} {cardinal(day)}" + (f", {year(int(m.group(3)))}" if m.group(3) else "")
    words = f"{month} {ordinal(day)}"
    return words + (f", {year(int(m.group(3)))}" if m.group(3) else "")


def _day_month(m: re.Match[str]) -> str:
    day = int(m.group(1))
    month = _MONTH_ABBR[m.group(2)[:3].lower()]
    if not _on_calendar(MONTHS.index(month) + 1, day, m.group(3)):
        return f"{cardinal(day)} {month}" + (f", {year(int(m.group(3)))}" if m.group(3) else "")
    the = "" if re.search(r"\bthe\s+$", m.string[: m.start()], re.I) else "the "  # "on the 5th of May"
    return f"{the}{ordinal(day)} of {month}" + (f", {year(int(m.group(3)))}" if m.group(3) else "")


def _time(m: re.Match[str]) -> str:
    hour, minute = int(m.group(1)), int(m.group(2) or 0)
    meridiem = (m.group(4) or "").lower()
    if hour > 24 or minute > 59:
        return m.group(0)
    words = cardinal(hour)
    if minute == 0:
        if not meridiem:
            words += " hundred" if hour > 12 or hour == 0 else " o'clock"
    else:
        words += (" oh " if minute < 10 else " ") + cardinal(minute)
    if m.group(3) and int(m.group(3)):
        words += f" and {cardinal(int(m.group(3)))} seconds"
    if meridiem:
        words += " A M" if meridiem.startswith("a") else " P M"
    return words + (_period_if_ends(m) if m.group(0).endswith(".") else "")


def _money_words(symbol: str, amount: str, scale: str | None) -> str:
    one, many, cent_one, cent_many = CURRENCIES[symbol]
    amount = amount.replace(",", "")
    if scale:
        return f"{decimal(amount)} {SCALE_WORDS.get(scale, scale)} {many}"
    whole, _, frac = amount.partition(".")
    if frac and (len(frac) > 2 or not cent_one):
        return f"{decimal(amount)} {many}"
    units, cents = int(whole or "0"), int(frac.ljust(2, "0")) if frac else 0
    parts = [f"{cardinal(units)} {one if units == 1 else many}"] if units or not cents else []
    if cents:
        parts.append(f"{cardinal(cents)} {cent_one if cents == 1 else cent_many}")
    return " and ".join(parts)


def _money(m: re.Match[str]) -> str:
    """``-$5``, ``$-5``: minus five dollars; a minus before zero is not read (``$-0.00``: zero dollars)."""
    negative = (m.group(1) or m.group(3)) and re.search(r"[1-9]", m.group(4))
    return _minus(negative) + _money_words(m.group(2), m.group(4), m.group(5) or m.group(6))


def _minus(sign: object) -> str:
    return "minus " if sign else ""


def _money_code(m: re.Match[str]) -> str:
    return _money_words(_CODES[m.group(2)], m.group(1), None)


def _unit(m: re.Match[str]) -> str:
    one, many = UNITS[m.group(3)]
    return f"{_minus(m.group(1))}{decimal(m.group(2))} {one if m.group(2) == '1' else many}"


def _fraction(m: re.Match[str]) -> str:
    num, den = int(m.group(1)), int(m.group(2))
    if den in _FRACTIONS:
        one, many = _FRACTIONS[den]
        return f"{cardinal(num)} {one if num == 1 else many}" if num != 1 or den != 2 else "one half"
    return f"{cardinal(num)} over {cardinal(den)}"


def _power(m: re.Match[str]) -> str:
    base = m.group(1) if m.group(1).isalpha() else _number(m.group(1))
    exponent = m.group(2).replace("\u2212", "-")
    if exponent == "2":
        return f"{base} squared"
    if exponent == "3":
        return f"{base} cubed"
    return f"{base} to the power of {decimal(exponent)}"


def _number(s: str) -> str:
    if s.isdigit() and len(s) == 4 and 1100 <= int(s) <= 2099:
        return year(int(s))
    if "." in s and s.count(".") > 1:  # a version number: 3.2.1
        return " point ".join(decimal(p) for p in s.split("."))
    return decimal(s)


def _period_if_ends(m: re.Match[str]) -> str:
    """``"."`` when the abbreviation ended its sentence (end of text, or a capital follows)."""
    return "." if re.match(r"\s*$|\s+[A-Z]", m.string[m.end():]) else ""


def _initialism(m: re.Match[str]) -> str:
    return " ".join(m.group(1).replace(".", "").upper()) + _period_if_ends(m)


def _expansion(words: str) -> Callable[[re.Match[str]], str]:
    return lambda m: words + _period_if_ends(m)


def _abbreviations(text: str) -> str:
    for abbr, words in TITLES.items():
        text = re.sub(rf"(?<![\w.]){re.escape(abbr)}", words, text, flags=re.I)
    for abbr, words in ABBREVIATIONS.items():
        text = re.sub(rf"(?<![\w.]){re.escape(abbr)}", _expansion(words), text)
    text = re.sub(r"\bNo\.\s*(?=\d)", "number ", text)
    text = re.sub(r"\bSt\.(?=\s+[A-Z])", "Saint", text)
    text = re.sub(r"\bSt\.", lambda m: "Street" + _period_if_ends(m), text)
    text = re.sub(r"\bw/o\b", "without", text)
    text = re.sub(r"\band/or\b", "and or", text)
    text = re.sub(r"(?<![\w.])((?:[A-Za-z]\.){2,})", _initialism, text)  # U.S.A. -> U S A
    text = re.sub(r"(?<!\w)w/(?=\s)", "with", text)
    return re.sub(r"\b(\w+)/(\w+)\b", lambda m: m.group(0) if m.group(0)[0].isdigit() else f"{m.group(1)} or {m.group(2)}", text)


def _symbols(text: str) -> str:
    text = re.sub(r"(?<=\w)'(?=\w)", "\u0000", text)  # keep apostrophes inside words
    for sym, words in SYMBOLS.items():
        text = text.replace(sym, words)
    text = re.sub(r"(?<!\w)-+(?=\s|$)|(?<=\s)-+(?!\w)", ", ", text)  # dashes used as pauses
    text = re.sub(r"\s*[\u2013\u2014]\s*", ", ", text)
    return text.replace("\u0000", "'")


def _emoji(text: str) -> str:
    """Drop pictographs, dingbats, flags, skin tones and the joiners that glue them."""
    keep = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("So", "Sk", "Cs", "Co", "Cn") or ch in "\u200d\ufe0e\ufe0f\u20e3":
            keep.append(" ")
        elif cat.startswith("C") and ch not in "\n":
            keep.append(" ")
        else:
            keep.append(ch)
    return "".join(keep)


def _brackets(text: str) -> str:
    text = re.sub(r"(?<=\w)\((s|es)\)", r"\1", text)  # friend(s) -> friends
    text = re.sub(r"\s*[(\[{]\s*", ", ", text)
    return re.sub(r"\s*[)\]}]\s*", ", ", text)


def _tidy(text: str) -> str:
    text = text.replace('"', " ")
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"(?<=\w)-+(?=[\s.,!?;:]|$)", "", text)  # a hyphen left dangling
    text = re.sub(r"\s+([,.!?;:])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)  # ", ," -> ","
    text = re.sub(r"[,;:]+\s*([.!?])", r"\1", text)  # ",." -> "."
    text = re.sub(r"([.!?])\s*[,;:]+", r"\1", text)  # ".," -> "."
    text = re.sub(r"\.{4,}", "...", text)
    text = re.sub(r"(?<!\.)\.\.(?!\.)", ".", text)
    text = re.sub(r"(^|[.!?]\s)\s*[,;:]\s*", r"\1", text)  # no comma at a sentence start
    text = re.sub(r"([,;:])(?=\w)", r"\1 ", text)
    text = text.strip(" ,;:")
    return text if re.search(r"\w", text) else ""


_SIGN = r"((?<![\w.])[-\u2212])?"  # a minus sign: a dash not glued to a word or number before it

STEPS: list[Callable[[str], str]] = [
    _controls,
    _unicode,
    _markdown,
    _sub(r"</?[A-Za-z][^>\n]*>", lambda m: " "),  # HTML tags
    _lines_to_sentences,
    _sub(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b", _email),
    _sub(r"\b(?:https?://|www\.)[^\s<>\"')\]]+", _url),
    _sub(r"\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|org|net|io|dev|ai|edu|gov|co\.uk|de|fr)\b(?:/[^\s<>\"')\]]*)?",
         _url, re.I),
    _sub(r"(?<![\w#])([A-Ga-g])(?:#|\u266f)(?![\w#])", lambda m: f"{m.group(1).upper()} sharp"),  # C#, F# minor
    _sub(r"(?<![\w#])([A-Ga-g])\u266d(?!\w)", lambda m: f"{m.group(1).upper()} flat"),
    _sub(r"\b(\d+(?:\.\d+)?|[A-Za-z])\s?\^\s?([-\u2212]?\d+(?:\.\d+)?)\b", _power),  # 10^100, x^2
    _sub(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b", _iso_date),
    _sub(r"\b(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})\b", _slash_date),
    _sub(rf"\b({_MONTH_RE})\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(\d{{4}})\b)?", _month_day),
    _sub(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({_MONTH_RE})(?:,?\s+(\d{{4}})\b)?", _day_month),
    _sub(rf"\b(\d{{1,2}}):(\d{{2}})(?::(\d{{2}}))?(?:\s*{_MERIDIEM})?", _time),
    _sub(rf"\b(\d{{1,2}})()()\s*{_MERIDIEM}", _time),
    _sub(rf"{_SIGN}([$€£¥₹])\s?([-\u2212])?({_NUM})(?:\s?(k|K|m|M|bn|B)\b|\s+(thousand|million|billion|trillion)\b)?", _money),
    _sub(rf"\b({_NUM})\s?(USD|EUR|GBP|JPY|INR)\b", _money_code),
    _sub(rf"{_SIGN}({_NUM})\s?%", lambda m: f"{_minus(m.group(1))}{decimal(m.group(2))} percent"),
    _sub(rf"{_SIGN}\b({_NUM})\s?({'|'.join(re.escape(u) for u in sorted(UNITS, key=len, reverse=True))})(?![\w/])", _unit),
    _sub(r"\b(\d+)(?:st|nd|rd|th)\b", lambda m: ordinal(int(m.group(1)))),
    _sub(r"\(?\b\d{3}\)?[-.\s]\d{3}[-.]\d{4}\b|\b\d{3}-\d{4}\b",
         lambda m: ", ".join(digits(g) for g in re.findall(r"\d+", m.group(0)))),
    _sub(r"\b(\d+)\s?[-\u2013]\s?(\d+)\b", lambda m: f"{_number(m.group(1))} to {_number(m.group(2))}"),
    _sub(r"\b(\d{1,2})/(\d{1,2})\b", _fraction),
    _sub(r"\b(\d+):(\d+)\b", lambda m: f"{cardinal(int(m.group(1)))} to {cardinal(int(m.group(2)))}"),
    _abbreviations,
    _sub(r"(?<![\w.])-(?=\d)", lambda m: "minus "),
    _sub(r"(?<![\w.])\.(\d+)", lambda m: "point " + digits(m.group(1))),  # .5
    _sub(r"(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])", lambda m: " "),  # MP3 -> MP 3, 3D -> 3 D
    _sub(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)+|\d+", lambda m: _number(m.group(0))),
    _symbols,
    _emoji,
    _brackets,
    _tidy,
]
