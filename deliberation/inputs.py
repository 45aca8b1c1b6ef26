"""Input hygiene at the boundary: what participants type, the ids in URLs, the external ids panels send.

- `clean_text` removes NUL and the other C0 control characters (tab and line breaks stay) and the
  bidirectional controls (embeddings, overrides, isolates, marks) that could reorder what other
  members, researchers and spreadsheets see. PostgreSQL refuses NUL in text, so uncleaned input
  would be a 500 there.
- `visible_length` counts what a reader sees: invisible format characters (zero-width spaces,
  joiners, the byte-order mark) and surrounding white space do not make an opinion long enough.
- URL ids use the `dbid` converter: digits that fit a database id (a signed 64-bit integer), so an id
  out of range is a 404, like any id that does not exist, not an overflow in the database driver.
"""

from __future__ import annotations

import re
import unicodedata

from django.urls import register_converter

MAX_DB_ID = 2**63 - 1

# C0 controls but tab, line feed and carriage return; DEL; and the bidirectional controls:
# ALM, LRM, RLM, LRE/RLE/PDF/LRO/RLO, LRI/RLI/FSI/PDI.
_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean_text(value: object) -> str:
    """`value` as text, without NUL, other control characters (but tab and line breaks) or bidirectional controls."""
    return _UNSAFE.sub("", "" if value is None else str(value))


def visible_length(text: str) -> int:
    """How many characters a reader sees: invisible format and control characters do not count, nor surrounding white space."""
    return len("".join(ch for ch in text if unicodedata.category(ch) not in ("Cf", "Cc") or ch in "\t\n\r").strip())


def is_db_id(value: int) -> bool:
    return 0 <= value <= MAX_DB_ID


class DatabaseIdConverter:
    """`<dbid:name>`: a non-negative integer that fits a database id; anything larger does not match (404)."""

    regex = "[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        number = int(value)
        if not is_db_id(number):
            raise ValueError("out of range for a database id")
        return number

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(DatabaseIdConverter, "dbid")
