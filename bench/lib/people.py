"""Identities that look like a real user base: names from several languages (accents, Cyrillic,
CJK), emails at common and company domains, external ids in the styles products use (numeric,
prefixed, UUID, slug, the email itself). Deterministic for a seed, and fast enough for a
million (a few seconds)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


FIRST = _words(
    "James Mary John Patricia Robert Jennifer Michael Linda William Elizabeth David Barbara "
    "Richard Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Nancy Daniel Lisa "
    "Matthew Betty Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew "
    "Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian Dorothy George Melissa Timothy "
    "Deborah Ronald Stephanie Edward Rebecca Jason Sharon Jeffrey Laura Ryan Cynthia Jacob "
    "Kathleen Gary Amy Nicholas Angela Eric Shirley Jonathan Anna Stephen Brenda Larry Pamela "
    "Justin Emma Scott Nicole Brandon Helen Benjamin Samantha Samuel Katherine Gregory "
    "Christine Alexander Debra Frank Rachel Patrick Carolyn Raymond Janet Jack Catherine Dennis "
    "Maria Jerry Heather "
    "José Zoë Chloé Björn Søren Łukasz François Jürgen Renée Inès Mateo Lucía Ängla Øystein "
    "Siobhán Dvořák Ömer Çağla Nguyễn Thảo Анна Мария Иван Дмитрий Ольга Сергей Олена "
    "太郎 花子 翔太 美咲 伟 芳 秀英 민준 서연 Aarav Priya Rohan Ananya Mohammed Fatima Omar Aisha"
)

LAST = _words(
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris "
    "Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill "
    "Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips "
    "Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook Rogers "
    "Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson "
    "Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo "
    "Sanders Patel Myers Long Ross Foster Jimenez Müller Schröder Fernández Nuñez Lefèvre "
    "Gonçalves Østergaard Wiśniewski Kowalczyk Dvořáková Yılmaz Öztürk O'Brien D'Angelo "  # noqa: RUF001
    "Иванов Смирнова Кузнецов Попова Шевченко 山田 佐藤 鈴木 高橋 王 李 张 김 이 박 Singh "
    "Sharma Gupta Khan Hassan Rahman Ali Okafor Mensah Abebe"
)

MAIL = _words(
    "gmail.com yahoo.com outlook.com hotmail.com icloud.com proton.me aol.com gmx.de web.de "
    "yandex.ru mail.ru qq.com 163.com naver.com orange.fr libero.it"
)

WORDS = _words(
    "acme globex initech umbrella stark wayne hooli pied piper vandelay wonka cyberdyne tyrell "
    "soylent oscorp massive dynamic aperture black mesa gringotts monarch nakatomi bluth virtucon "
    "northwind contoso fabrikam tailspin adventure works litware proseware wingtip fourth coffee "
    "alpine ski trey research blue yonder lucerne margie travel datum southridge video"
)

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True, slots=True)
class Person:
    external_id: str
    display_name: str | None
    email: str | None
    tags: list[str]


def _ascii(name: str) -> str:
    """What a mailbox makes of a name: ASCII letters only, else a transliteration stand-in."""
    kept = "".join(c for c in name.lower() if c.isascii() and c.isalpha())
    return kept or f"u{sum(map(ord, name)) % 9973}"


def people(count: int, seed: int = 7, start: int = 0) -> Iterator[Person]:
    """`count` identities, numbered from `start` (numbers make external ids unique)."""
    rnd = random.Random(seed * 1_000_003 + start)
    companies = [f"{a}-{b}.com" for a in WORDS for b in ("corp", "labs", "inc", "group", "io")]
    choice, random_ = rnd.choice, rnd.random
    for n in range(start, start + count):
        first, last = choice(FIRST), choice(LAST)
        local = f"{_ascii(first)}.{_ascii(last)}"
        if random_() < 0.5:
            local += str(rnd.randrange(1, 10_000))
        domain = choice(MAIL) if random_() < 0.7 else choice(companies)
        email = f"{local}@{domain}" if random_() < 0.9 else None
        style = random_()
        if style < 0.3:
            external_id = f"user_{n}"
        elif style < 0.5:
            external_id = "cus_" + "".join(choice(_ALPHABET) for _ in range(14))
        elif style < 0.65:
            external_id = f"{rnd.getrandbits(128):032x}"
        elif style < 0.8:
            external_id = f"{local}-{n}"
        elif style < 0.9 and email is not None:
            external_id = f"{email}#{n}"
        else:
            external_id = str(10_000_000 + n)
        name = f"{first} {last}"
        if random_() < 0.2:
            name = name.upper() if random_() < 0.5 else name.lower()
        display_name = name if random_() < 0.95 else None
        tags = ["premium"] if random_() < 0.1 else []
        tags.append(f"team-{n % 50}")
        yield Person(external_id, display_name, email, tags)
