"""Our own sentence and question templates that turn source records into passages and QA pairs.

Each sentence carries the keys of the facts it states, so a question's gold passages are exactly the
chunks holding its fact. Every answer is written into its sentence with the same formatting (numbers
with thousands separators), which the builder checks: an answer is always a substring of a gold passage.

Question phrasings: every relation has twelve to seventeen. The last one is never used for training and is
kept for ``test_seen`` (known entities, unseen wording); the others are training phrasings. Nine were written
per relation at first; format 6 added seven more per relation, inserted just before the held-out last one and
written without seeing the paraphrase module. Those within a token-set Jaccard of 0.8 of a
``world_paraphrases`` phrasing (or equal to one) were removed, so the held-out paraphrase split stays unlike
training (tests/test_world_paraphrase.py checks); that left eleven to sixteen. They cover the relation's
name, synonyms of it, descriptions of the property ("how many electron shells" for the period), requests
("Tell me ...", "Give me ...", "Could you tell me ..."), "I wonder ...", "Do you know ...", other word
orders and terse forms ("Capital of X?"). The first two and the last are the three every relation started
with (``ORIGINAL_PHRASINGS``): val and test still draw from those, so their questions stay the ones earlier
results were measured on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rag_lightning.data.world_sources import City, Country, Element

# indices into each relation's phrasings of the three it started with: val and test draw from these
ORIGINAL_PHRASINGS = (0, 1, -1)
# how many training phrasings every relation started with (the shared random stream still draws over them)
ORIGINAL_TRAINING_PHRASINGS = 2

QUESTIONS: dict[str, tuple[str, ...]] = {
    # countries
    "capital": (
        "What is the capital of {name}?",
        "Which city is the capital of {name}?",
        "Tell me the capital of {name}.",
        "Name the capital of {name}.",
        "{name} has which city as its capital?",
        "Which city is the seat of the national government of {name}?",
        "I wonder which city is the capital of {name}.",
        "Where is the capital of {name}?",
        "Capital of {name}?",
        "Do you happen to know {name}'s capital?",
        "From which city is {name} governed?",
        "Could you tell me {name}'s capital city?",
        "What city hosts the government of {name}?",
        "Which city does {name} call its capital?",
        "{name}: what's its capital?",
        "Give me the capital city of {name}, please.",
        "What is the name of the capital city of {name}?",
    ),
    "capital_of": (
        "{capital} is the capital of which country?",
        "Which country has {capital} as its capital?",
        "Tell me which country has its capital in {capital}.",
        "Which nation's government sits in {capital}?",
        "{capital} is the seat of government of which country?",
        "Name the country whose capital is {capital}.",
        "I wonder which country {capital} is the capital of.",
        "The capital {capital} belongs to which country?",
        "Do you know what country's capital {capital} is?",
        "{capital} serves as the capital of what nation?",
        "Could you tell me the nation that {capital} is the capital of?",
        "Give me the country governed from {capital}.",
        "Capital city {capital}: which country?",
        "For which country is {capital} the political centre?",
        "Of which country is {capital} the capital city?",
    ),
    "region": (
        "In which region of the world is {name}?",
        "{name} lies in which world region?",
        "Tell me the world region of {name}.",
        "I wonder what world region {name} is in.",
        "Name the region of the world where {name} lies.",
        "{name} is located in which broad region of the world?",
        "World region of {name}?",
        "Could you tell me the world region {name} belongs to?",
        "Give me the continental region of {name}.",
        "Broadly speaking, where in the world is {name}?",
        "What major world region contains {name}?",
        "{name}: which region of the globe?",
        "To which of the world's regions does {name} belong?",
        "Which world region is {name} part of?",
    ),
    "subregion": (
        "In which subregion is {name} located?",
        "What subregion of the world does {name} belong to?",
        "Tell me the subregion of {name}.",
        "Which part of its continent is {name} in?",
        "Within its continent, which area does {name} belong to?",
        "I wonder which subregion {name} is part of.",
        "Name the subregion that {name} is in.",
        "{name} belongs to which subregion of the world?",
        "Subregion of {name}?",
        "Any idea which subregion {name} is in?",
        "Which subregion includes {name}?",
        "Give me the subregion of the world containing {name}.",
        "What is the UN geoscheme subregion of {name}?",
        "More precisely than its continent, where is {name}?",
        "{name} falls into which subregion?",
        "Which geographic subregion is {name} classed under?",
        "{name} lies in which subregion?",
    ),
    "population": (
        "What is the population of {name}?",
        "How many people live in {name}?",
        "Tell me the population of {name}.",
        "What is the number of people living in {name}?",
        "I wonder how many people {name} has.",
        "Population of {name}?",
        "How large is the population of {name}?",
        "What is the total number of residents of {name}?",
        "Give me the population figure for {name}.",
        "Could you tell me how many people reside in {name}?",
        "Number of inhabitants in {name}?",
        "How many inhabitants does {name} have?",
    ),
    "area": (
        "What is the area of {name} in square kilometres?",
        "How many square kilometres does {name} cover?",
        "What is the size of {name} in square kilometres?",
        "How much land does {name} cover, in square kilometres?",
        "What is the total surface of {name} in square km?",
        "I wonder how big {name} is in square kilometres.",
        "{name} covers how many square kilometres?",
        "Area of {name}?",
        "Do you know the surface area of {name}?",
        "What area, in sq km, does {name} occupy?",
        "Give me the total area of {name} in square kilometers.",
        "In square kilometres, how extensive is the territory of {name}?",
        "{name} spans an area of how many square kilometres?",
        "Size of {name}'s territory in square kilometres?",
        "How large a territory does {name} have?",
        "How large is {name} in square kilometres?",
    ),
    "currency": (
        "What is the currency of {name}?",
        "Which currency is used in {name}?",
        "Tell me the currency of {name}.",
        "Which currency circulates in {name}?",
        "I wonder what currency {name} uses.",
        "In {name}, what currency is used?",
        "Currency of {name}?",
        "Which currency would I need when travelling in {name}?",
        "Do you know the official currency of {name}?",
        "What is the legal tender in {name}?",
        "Could you tell me what people in {name} pay with?",
        "Give me the name of {name}'s currency.",
        "Which banknotes and coins are used in {name}?",
        "In what currency are prices in {name} quoted?",
        "What money do people use in {name}?",
    ),
    "language": (
        "What language is spoken in {name}?",
        "Name a language of {name}.",
        "Tell me a language spoken in {name}.",
        "Which language is used in {name}?",
        "What tongue do people speak in {name}?",
        "In {name}, which language is spoken?",
        "I wonder what language is spoken in {name}.",
        "Language of {name}?",
        "Do you know what {name}'s people speak?",
        "Could you tell me one of the languages of {name}?",
        "Give me one language that {name} uses.",
        "In what language do people in {name} communicate?",
        "{name} speaks which language?",
        "Which language would I hear in {name}?",
        "Which tongue is native to {name}?",
        "Which language do people speak in {name}?",
    ),
    "demonym": (
        "What are people from {name} called?",
        "What is the demonym for {name}?",
        "Tell me the demonym of {name}.",
        "What are the inhabitants of {name} called?",
        "What word describes someone from {name}?",
        "I wonder what people from {name} are called.",
        "What is the word for a citizen of {name}?",
        "Demonym of {name}?",
        "How do you refer to someone born in {name}?",
        "Do you know the name for people from {name}?",
        "Could you tell me what a resident of {name} is called?",
        "Give me the demonym used for {name}.",
        "What term is used for natives of {name}?",
        "{name}: what do its people call themselves?",
        "What do you call a person from {name}?",
    ),
    "borders": (
        "Which country borders {name}?",
        "Name a country that shares a land border with {name}.",
        "Tell me a country bordering {name}.",
        "Which country is next to {name}?",
        "What is one of the countries adjacent to {name}?",
        "Which country shares a border with {name}?",
        "I wonder which countries border {name}.",
        "{name} borders which country?",
        "Country bordering {name}?",
        "Do you know a country neighbouring {name}?",
        "Could you name a nation that {name} shares a frontier with?",
        "Give me one country on the border of {name}.",
        "Which country lies across the border from {name}?",
        "If you cross a land border out of {name}, which country could you enter?",
        "Name any country adjacent to {name}.",
        "Which nation touches {name} by land?",
        "Which country is a neighbour of {name}?",
    ),
    "calling_code": (
        "What is the international calling code of {name}?",
        "Which telephone code is used to call {name}?",
        "Tell me the calling code of {name}.",
        "What country code do you dial to phone {name}?",
        "Which number prefix is used for phone calls to {name}?",
        "What do I dial before a phone number in {name}?",
        "I wonder what the phone code of {name} is.",
        "{name} has which international calling code?",
        "Calling code of {name}?",
        "What is the phone prefix for {name}?",
        "Do you know the international dialling code of {name}?",
        "Could you tell me the telephone country code for {name}?",
        "Give me {name}'s phone code.",
        "Which digits do I dial first when calling {name} from abroad?",
        "{name} can be phoned using which country code?",
        "Telephone code for {name}?",
        "What is the dialling code for {name}?",
    ),
    "tld": (
        "What is the internet country code of {name}?",
        "Which top-level domain belongs to {name}?",
        "Tell me the top-level domain of {name}.",
        "Which web domain suffix is used for {name}?",
        "What do websites from {name} end with?",
        "What is the country code top-level domain of {name}?",
        "I wonder which domain websites of {name} use.",
        "{name} has which top-level domain?",
        "Top-level domain of {name}?",
        "What is the domain extension of {name}?",
        "What's the ccTLD for {name}?",
        "Could you tell me which internet suffix is assigned to {name}?",
        "Give me {name}'s web domain.",
        "Which two-letter domain ending does {name} have?",
        "Web addresses in {name} often end in what?",
        "Which dot-something domain is reserved for {name}?",
        "What is the internet domain ending for {name}?",
    ),
    "largest_city": (
        "What is the largest city of {name}?",
        "Which city in {name} has the most inhabitants?",
        "Tell me the largest city of {name}.",
        "Which city in {name} is the largest by population?",
        "I wonder which city is the largest in {name}.",
        "In {name}, which city is the biggest?",
        "Largest city of {name}?",
        "Which is the largest urban centre in {name}?",
        "Do you know the biggest city in {name}?",
        "Could you tell me which city of {name} tops the population ranking?",
        "Give me {name}'s largest city.",
        "Which city ranks first in size within {name}?",
        "Biggest city in {name}?",
        "Which city of {name} has more residents than any other?",
        "Name the most populous city of {name}.",
    ),
    "division_of": (
        "In which country is the administrative division {division}?",
        "{division} is an administrative division of which country?",
        "Tell me which country the administrative division {division} belongs to.",
        "Which country is the state or province {division} in?",
        "The administrative region {division} lies in which country?",
        "I wonder which country {division} is a division of.",
        "Which nation includes the subdivision {division}?",
        "Administrative division {division} is in which country?",
        "Do you know which country the region {division} is in?",
        "Could you tell me what country has {division} as one of its provinces or states?",
        "Give me the country to which the subdivision {division} belongs.",
        "{division}, an administrative unit, is located in what country?",
        "Which country counts {division} among its administrative regions?",
        "What country is the province {division} part of?",
        "Country of the division {division}?",
        "Which country has an administrative division called {division}?",
    ),
    # elements
    "symbol": (
        "What is the chemical symbol of {name}?",
        "Which symbol does {name} have in the periodic table?",
        "Tell me the chemical symbol of {name}.",
        "How is {name} abbreviated in the periodic table?",
        "What one- or two-letter symbol stands for {name}?",
        "Which letters represent {name} in chemical formulas?",
        "I wonder what the chemical symbol of {name} is.",
        "{name} has which chemical symbol?",
        "Symbol of {name}?",
        "Do you know how {name} is written on the periodic table?",
        "Could you give me the abbreviation chemists use for {name}?",
        "Give me {name}'s element symbol.",
        "What short code represents {name} on the periodic table?",
        "{name} is written as what in a chemical formula?",
        "Chemical shorthand for {name}?",
        "Which letter or letters denote {name}?",
        "What is the symbol for the element {name}?",
    ),
    "element_by_symbol": (
        "Which chemical element has the symbol {symbol}?",
        "The chemical symbol {symbol} stands for which element?",
        "Tell me which element has the symbol {symbol}.",
        "What element does {symbol} abbreviate in the periodic table?",
        "Which element is written as {symbol} in chemical formulas?",
        "Name the element whose symbol is {symbol}.",
        "I wonder which element the symbol {symbol} stands for.",
        "{symbol} is the symbol of which chemical element?",
        "Element with symbol {symbol}?",
        "Do you know what element {symbol} stands for?",
        "Could you tell me which element is known by the letters {symbol}?",
        "Give me the element written {symbol}.",
        "{symbol} on the periodic table is which element?",
        "What element does the abbreviation {symbol} denote?",
        "If a formula contains {symbol}, which element is that?",
        "Symbol {symbol} means which element?",
        "Which element is represented by the symbol {symbol}?",
    ),
    "atomic_number": (
        "What is the atomic number of {name}?",
        "What atomic number does {name} have?",
        "Tell me the atomic number of {name}.",
        "What is the proton number of {name}?",
        "Which number does {name} have in the periodic table?",
        "I wonder what the atomic number of {name} is.",
        "Atomic number of {name}?",
        "Do you know {name}'s atomic number?",
        "What is the Z value of {name}?",
        "Give me the nuclear charge number of {name}.",
        "{name} is element number what?",
        "Where does {name} come in the periodic table's numbering?",
        "Could you tell me what atomic number {name} carries?",
        "{name} has which atomic number?",
    ),
    "element_by_number": (
        "Which element has atomic number {number}?",
        "Which chemical element has {number} protons?",
        "Tell me which element has atomic number {number}.",
        "What element is number {number} in the periodic table?",
        "Which element has a proton number of {number}?",
        "An atom with {number} protons belongs to which element?",
        "I wonder which element has the atomic number {number}.",
        "Atomic number {number} is which element?",
        "Element number {number}?",
        "Do you know which element is number {number}?",
        "Could you tell me what element has Z = {number}?",
        "Give me the element numbered {number}.",
        "What element sits at position {number} of the periodic table?",
        "If an element's atomic number is {number}, what is it?",
        "{number}: which element?",
        "Which element's nucleus holds {number} protons?",
        "Name the element with atomic number {number}.",
    ),
    "atomic_weight": (
        "What is the standard atomic weight of {name}?",
        "What is the atomic weight of {name}?",
        "Tell me the atomic weight of {name}.",
        "What is the molar mass of {name}?",
        "I wonder what the atomic weight of {name} is.",
        "Atomic weight of {name}?",
        "Do you know {name}'s standard atomic weight?",
        "Could you tell me how many grams one mole of {name} weighs?",
        "Give me the weight of {name} in daltons.",
        "{name} has an atomic weight of what?",
        "Mean atomic mass of {name}?",
        "Averaged over its isotopes, how much does an atom of {name} weigh?",
        "How heavy is an atom of {name} in atomic mass units?",
    ),
    "period": (
        "In which period of the periodic table is {name}?",
        "Which period does {name} belong to?",
        "Tell me the period of {name} in the periodic table.",
        "What period is {name} in?",
        "I wonder which period {name} is in.",
        "{name} is found in which period?",
        "Period of {name}?",
        "Which horizontal row of the periodic table holds {name}?",
        "Do you know the period number of {name}?",
        "Could you tell me how many electron shells an atom of {name} has?",
        "Give me {name}'s period.",
        "Counting rows from the top of the periodic table, where is {name}?",
        "{name}: which period?",
        "The element {name} lies in which period?",
        "{name} sits in which period of the periodic table?",
    ),
    "group": (
        "Which group of the periodic table is {name} in?",
        "In which group is the element {name}?",
        "Tell me the group of {name} in the periodic table.",
        "What group number does {name} have?",
        "I wonder which group {name} is in.",
        "Group of {name}?",
        "In which column of the periodic table does {name} appear?",
        "Do you know which group {name} falls in?",
        "Could you tell me the IUPAC group of {name}?",
        "Give me the column number of {name}.",
        "{name} sits in what group?",
        "Group number for {name}?",
        "Which of the 18 groups does {name} belong to?",
        "{name} belongs to which periodic table group?",
    ),
    "block": (
        "In which block of the periodic table is {name}?",
        "Which block does the element {name} belong to?",
        "Tell me the block of {name}.",
        "In which orbital block of the periodic table is {name}?",
        "Which block of the periodic table contains {name}?",
        "What block is {name} in?",
        "I wonder which block {name} belongs to.",
        "{name} belongs to which block?",
        "Block of {name}?",
        "Is {name} in the s-, p-, d- or f-block?",
        "Do you know which block {name} sits in?",
        "Could you tell me the block {name} is classified under?",
        "Give me the periodic table block for {name}.",
        "Name the block that includes {name}.",
        "Orbital block containing {name}?",
        "Going by its outermost electrons, which block is {name} placed in?",
        "{name} is in which block of the periodic table?",
    ),
    "series": (
        "Which class of elements does {name} belong to?",
        "What kind of element is {name}?",
        "Tell me the element category of {name}.",
        "Which family of elements is {name} part of?",
        "What type of element is {name}?",
        "I wonder what kind of element {name} is.",
        "Element category of {name}?",
        "Do you know the chemical family of {name}?",
        "Could you tell me the element series {name} is part of?",
        "Give me the classification of {name} among the elements.",
        "Is {name} an alkali metal, a noble gas, a halogen, or what?",
        "What set of chemically similar elements includes {name}?",
        "Which category of elements contains {name}?",
        "What sort of chemical element would you call {name}?",
        "To which series of elements does {name} belong?",
    ),
    "discovery_year": (
        "In which year was {name} discovered?",
        "When was {name} discovered?",
        "Tell me the year {name} was discovered.",
        "In what year was {name} first found?",
        "What year did the discovery of {name} happen?",
        "When did scientists discover {name}?",
        "I wonder when {name} was discovered.",
        "{name} was found in which year?",
        "Year of discovery of {name}?",
        "Do you know the year {name} was first discovered?",
        "Could you tell me the year of {name}'s discovery?",
        "Give me the year {name} became known to science.",
        "In which year did {name} come to light?",
        "{name} has been known since which year?",
        "When was {name} first observed?",
        "What's the discovery date of {name}?",
        "{name} was discovered in what year?",
    ),
    "discoverers": (
        "Who discovered {name}?",
        "By whom was {name} discovered?",
        "Tell me who discovered {name}.",
        "Who found {name}?",
        "Which scientist discovered {name}?",
        "Who was the discoverer of {name}?",
        "I wonder who discovered {name}.",
        "{name} was discovered by whom?",
        "Discoverer of {name}?",
        "Do you know whose discovery {name} was?",
        "Could you tell me the name of the person who discovered {name}?",
        "Give me the scientist or scientists behind the discovery of {name}.",
        "{name} was first identified by which chemist?",
        "Which researchers are credited with finding {name}?",
        "Who first detected {name}?",
        "Who do we have to thank for discovering {name}?",
        "Who is credited with the discovery of {name}?",
    ),
    "discovery_location": (
        "In which country was {name} discovered?",
        "Where was {name} discovered?",
        "Tell me the country where {name} was discovered.",
        "In what country was {name} found?",
        "Where was {name} first identified?",
        "Which country did the discovery of {name} take place in?",
        "I wonder where {name} was discovered.",
        "{name} was found where?",
        "Country of discovery of {name}?",
        "Do you know the country where scientists found {name}?",
        "Could you tell me in what country {name} was first identified?",
        "Give me the nation where the discovery of {name} was made.",
        "Where in the world, by country, was {name} discovered?",
        "What country can claim the discovery of {name}?",
        "In which country did researchers first detect {name}?",
        "Which country is {name}'s discovery attributed to?",
        "{name} was first discovered in which country?",
    ),
    # cities
    "city_country": (
        "In which country is the city of {name}?",
        "{name} is a city in which country?",
        "Tell me the country of the city of {name}.",
        "Which country does the city of {name} belong to?",
        "The city of {name} lies in which nation?",
        "Where, by country, is the city of {name}?",
        "I wonder which country the city of {name} is in.",
        "Country of the city of {name}?",
        "Do you know which nation the city {name} belongs to?",
        "Could you tell me which country contains the city of {name}?",
        "Give me the nation where one finds the city of {name}.",
        "City of {name}: which country?",
        "If I visit the city of {name}, which country am I in?",
        "What country is home to the city of {name}?",
        "Which country's territory includes the city of {name}?",
        "Which country is the city of {name} located in?",
    ),
    "city_population": (
        "What is the population of the city of {name}?",
        "How many people live in the city of {name}?",
        "Tell me the population of the city of {name}.",
        "What is the number of people living in the city of {name}?",
        "I wonder how many people live in the city of {name}.",
        "Population of the city of {name}?",
        "Do you know how many people the city of {name} has?",
        "Could you tell me the number of inhabitants of the city of {name}?",
        "Give me the head count for the city of {name}.",
        "How large a population does the city of {name} have?",
        "The city of {name} is home to how many residents?",
        "City of {name}: how many inhabitants?",
        "How big is the city of {name} by number of people?",
        "How many inhabitants does the city of {name} have?",
    ),
    "city_timezone": (
        "Which time zone is the city of {name} in?",
        "What time zone does the city of {name} use?",
        "Tell me the time zone of the city of {name}.",
        "Which timezone applies in the city of {name}?",
        "What is the local time zone of the city of {name}?",
        "Which IANA time zone does the city of {name} follow?",
        "I wonder what time zone the city of {name} is in.",
        "The city of {name} keeps which time zone?",
        "Time zone of the city of {name}?",
        "Do you know which time zone covers the city of {name}?",
        "Could you tell me the tz database zone for the city of {name}?",
        "Give me the Olson zone name of the city of {name}.",
        "By which time zone are clocks set in the city of {name}?",
        "What zone does local time in the city of {name} follow?",
        "Timezone, city of {name}?",
        "Where does the city of {name} sit in terms of time zones?",
        "In which time zone does the city of {name} lie?",
    ),
}

_LIST_CHUNK = 10  # at most this many items per list sentence, so no single sentence outgrows a passage
# country names read with "the" in running text: "the capital of the United Kingdom"
_WITH_ARTICLE = re.compile(
    r"^(United |Republic |Democratic Republic |Central African |Dominican |Czech |Holy See|Netherlands$"
    r"|Philippines$|Maldives$|Seychelles$|Comoros$)| (Islands|Lands)$"
)


@dataclass(frozen=True)
class Sentence:
    text: str
    keys: frozenset[str] = frozenset()  # fact keys this sentence states


@dataclass(frozen=True)
class Fact:
    """One askable fact: a relation, the slots its question templates need, and every accepted answer."""

    relation: str
    key: str  # the sentence key(s) holding it
    slots: dict[str, str]
    answers: tuple[str, ...]
    # other entities' sentences that state it too, as (entity id, sentence key)
    also_in: tuple[tuple[str, str], ...] = ()


@dataclass
class Entity:
    kind: str  # country | element | city
    id: str  # stable: "country-fra", "element-fe", "city-2988507"
    name: str  # how questions mention it
    title: str  # passage title (disambiguated where names collide)
    sentences: list[Sentence] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)

    def say(self, text: str, *keys: str) -> None:
        self.sentences.append(Sentence(capitalize(text), frozenset(keys)))

    def ask(
        self,
        relation: str,
        answers: tuple[str, ...] | list[str] | str,
        key: str | None = None,
        also_in: tuple[tuple[str, str], ...] = (),
        **slots: str,
    ) -> None:
        answers = (answers,) if isinstance(answers, str) else tuple(answers)
        slots.setdefault("name", the(self.name) if self.kind == "country" else self.name)
        self.facts.append(Fact(relation, key or relation, slots, answers, also_in))


def the(name: str) -> str:
    """A country name as it reads mid-sentence; answers keep the bare name, which stays a substring."""
    return f"the {name}" if _WITH_ARTICLE.search(name) else name


def capitalize(text: str) -> str:
    """Upper-case the first letter only ("the Netherlands lies..." -> "The Netherlands lies...")."""
    return text[:1].upper() + text[1:]


def fmt_int(value: int | float) -> str:
    """Numbers are written the same way in passages and answers: 66,078,000."""
    return f"{round(value):,}"


def fmt_decimal(value: float) -> str:
    """Up to three decimals, trailing zeros dropped: 55.845, 1.008, 209."""
    if float(value).is_integer():
        return fmt_int(value)
    return f"{value:,.3f}".rstrip("0").rstrip(".")


def join_words(items: list[str] | tuple[str, ...]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _chunks(items: tuple[str, ...], size: int = _LIST_CHUNK) -> list[tuple[str, ...]]:
    """Even pieces of at most ``size`` items (21 -> 7, 7, 7 rather than 10, 10, 1)."""
    pieces = -(-len(items) // size)
    return [items[i * len(items) // pieces : (i + 1) * len(items) // pieces] for i in range(pieces)]


def _prose_sentences(text: str) -> list[str]:
    """Split source prose at sentence ends; a missing final period is added."""
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+(?=[A-Z(])", text) if p.strip()]
    return [p if p[-1] in ".!?" else p + "." for p in parts]


def country_entity(
    c: Country, largest_city: City | None = None, largest_city_id: str | None = None
) -> Entity:
    e = Entity("country", f"country-{c.alpha3.lower()}", c.name, c.name)
    n = the(c.name)
    region = "the Americas" if c.region == "Americas" else c.region
    if c.subregion:
        e.say(f"{n} is a country in {c.subregion}, a subregion of {region}.", "region", "subregion")
        e.ask("subregion", c.subregion)
    else:
        e.say(f"{n} is a country in {region}.", "region")
    e.ask("region", c.region)
    e.say(f"The capital of {n} is {c.capital}.", "capital")
    e.ask("capital", c.capital)
    e.ask("capital_of", c.name, key="capital", capital=c.capital)
    if c.population:
        e.say(f"{n} has a population of {fmt_int(c.population)}.", "population")
        e.ask("population", fmt_int(c.population))
    if c.area:
        e.say(f"{n} covers an area of {fmt_decimal(c.area)} square kilometres.", "area")
        e.ask("area", fmt_decimal(c.area))
    if len(c.currencies) == 1:
        e.say(f"The currency of {n} is the {c.currencies[0]}.", "currency")
    elif c.currencies:
        e.say(f"The currencies of {n} are the {join_words(c.currencies)}.", "currency")
    if c.currencies:
        e.ask("currency", c.currencies)
    if len(c.languages) == 1:
        e.say(f"The language of {n} is {c.languages[0]}.", "language")
    elif c.languages:
        e.say(f"Languages of {n} include {join_words(c.languages)}.", "language")
    if c.languages:
        e.ask("language", c.languages)
    if c.demonym:
        e.say(f"People from {n} are called {c.demonym}.", "demonym")
        e.ask("demonym", c.demonym)
    if c.calling_code:
        e.say(f"The international calling code of {n} is {c.calling_code}.", "calling_code")
        e.ask("calling_code", c.calling_code)
    if c.tld:
        e.say(f"Its internet country code top-level domain is {c.tld}.", "tld")
        e.ask("tld", c.tld)
    if largest_city is not None:
        e.say(
            f"The largest city of {n} is {largest_city.name}, with a population of "
            f"{fmt_int(largest_city.population)}.",
            "largest_city",
        )
        also = ((largest_city_id, "largest_city"),) if largest_city_id else ()
        e.ask("largest_city", largest_city.name, also_in=also)
    if not c.borders:
        e.say(f"{n} has no land borders with other countries.")
    for i, group in enumerate(_chunks(c.borders)):
        lead = f"{n} shares land borders with" if i == 0 else f"{n} also borders"
        e.say(f"{lead} {join_words([the(b) for b in group])}.", "borders")
    if c.borders:
        e.ask("borders", c.borders)
    for i, group in enumerate(_chunks(c.provinces)):
        lead = "The administrative divisions of" if i == 0 else "Further administrative divisions of"
        e.say(f"{lead} {n} include {join_words(group)}.", *(f"division:{p}" for p in group))
        for p in group:
            e.ask("division_of", c.name, key=f"division:{p}", division=p)
    return e


def element_entity(el: Element) -> Entity:
    e = Entity("element", f"element-{el.symbol.lower()}", el.name, el.name)
    number = str(el.atomic_number)
    e.say(
        f"{el.name} is a chemical element with the symbol {el.symbol} and atomic number {number}.",
        "symbol",
        "number",
    )
    e.ask("symbol", el.symbol, key="symbol")
    e.ask("element_by_symbol", el.name, key="symbol", symbol=el.symbol)
    e.ask("atomic_number", number, key="number")
    e.ask("element_by_number", el.name, key="number", number=number)
    if el.atomic_weight:
        e.say(f"The standard atomic weight of {el.name} is {fmt_decimal(el.atomic_weight)}.", "atomic_weight")
        e.ask("atomic_weight", fmt_decimal(el.atomic_weight))
    block = f"{el.block}-block"
    if el.group is not None:
        e.say(
            f"{el.name} is in period {el.period} and group {el.group} of the periodic table, in the {block}.",
            "period",
            "group",
            "block",
        )
        e.ask("group", str(el.group))
    else:
        e.say(f"{el.name} is in period {el.period} of the periodic table, in the {block}.", "period", "block")
    e.ask("period", str(el.period))
    e.ask("block", block)
    if el.series:
        series = el.series.lower()
        e.say(f"{el.name} belongs to the {series}.", "series")
        e.ask("series", series)
    _discovery(e, el)
    if el.name_origin:
        e.say(f"Origin of the name: {el.name_origin.rstrip('.')}.")
    for text in el.prose:
        for sentence in _prose_sentences(text):
            e.say(sentence)
    return e


def _discovery(e: Entity, el: Element) -> None:
    if not (el.discovery_year or el.discoverers):
        e.say(f"{el.name} has been known since ancient times.")
        return
    places = tuple(p.strip() for p in (el.discovery_location or "").split("/") if p.strip())
    text = f"{el.name} was discovered"
    keys = []
    if el.discovery_year:
        text += f" in {el.discovery_year}"
        keys.append("discovery_year")
        e.ask("discovery_year", str(el.discovery_year))
    if el.discoverers:
        text += f" by {el.discoverers}"
        keys.append("discoverers")
        names = tuple(
            n.strip() for n in re.split(r"[;,]", el.discoverers) if n.strip() and n.strip() != "et al"
        )
        e.ask("discoverers", (el.discoverers, *(n for n in names if n != el.discoverers)))
    if places:
        text += f" in {join_words(places)}"
        keys.append("discovery_location")
        e.ask("discovery_location", places)
    e.say(text + ".", *keys)


def city_entity(city: City, title: str, rank: int, askable: bool) -> Entity:
    """A city passage; ``askable`` is False where its name is shared, so questions would be ambiguous."""
    e = Entity("city", f"city-{city.geonameid}", city.name, title)
    country = the(city.country)
    e.say(f"{city.name} is a city in {country}.", "city_country")
    e.say(f"{city.name} has a population of {fmt_int(city.population)}.", "city_population")
    if rank == 1:
        e.say(f"It is the largest city of {country}.", "largest_city")
    else:
        e.say(f"It is the {ordinal(rank)} largest city of {country}.")
    lat = f"{abs(city.latitude):.2f}° {'N' if city.latitude >= 0 else 'S'}"
    lon = f"{abs(city.longitude):.2f}° {'E' if city.longitude >= 0 else 'W'}"
    e.say(f"{city.name} lies at {lat}, {lon}, in the {city.timezone} time zone.", "city_timezone")
    if askable:
        e.ask("city_country", city.country)
        e.ask("city_population", fmt_int(city.population))
        e.ask("city_timezone", city.timezone)
    return e
