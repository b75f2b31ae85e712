"""Privacy helpers: scrub personal data out of free text, and pseudonymise user ids.

:func:`scrub_pii` replaces e-mail addresses with ``[email]``, card-like numbers (13 to 19 digits,
optionally grouped by spaces or dashes, passing the Luhn check) with ``[card]`` and phone numbers
with ``[phone]``, in that order, so that a card is never half-taken for a phone. It is a pure
function of its argument: precompiled patterns, bounded repetition, no exception for any ``str``.

:func:`pseudonymise` maps a user id to a stable keyed token (HMAC-SHA256): the same id and key
always give the same token, so a ``forget_user`` for an id reaches every event published for it.
"""

from __future__ import annotations

import hashlib
import hmac
import re

EMAIL_TOKEN = "[email]"
CARD_TOKEN = "[card]"
PHONE_TOKEN = "[phone]"
#: What every pseudonym starts with; 32 hex characters (128 bits of the HMAC) follow.
PSEUDONYM_PREFIX = "p-"
_PSEUDONYM_HEX = 32

# -- e-mail ------------------------------------------------------------------------------------
# The local part is RFC 5322 "atext" plus dots, at most 64 characters (which also bounds the scan
# from each start position); labels are letters, digits and hyphens; the top-level domain is
# alphabetic or an IDN in its punycode form.
_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}"
    r"@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,126}"
    r"\.(?:[Xx][Nn]--[A-Za-z0-9-]{1,59}|[A-Za-z]{2,63})"
)

# -- cards -------------------------------------------------------------------------------------
# A run of at least 13 digits with single spaces or dashes between them; which part of the run is
# a card (13..19 digits, whole groups, Luhn-valid) is decided in Python. A run right after a "+"
# is an international phone number, not a card.
_DIGIT_RUN = re.compile(r"(?<![0-9+])[0-9](?:[ -]?[0-9]){12,}")
_GROUP_SEP = re.compile(r"([ -])")
_CARD_MIN, _CARD_MAX = 13, 19
#: A run this close after "+" and a country code continues an international phone number.
_COUNTRY_CODE = re.compile(r"\+[0-9]{1,3}[ -]?$")

# -- phones ------------------------------------------------------------------------------------
# Shapes, first match wins; all need at least 7 digits (checked in Python, at most 15 as E.164):
#   +44 20 7946 0958, +1 (555) 123-4567    "+" then digits with up to two separators between
#   (555) 123-4567, (020) 7946 0958        an area code in parentheses
#   1-555-123-4567, 555.123.4567           North American 3-3-4, any of " .-"
#   020 7946 0958, 01 23 45 67 89          a trunk "0" and one separator throughout, 9+ digits
#   555-1234                               a 3-4 local number, dash only
#   5551234567, 07946095800                bare national numbers
# Not after a letter, digit, currency sign or decimal mark, and not before a digit or a decimal
# part, so years, prices, dates (2019-12-31), ranges (2019-2020) and quantities stay as they are.
_PHONE = re.compile(
    r"(?<![\w$€£¥.,/+-])"
    r"(?:"
    r"\+[0-9](?:[ .()-]{0,2}[0-9]){6,14}"
    r"|\([0-9]{2,5}\)[ .-]?[0-9]{2,4}(?:[ .-]?[0-9]{2,4}){1,2}"
    r"|(?:1[ .-])?[0-9]{3}[ .-][0-9]{3}[ .-][0-9]{4}"
    r"|0[0-9]{1,4}([ .-])[0-9]{2,8}(?:\1[0-9]{2,8}){0,3}"
    r"|[0-9]{3}-[0-9]{4}"
    r"|0[0-9]{9,10}|1?[2-9][0-9]{9}"
    r")"
    r"(?![0-9]|[.,][0-9])"
)
_PHONE_MIN, _PHONE_MAX = 7, 15
_TRUNK_MIN = 9  # digits of a "0..." number with separators (fewer are dates such as 01.02.2019)
_NOT_DIGIT = re.compile(r"[^0-9]")
_ANY_DIGIT = re.compile(r"[0-9]")


def luhn_valid(digits: str) -> bool:
    """Whether a string of ASCII digits passes the Luhn checksum (card numbers do)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_run(match: re.Match[str]) -> str:
    """A digit run with each card in it (a Luhn-valid window of whole groups) replaced."""
    if _COUNTRY_CODE.search(match.string, max(0, match.start() - 5), match.start()):
        return match.group()
    parts = _GROUP_SEP.split(match.group())
    groups, seps = parts[0::2], [*parts[1::2], ""]
    out: list[str] = []
    start = 0
    while start < len(groups):
        end = _card_end(groups, start)
        if end is None:
            out.append(groups[start] + seps[start])
            start += 1
        else:
            out.append(CARD_TOKEN + seps[end])
            start = end + 1
    return "".join(out)


def _card_end(groups: list[str], start: int) -> int | None:
    """The last group of the longest card starting at group ``start``, or None."""
    best: int | None = None
    digits = ""
    for end in range(start, len(groups)):
        digits += groups[end]
        if len(digits) > _CARD_MAX:
            break
        if len(digits) >= _CARD_MIN and luhn_valid(digits):
            best = end
    return best


def _phone(match: re.Match[str]) -> str:
    text = match.group()
    count = len(_NOT_DIGIT.sub("", text))
    if not _PHONE_MIN <= count <= _PHONE_MAX:
        return text
    if match.group(1) is not None and count < _TRUNK_MIN:
        return text
    return PHONE_TOKEN


def scrub_pii(text: str) -> str:
    """``text`` with e-mail addresses, card numbers and phone numbers replaced by tokens."""
    if "@" in text:
        text = _EMAIL.sub(EMAIL_TOKEN, text)
    if _ANY_DIGIT.search(text) is None:
        return text
    text = _DIGIT_RUN.sub(_card_run, text)
    return _PHONE.sub(_phone, text)


def pseudonymise(user_id: str, key: bytes) -> str:
    """A stable keyed pseudonym of ``user_id``: ``"p-"`` and 32 hex characters of HMAC-SHA256.

    Without the key the id cannot be recovered or confirmed. ``ValueError`` for an empty key.
    """
    if not key:
        raise ValueError("the pseudonym key must not be empty")
    mac = hmac.new(key, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return PSEUDONYM_PREFIX + mac.hexdigest()[:_PSEUDONYM_HEX]


_PSEUDONYM = re.compile(rf"{re.escape(PSEUDONYM_PREFIX)}[0-9a-f]{{{_PSEUDONYM_HEX}}}")


def is_pseudonym(user_id: str) -> bool:
    """Whether ``user_id`` has the shape of a pseudonym (``p-`` and 32 lowercase hex digits)."""
    return _PSEUDONYM.fullmatch(user_id) is not None


def pseudonym_for(user_id: str, key: bytes) -> str:
    """The pseudonym of ``user_id``, or ``user_id`` itself when it already is one.

    Publishing is then idempotent: replaying an archive whose ids were pseudonymised when first
    published, or tailing by a pseudonym, does not pseudonymise them a second time.
    """
    return user_id if is_pseudonym(user_id) else pseudonymise(user_id, key)


__all__ = [
    "CARD_TOKEN",
    "EMAIL_TOKEN",
    "PHONE_TOKEN",
    "PSEUDONYM_PREFIX",
    "is_pseudonym",
    "luhn_valid",
    "pseudonym_for",
    "pseudonymise",
    "scrub_pii",
]
