"""Numbers as English words: cardinals, ordinals, years, decimals and digit strings."""

from __future__ import annotations

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
MAX_CARDINAL = 10**15 - 1  # larger numbers are read digit by digit
_ORDINAL_IRREGULAR = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}


def _below_hundred(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    words = [f"{ONES[hundreds]} hundred"] if hundreds else []
    if rest or not hundreds:
        words.append(_below_hundred(rest))
    return " ".join(words)


def cardinal(n: int) -> str:
    """``1234`` -> ``one thousand two hundred thirty-four``; negative -> ``minus ...``."""
    if n < 0:
        return "minus " + cardinal(-n)
    if n > MAX_CARDINAL:
        return digits(str(n))
    words: list[str] = []
    for value, name in SCALES:
        if n >= value:
            count, n = divmod(n, value)
            words.append(f"{_below_thousand(count)} {name}")
    if n or not words:
        words.append(_below_thousand(n))
    return " ".join(words)


def ordinal(n: int) -> str:
    """``21`` -> ``twenty-first``; ``100`` -> ``one hundredth``."""
    words = cardinal(n)
    head, sep, last = words.rpartition(" ")
    stem, hyphen, unit = last.rpartition("-")
    if unit in _ORDINAL_IRREGULAR:
        unit = _ORDINAL_IRREGULAR[unit]
    elif unit.endswith("y"):
        unit = unit[:-1] + "ieth"
    else:
        unit += "th"
    return head + sep + stem + hyphen + unit


def year(n: int) -> str:
    """``1999`` -> ``nineteen ninety-nine``, ``1905`` -> ``nineteen oh five``, ``2005`` -> ``two thousand five``."""
    if not 1100 <= n <= 2099 or 2000 <= n <= 2009:
        return cardinal(n)
    high, low = divmod(n, 100)
    if low == 0:
        return f"{cardinal(high)} hundred"
    if low < 10:
        return f"{cardinal(high)} oh {ONES[low]}"
    return f"{cardinal(high)} {_below_hundred(low)}"


def digits(s: str) -> str:
    """Each digit as a word: ``"007"`` -> ``zero zero seven``."""
    return " ".join(ONES[int(c)] for c in s if c.isdigit())


def decimal(s: str) -> str:
    """A number written with digits, an optional ``-``, thousands commas and one decimal point."""
    s = s.replace(",", "")
    sign = ""
    if s.startswith(("-", "\u2212")):
        sign, s = "minus ", s[1:]
    whole, _, frac = s.partition(".")
    if len(whole) > 1 and whole.startswith("0"):
        words = digits(whole)
    else:
        words = cardinal(int(whole or "0"))
    if frac:
        words += " point " + digits(frac)
    return sign + words
