"""Question phrasings written apart from the training templates, for the ``test_paraphrase`` split only.

Why: the world's training questions come from a few templates per relation (``world_templates.QUESTIONS``),
and a reader trained on them can learn the templates' words instead of the question's meaning. These
phrasings ask the same facts in other words: synonyms of the relation word, descriptions of the property
instead of its name, other question forms ("Tell me...", "I'd like to know...") and other word orders. The
``test_paraphrase`` split asks the held-out ``test`` facts with them, so its EM beside ``test`` EM says how
much of the reading survives a change of wording.

Kept aside: never used for training, tuning or picking checkpoints (tests/test_world_paraphrase.py checks that
no training template and no question of train/val/test/test_seen comes from here, and that no phrasing here
is a training template in disguise). Do not tune the training templates against this split's errors, or it
stops measuring anything. Each phrasing uses the slots of its relation's templates and must keep the fact's
answer the only right one.
"""

from __future__ import annotations

PARAPHRASES: dict[str, tuple[str, ...]] = {
    # countries
    "capital": (
        "Which city is {name}'s capital?",
        "I'd like to know which city {name} has as its capital.",
        "Tell me the name of {name}'s capital.",
        "What city serves as the capital of {name}?",
    ),
    "capital_of": (
        "{capital} is the capital city of what nation?",
        "Whose capital is {capital}?",
        "Tell me the country whose capital is {capital}.",
        "I'd like to know which nation has its capital in {capital}.",
    ),
    "region": (
        "On which continent is {name}?",
        "Tell me which continent {name} is on.",
        "{name} is located on which continent?",
        "I'd like to know the continental region of {name}.",
    ),
    "subregion": (
        "Within its continent, which area is {name} part of?",
        "Tell me the subregion that {name} is in.",
        "I'd like to know the part of its continent where {name} is.",
        "{name} is found in which area of its continent?",
    ),
    "population": (
        "How many people call {name} home?",
        "Tell me how many residents {name} has.",
        "I'd like to know the number of people living in {name}.",
        "How populous is {name}?",
        "{name} is home to how many people?",
    ),
    "area": (
        "How much land does {name} span, in km²?",
        "Tell me the size of {name} in square kilometres.",
        "I'd like to know how big {name} is, in km².",
        "What is the surface area of {name}, measured in km²?",
        "How many km² is {name}?",
    ),
    "currency": (
        "What is the official money of {name}?",
        "Which currency would you pay with in {name}?",
        "Tell me the legal tender of {name}.",
        "I'd like to know the monetary unit of {name}.",
        "In {name}, what do people pay with?",
    ),
    "language": (
        "Which tongue is spoken in {name}?",
        "What is one of the languages of {name}?",
        "I'd like to know a language that people in {name} use.",
        "What language do the inhabitants of {name} speak?",
        "Tell me one of the languages used in {name}.",
    ),
    "demonym": (
        "What is a native of {name} called?",
        "How do you refer to someone from {name}?",
        "Tell me the word for the inhabitants of {name}.",
        "I'd like to know what the citizens of {name} are called.",
        "People from {name} are known as what?",
    ),
    "borders": (
        "Tell me a country adjacent to {name}.",
        "Which nation shares a frontier with {name}?",
        "I'd like to know one of {name}'s neighbouring countries.",
        "What country lies along the border of {name}?",
        "{name} is adjacent to which country?",
    ),
    "calling_code": (
        "Which country code do you dial to phone {name} from abroad?",
        "Tell me the telephone country code of {name}.",
        "I'd like to know the phone prefix for calls to {name}.",
        "What code do I need to ring {name} from another country?",
    ),
    "tld": (
        "Which web domain suffix does {name} use?",
        "Tell me the two-letter internet domain of {name}.",
        "I'd like to know the country domain for websites in {name}.",
        "Websites in {name} end in which domain?",
    ),
    "largest_city": (
        "What is the biggest city in {name}?",
        "Which city of {name} has the largest population?",
        "Tell me the most populated city in {name}.",
        "I'd like to know {name}'s biggest city.",
    ),
    "division_of": (
        "{division} is a province or region of which country?",
        "Which country contains the administrative region {division}?",
        "Tell me the country that {division} is a subdivision of.",
        "I'd like to know which nation has {division} as one of its subdivisions.",
        "{division} is part of which country?",
    ),
    # elements
    "symbol": (
        "What is the one- or two-letter abbreviation for {name}?",
        "Tell me how {name} is abbreviated on the periodic table.",
        "I'd like to know the chemical abbreviation of {name}.",
        "How is {name} written in chemical formulas?",
    ),
    "element_by_symbol": (
        "What does the symbol {symbol} stand for on the periodic table?",
        "Tell me the element abbreviated {symbol}.",
        "I'd like to know which element is written {symbol} in chemical formulas.",
        "{symbol} is the abbreviation of which element?",
    ),
    "atomic_number": (
        "How many protons does an atom of {name} have?",
        "Tell me the proton number of {name}.",
        "I'd like to know the number of protons in the nucleus of {name}.",
        "{name}'s atomic number is what?",
    ),
    "element_by_number": (
        "What is element number {number}?",
        "Tell me the element whose atoms have {number} protons.",
        "I'd like to know which element is number {number} in the periodic table.",
        "The element with proton number {number} is called what?",
    ),
    "atomic_weight": (
        "What is the relative atomic mass of {name}?",
        "Tell me the relative atomic mass of {name}.",
        "I'd like to know the atomic mass of {name}.",
        "{name} has what standard atomic weight?",
        "What does the periodic table list as {name}'s atomic mass?",
    ),
    "period": (
        "Which row of the periodic table contains {name}?",
        "Tell me the period number of {name}.",
        "I'd like to know in which horizontal row of the periodic table {name} appears.",
        "{name} appears in which row of the periodic table?",
    ),
    "group": (
        "Which column of the periodic table contains {name}?",
        "Tell me the group number of {name}.",
        "I'd like to know which vertical column of the periodic table {name} is in.",
        "{name} is found in which column of the periodic table?",
    ),
    "block": (
        "Which orbital block is {name} part of?",
        "Tell me which of the s, p, d or f blocks {name} falls in.",
        "I'd like to know the periodic-table block containing {name}.",
        "In terms of orbital blocks, where does {name} fall?",
    ),
    "series": (
        "What category of element is {name}?",
        "Tell me the chemical family {name} belongs to.",
        "I'd like to know which type of element {name} is.",
        "{name} is classified as what kind of element?",
    ),
    "discovery_year": (
        "What year did the discovery of {name} take place?",
        "Tell me the year {name} was first identified.",
        "I'd like to know when {name} was found.",
        "{name} was first identified in which year?",
    ),
    "discoverers": (
        "Which scientist first identified {name}?",
        "Tell me who found {name}.",
        "I'd like to know who is responsible for discovering {name}.",
        "{name} was first identified by whom?",
        "Whose discovery was {name}?",
    ),
    "discovery_location": (
        "In what country was {name} first identified?",
        "Tell me the country where {name} was found.",
        "I'd like to know where in the world {name} was first isolated.",
        "{name} was found in which country?",
    ),
    # cities
    "city_country": (
        "Which country is home to the city {name}?",
        "Tell me which country the city {name} lies in.",
        "I'd like to know the nation that the city {name} belongs to.",
        "The city {name} is located in what country?",
    ),
    "city_population": (
        "How many residents does the city {name} have?",
        "Tell me how populous the city {name} is.",
        "I'd like to know how many people call the city {name} home.",
        "The city {name} is home to how many people?",
    ),
    "city_timezone": (
        "Which IANA time zone applies to the city {name}?",
        "Tell me the timezone of the city {name}.",
        "I'd like to know the tz database zone of the city {name}.",
        "The city {name} keeps time according to which zone?",
    ),
}
