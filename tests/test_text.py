"""Text normalization and segmentation (companion.text)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from companion.text import estimate_seconds, normalize, prepare, segment_text, split_sentences
from companion.text.numbers import cardinal, ordinal, year

CASES = [
    # numbers
    ("I have 42 apples.", "I have forty-two apples."),
    ("There were 1,234 people.", "There were one thousand two hundred thirty-four people."),
    ("Pi is 3.14.", "Pi is three point one four."),
    ("It was -5 outside.", "It was minus five outside."),
    ("Down -3%.", "Down minus three percent."),
    ("It fell to -3°C.", "It fell to minus three degrees Celsius."),
    ("The balance is -$3.", "The balance is minus three dollars."),
    ("A change of -2.5 kg.", "A change of minus two point five kilograms."),
    ("Agent 007 reporting.", "Agent zero zero seven reporting."),
    ("Version 3.2.1 is out.", "Version three point two point one is out."),
    ("We counted 1000000 stars.", "We counted one million stars."),
    # years
    ("Born in 1999.", "Born in nineteen ninety-nine."),
    ("Back in 1905.", "Back in nineteen oh five."),
    ("Since 2005.", "Since two thousand five."),
    ("The 1990-1995 era.", "The nineteen ninety to nineteen ninety-five era."),
    # times
    ("Meet me at 10:30.", "Meet me at ten thirty."),
    ("Meet me at 9:05 PM.", "Meet me at nine oh five P M."),
    ("Lunch at 12:00.", "Lunch at twelve o'clock."),
    ("Wake up at 7am.", "Wake up at seven A M."),
    ("The train leaves at 14:00.", "The train leaves at fourteen hundred."),
    # dates
    ("Due 2024-03-15.", "Due March fifteenth, twenty twenty-four."),
    ("Due 03/15/2024.", "Due March fifteenth, twenty twenty-four."),
    ("Due 15/03/2024.", "Due March fifteenth, twenty twenty-four."),
    ("On March 5, 2024 we met.", "On March fifth, twenty twenty-four we met."),
    ("On the 5th of May we met.", "On the fifth of May we met."),
    ("By 5th of May.", "By the fifth of May."),
    ("From Jan. 3 onward.", "From January third onward."),
    # money
    ("It costs $5.", "It costs five dollars."),
    ("It costs $1.", "It costs one dollar."),
    ("It costs $3.50.", "It costs three dollars and fifty cents."),
    ("It costs $0.99.", "It costs ninety-nine cents."),
    ("It costs €20.", "It costs twenty euros."),
    ("It costs £1.01.", "It costs one pound and one penny."),
    ("Raised $2.5 million.", "Raised two point five million dollars."),
    ("Paid $5k.", "Paid five thousand dollars."),
    ("Paid 30 USD.", "Paid thirty dollars."),
    # percentages, ordinals, units, fractions, phone numbers, ranges
    ("Up 50% today.", "Up fifty percent today."),
    ("Down 3.5 %.", "Down three point five percent."),
    ("She came 1st, he came 22nd.", "She came first, he came twenty-second."),
    ("The 103rd time.", "The one hundred third time."),
    ("Run 5 km.", "Run five kilometers."),
    ("It is 25°C.", "It is twenty-five degrees Celsius."),
    ("Add 1/2 cup.", "Add one half cup."),
    ("Add 3/4 cup.", "Add three quarters cup."),
    ("Call 555-123-4567.", "Call five five five, one two three, four five six seven."),
    ("Read pages 5-10.", "Read pages five to ten."),
    # abbreviations
    ("Dr. Smith met Mr. Jones.", "Doctor Smith met Mister Jones."),
    ("Bring fruit, e.g. apples.", "Bring fruit, for example apples."),
    ("Apples, pears, etc. Then rest.", "Apples, pears, et cetera. Then rest."),
    ("Cats vs. dogs.", "Cats versus dogs."),
    ("St. Peter lives on Main St.", "Saint Peter lives on Main Street."),
    ("Tea w/o sugar.", "Tea without sugar."),
    ("I live in the U.S.A. now.", "I live in the U S A now."),
    ("ask mr. smith.", "ask Mister smith."),
    ("My MP3 player.", "My MP three player."),
    ("Add .5 cups.", "Add point five cups."),
    ("Room No. 5.", "Room number five."),
    # URLs, e-mails, symbols
    ("See https://example.com/docs/intro?x=1 now.", "See example dot com slash docs slash intro now."),
    ("Go to www.python.org.", "Go to python dot org."),
    ("Mail bob.smith@example.org today.", "Mail bob dot smith at example dot org today."),
    ("Salt & pepper.", "Salt and pepper."),
    ("2 + 2 = 4.", "two plus two equals four."),
    # emoji, brackets, markdown
    ("I love it 👍🏽!", "I love it!"),
    ("Great job 🎉🎉 team.", "Great job team."),
    ("The cat (a tabby) slept.", "The cat, a tabby, slept."),
    ("As shown [1], it works.", "As shown, it works."),
    ("Bring your friend(s).", "Bring your friends."),
    ("This is **very** _important_.", "This is very important."),
    ("Use `pip install` here.", "Use pip install here."),
    ("See [the docs](https://x.org/d) first.", "See the docs first."),
    ("# Shopping\n- eggs\n- milk", "Shopping. eggs. milk."),
    ("1. First step\n2. Second step", "First step. Second step."),
    ("<b>Bold</b> move.", "Bold move."),
    ("Well -- maybe.", "Well, maybe."),
    ("Wait\u2014what?", "Wait, what?"),
    ("\u201cQuoted\u201d words.", "Quoted words."),
]


@pytest.mark.parametrize(("written", "spoken"), CASES, ids=[c[0][:30] for c in CASES])
def test_normalize_table(written: str, spoken: str) -> None:
    assert normalize(written) == spoken


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 30


def test_normalized_text_has_no_digits_or_markup() -> None:
    text = "On 2024-01-02 at 10:30 I paid $3.50 (50% off) for **2** items 🙂 at https://shop.example.com/x #1"
    out = normalize(text)
    assert not re.search(r"[\d$%*#()\[\]<>{}/@]", out), out
    assert not any(ord(c) > 0x2000 for c in out), out


ODD_INPUTS = ["$", "$$5", "10:99", "99/99/9999", "2024-13-45", "%", "1st2nd", "1.2.3.4.5", "(((", "**", "__init__",
              "C++", "#1", "@", "5-", "--", "...", "?!", "\u2014", "\u20ac5.555", "$1,000,000.00", "12:30:45", "Jan 99",
              "32 March", "0:00", "25:00am", "1/0", "http://", "www.", "a@b", "No.", "St.", "1e10", "0x1F", "10^3",
              "\U0001F1FA\U0001F1F8", "\x00", "\u200b", "a\r\nb", "```\ncode\n```", "[x](", "<b", "1,23,456", "-0.5%"]


@pytest.mark.parametrize("text", ODD_INPUTS)
def test_odd_input_never_fails_and_leaves_no_digits(text: str) -> None:
    out = normalize(text)
    assert not re.search(r"\d", out), out
    assert segment_text(out, 25.0) == ([out] if out else [])


@pytest.mark.parametrize(
    ("n", "words"),
    [(0, "zero"), (13, "thirteen"), (70, "seventy"), (101, "one hundred one"), (999_999, "nine hundred ninety-nine thousand nine hundred ninety-nine"),
     (2_000_000_005, "two billion five")],
)
def test_cardinal(n: int, words: str) -> None:
    assert cardinal(n) == words


@pytest.mark.parametrize(("n", "words"), [(1, "first"), (2, "second"), (12, "twelfth"), (20, "twentieth"), (21, "twenty-first"), (100, "one hundredth")])
def test_ordinal(n: int, words: str) -> None:
    assert ordinal(n) == words


def test_year() -> None:
    assert year(1900) == "nineteen hundred"
    assert year(2024) == "twenty twenty-four"
    assert year(2000) == "two thousand"


def test_sentences_split_in_order() -> None:
    assert split_sentences("One. Two! Three? Four") == ["One.", "Two!", "Three?", "Four"]


def _long_text() -> str:
    """About 5,000 characters of mixed prose: the shipped transcripts, numbers, lists, one run-on sentence."""
    data = Path(__file__).parent / "data"
    prose = (data / "narrator.txt").read_text() + "\n\n" + (data / "guest.txt").read_text()
    run_on = " ".join(f"and then item {i} went by at {i % 12 + 1}:{i % 60:02d}" for i in range(60))
    extra = "\n- Buy 3 apples for $2.50\n- Meet Dr. Lee on 2025-06-01\n" + "It rose 12% (again). " * 10
    text = prose + "\n\n" + "A very long sentence: " + run_on + ".\n" + extra + prose
    return text[:5200]


def test_5000_characters_become_segments_under_25_s_in_order_none_lost() -> None:
    text = _long_text()
    assert len(text) >= 5000
    segments = prepare(text, 25.0)
    assert len(segments) > 5
    for seg in segments:
        assert 0 < estimate_seconds(seg) <= 25.0, seg
    # in order and nothing lost: the segments' words, joined, are exactly the normalized text's words
    assert " ".join(segments).split() == normalize(text).split()


def test_a_run_on_sentence_is_split_at_clauses_first() -> None:
    sentence = ", ".join(f"clause number {cardinal(i)} is here" for i in range(40)) + "."
    segments = segment_text(sentence, 10.0)
    assert len(segments) > 1
    assert all(s.endswith((",", ".")) for s in segments), segments  # cut after a comma, not mid-clause
    assert " ".join(segments) == sentence


def test_a_clause_too_long_is_split_between_words() -> None:
    words = " ".join(["banana"] * 200)
    segments = segment_text(words, 5.0)
    assert all(estimate_seconds(s) <= 5.0 for s in segments)
    assert " ".join(segments) == words


def test_short_text_is_one_segment_and_empty_is_none() -> None:
    assert prepare("Hello there. How are you?") == ["Hello there. How are you?"]
    assert prepare("   ") == []
    assert prepare("🎉") == []


@pytest.mark.parametrize(("typed", "spoken"), [
    ("Hi \x07\x1b[31mred\x1b[0m", "Hi red."),  # a bell and color codes pasted from a terminal
    ("\x1b]0;a title\x07Hello\x00 there\x1b[2K", "Hello there."),  # window title, NUL, erase-line
    ("Tab\tand\nnew line", "Tab and. new line."),  # tabs and line breaks are spacing, not controls
])
def test_terminal_escapes_and_control_characters_are_not_spoken(typed: str, spoken: str) -> None:
    assert normalize(typed) == spoken


# Issue 19 section 6: the readings that were wrong, and more of each class than the issue listed.
READINGS = [
    ("C# is fast.", "C sharp is fast."),
    ("I write c# and F#.", "I write C sharp and F sharp."),
    ("A# minor, then G\u266f.", "A sharp minor, then G sharp."),
    ("E\u266d major.", "E flat major."),
    ("#1 fan", "number one fan."),  # a # before a number is still "number"
    ("10^100", "ten to the power of one hundred."),
    ("2^10 bytes", "two to the power of ten bytes."),
    ("10^-3 of it", "ten to the power of minus three of it."),
    ("x^2 plus y^3", "x squared plus y cubed."),
    ("$-0.00", "zero dollars."),
    ("$-5.50", "minus five dollars and fifty cents."),
    ("\u20ac-3", "minus three euros."),
    ("-$0.50", "minus fifty cents."),
    ("13/13/2024", "thirteen slash thirteen slash twenty twenty-four."),
    ("02/30/2024", "zero two slash thirty slash twenty twenty-four."),
    ("02/29/2023", "zero two slash twenty-nine slash twenty twenty-three."),  # not a leap year
    ("02/29/2024", "February twenty-ninth, twenty twenty-four."),  # a leap year
    ("4/31/2024", "four slash thirty-one slash twenty twenty-four."),
    ("31/12/2024", "December thirty-first, twenty twenty-four."),
    ("2024-02-30", "twenty twenty-four dash zero two dash thirty."),
    ("Feb 30, 2024", "February thirty, twenty twenty-four."),
    ("31 April", "thirty-one April."),
]


@pytest.mark.parametrize(("written", "spoken"), READINGS, ids=[c[0] for c in READINGS])
def test_sharps_powers_signed_money_and_impossible_dates(written: str, spoken: str) -> None:
    assert normalize(written) == spoken
