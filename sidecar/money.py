"""Money is integers of nano-dollars (1e-9 USD); every conversion to and from it is here.

Decimal arithmetic throughout: a float division would put a figure one ulp off the exact
decimal, and sums of floats drift. The only floats are the ones the API documents (e.g.
`total_cost`), made from the exact decimal in one rounding."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
# The cap keeps every figure inside a signed 64-bit Redis counter.
MAX_NANOS = 2**63 - 1
# Wide enough that no figure we accept is rounded anywhere but in the final step.
EXACT = Context(prec=80, rounding=ROUND_HALF_UP)
_ONE = Decimal(1)
# A strict grammar for dollars in text: float() would also take "nan", "inf" and "1_0".
_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def round_nanos(nanos: Decimal) -> int | None:
    """Nano-dollars, rounded half up; None when negative, not finite or over the cap."""
    if not nanos.is_finite() or nanos < 0 or nanos > MAX_NANOS:
        return None
    return int(nanos.quantize(_ONE, rounding=ROUND_HALF_UP, context=EXACT))


def from_usd(usd: Decimal) -> int | None:
    return round_nanos(usd.scaleb(9, EXACT)) if usd.is_finite() else None


def from_number(value: object) -> int | None:
    """Nano-dollars from a JSON number of dollars (an int or a float; bools are not numbers)."""
    if type(value) is int:
        return from_usd(Decimal(value))
    if type(value) is float:
        # str() gives the shortest text that round-trips, so 0.1 becomes exactly 0.1 USD.
        return from_usd(Decimal(str(value)))
    return None


def from_text(text: str | None, *, max_length: int = 64) -> int | None:
    """Nano-dollars from dollars written as a plain decimal ("0.0125", "1e-3")."""
    if text is None or len(text) > max_length:
        return None
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return from_usd(Decimal(text))
    except InvalidOperation:
        return None


def to_decimal(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9, EXACT)


def dollars(nanos: int) -> float:
    """The nearest float to the exact amount, for fields the API documents as numbers."""
    return float(to_decimal(nanos))


def exact(nanos: int) -> str:
    """Every digit, e.g. "12.500000000": what an export or an invoice needs."""
    whole, fraction = divmod(nanos, NANOS_PER_USD)
    return f"{whole}.{fraction:09d}"


def plain(nanos: int) -> str:
    """The shortest exact decimal, e.g. "0.5", "12": for headers and messages. In integers
    (on every limited response: a Decimal costs several times as much)."""
    whole, fraction = divmod(-nanos if nanos < 0 else nanos, NANOS_PER_USD)
    sign = "-" if nanos < 0 else ""
    if not fraction:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:09d}".rstrip("0")


def display(nanos: int) -> str:
    """For people: "$1,234.50" from a dollar up, else up to six decimals ("$0.0075")."""
    if nanos == 0:
        return "$0.00"
    amount = to_decimal(nanos)
    if abs(amount) >= 1:
        return f"${amount:,.2f}"
    text = f"{amount:.6f}".rstrip("0")
    return "$" + (text + "0" if text.endswith(".") else text)
