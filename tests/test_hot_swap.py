"""Index hot-swap (the paper's §4.5): the counterfactual world set, and rag-eval / rag-predict of a trained run
answering from another corpus and index, chosen on the command line and checked by the manifests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.config import ConfigError, CounterfactualOptions, DataConfig, section
from rag_lightning.data.prepare_data import ensure_prepared
from rag_lightning.data.world_counterfactual import (
    FILES,
    RELATIONS,
    Change,
    CorpusCity,
    plan_changes,
    rewrite_corpus,
)
from rag_lightning.data.world_templates import the
from rag_lightning.files import sha256_file
from rag_lightning.pipeline import NAMED_INDEX_KEY, swap_index

SMALL = {"min_city_population": 2_000_000, "vocab_size": 1000, "max_train_questions": 500, "max_eval_questions": 50}


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def data_config(cache: Path, name: str, *overrides: str) -> DataConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("prepare", overrides=[f"data={name}", f"paths.cache_dir={cache}", *overrides])
    return section(DataConfig, cfg.data, "data")


# ------------------------------------------------------------------------------------------ the counterfactual world
@pytest.fixture(scope="module")
def counterfactual(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small world set and its counterfactual copy, built through the config as `rag-prepare` builds them."""
    cache = tmp_path_factory.mktemp("cache")
    small = [f"data.world.{k}={v}" for k, v in SMALL.items()]
    manifest = ensure_prepared(data_config(cache, "world_counterfactual", *small))
    world, cf = cache / "data" / "world", Path(manifest["dir"])
    return {
        "cache": cache,
        "small": small,
        "manifest": manifest,
        "world_manifest": json.loads((world / "manifest.json").read_text()),
        "source": {p["id"]: p for p in load_jsonl(world / "corpus.jsonl")},
        "corpus": {p["id"]: p for p in load_jsonl(cf / "corpus.jsonl")},
        "source_test": load_jsonl(world / "test.jsonl"),
        "test": load_jsonl(cf / "test.jsonl"),
        "changed": load_jsonl(cf / FILES["changed"]),
        "original": load_jsonl(cf / FILES["original"]),
        "changes": load_jsonl(cf / FILES["changes"]),
        "world": world,
        "dir": cf,
    }


def test_counterfactual_changes_the_held_out_countries_facts(counterfactual: dict[str, Any]) -> None:
    changes = counterfactual["changes"]
    held_out = {q["subject"] for q in counterfactual["source_test"] if q["subject"].startswith("country-")}
    assert {c["entity"] for c in changes} <= held_out and len({c["entity"] for c in changes}) >= 6
    assert {c["relation"] for c in changes} == {"capital", "population", "area", "calling_code", "tld", "demonym"}
    for c in changes:
        assert c["old"] != c["new"]
        if c["relation"] == "capital":
            assert c["donor"] == c["entity"]  # another city of the country itself
        else:
            assert c["donor"] != c["entity"] and c["donor"] in held_out
        assert c["new_sentence"].endswith(f"{c['new']}.") or f" {c['new']} " in c["new_sentence"]
        if c["relation"] != "tld":  # "Its internet country code top-level domain is .sk." names no country
            assert the(c["title"]) in c["new_sentence"]
        assert c["passage_ids"] and all(p.startswith(f"{c['entity']}-") for p in c["passage_ids"])  # its own pages
    # each cycle relation's new values are other held-out countries' old values (a permutation among them)
    for relation in {c["relation"] for c in changes} - {"capital"}:
        olds = {c["entity"]: c["old"] for c in changes if c["relation"] == relation}
        for c in (c for c in changes if c["relation"] == relation and c["donor"] in olds):
            assert c["new"] == olds[c["donor"]]


def city_passages(corpus: dict[str, dict[str, Any]]) -> list[tuple[str, str, int, str]]:
    """(name, country as written, population, title) of every city, read from its passage's opening."""
    rows = []
    for i, p in corpus.items():
        m = re.match(r"(.+?) is a city in (.+?)\. \1 has a population of ([\d,]+)\.", p["text"])
        if i.startswith("city-") and i.endswith("-0"):
            assert m, p
            rows.append((m[1], m[2], int(m[3].replace(",", "")), p["title"]))
    return rows


def test_a_capital_moves_to_the_countrys_largest_other_city(counterfactual: dict[str, Any]) -> None:
    from rag_lightning.data.world_sources import fold, load_countries

    countries = {f"country-{c.alpha3.lower()}": c for c in load_countries()}
    capitals = {fold(c.capital) for c in countries.values()}
    cities = city_passages(counterfactual["source"])
    held_out = {q["subject"] for q in counterfactual["source_test"] if q["subject"].startswith("country-")}
    moved = {c["entity"]: c for c in counterfactual["changes"] if c["relation"] == "capital"}
    kept = 0
    for entity in sorted(held_out):
        country = countries[entity]
        # its cities in the corpus, largest first, less its capital and any name another city, country or
        # capital shares
        others = sorted(
            (-population, name)
            for name, written, population, title in cities
            if written == the(country.name)
            and title == name
            and fold(name) != fold(country.capital)
            and fold(name) not in capitals
        )
        if others:
            change = moved[entity]
            assert (change["old"], change["new"]) == (country.capital, others[0][1])
            assert change["new_sentence"] == f"The capital of {the(country.name)} is {others[0][1]}."
        else:  # no other city: the capital stays
            kept += 1
            assert entity not in moved
            capital_sentence = f"The capital of {the(country.name)} is {country.capital}."
            assert any(capital_sentence in p["text"] for p in counterfactual["corpus"].values())
    assert moved and set(moved) <= held_out
    assert counterfactual["manifest"]["counts"]["capital_unchanged_no_other_city"] == kept > 0


def test_a_moved_capital_is_tied_to_its_own_country_only(counterfactual: dict[str, Any]) -> None:
    """Consistency: no passage of the counterfactual corpus ties a new capital to another country, and the new
    capital's own city passage names the country it is the capital of."""
    from rag_lightning.data.world_sources import load_countries

    names = [c.name for c in load_countries()]
    corpus = counterfactual["corpus"]
    moved = [c for c in counterfactual["changes"] if c["relation"] == "capital"]
    assert moved
    for c in moved:
        country, new = the(c["title"]), c["new"]
        (own,) = [(written, title) for name, written, _, title in city_passages(corpus) if name == new]
        assert own == (country, new)  # "<new> is a city in <country>.", its passage titled by its bare name
        mentions = re.compile(rf"(?<!\w){re.escape(new)}(?!\w)")
        said = 0
        for p in corpus.values():
            for sentence in re.split(r"(?<=\.) (?=[^\W\d_])", p["text"]):
                if not mentions.search(sentence):
                    continue
                said += 1
                rest = sentence.replace(c["title"], " ")
                others = [n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", rest)]
                # a sentence naming the new capital names no other country
                assert not others, (p["id"], sentence)
        assert said >= 2  # at least the capital sentence and its own city sentence
        assert any(f"The capital of {country} is {new}." in p["text"] for p in corpus.values())


def test_every_passage_stating_an_old_fact_states_the_new_one_and_no_other_passage_changes(
    counterfactual: dict[str, Any],
) -> None:
    source, corpus, changes = counterfactual["source"], counterfactual["corpus"], counterfactual["changes"]
    assert list(corpus) == list(source)  # same ids, same order
    assert all(corpus[i]["title"] == source[i]["title"] for i in source)
    rewritten = {p for c in changes for p in c["passage_ids"]}
    assert rewritten == {i for i in source if corpus[i]["text"] != source[i]["text"]}
    for c in changes:
        stating = {i for i, p in source.items() if c["old_sentence"] in p["text"]}
        assert stating == set(c["passage_ids"]) and stating
        assert all(c["new_sentence"] in corpus[i]["text"] for i in stating)
        # gone, except where another change wrote the same words (a domain passed along the cycle names no country)
        written = {i for d in changes if d["new_sentence"] == c["old_sentence"] for i in d["passage_ids"]}
        assert not any(c["old_sentence"] in p["text"] for i, p in corpus.items() if i not in written)
    for i in rewritten:  # the rewritten passages differ by exactly their changed sentences
        text = source[i]["text"]
        for c in changes:
            if i in c["passage_ids"]:
                text = text.replace(c["old_sentence"], c["new_sentence"])
        assert text == corpus[i]["text"]


def test_qa_gold_answers_are_the_new_facts(counterfactual: dict[str, Any]) -> None:
    corpus, changes = counterfactual["corpus"], counterfactual["changes"]
    new_of = {(c["entity"], c["relation"]): c for c in changes}
    source_rows = {q["id"]: q for q in counterfactual["source_test"]}
    test = counterfactual["test"]
    assert [q["id"] for q in test] == list(source_rows)
    rewritten: list[str] = []
    for q in test:
        old = source_rows[q["id"]]
        change = new_of.get((q["subject"], q["relation"]))
        if change:
            assert q["answers"] == [change["new"]] and q["old_answers"] == [change["old"]]
            assert q["gold_passage_ids"] == old["gold_passage_ids"]
        elif q["relation"] == "capital_of" and (q["subject"], "capital") in new_of:
            # "X is the capital of which country?": X is no capital now, so it asks about the new capital
            moved = new_of[(q["subject"], "capital")]
            assert q["rewritten_from"] == old["question"] and old["question"].count(moved["old"]) == 1
            assert q["question"] == old["question"].replace(moved["old"], moved["new"])
            assert moved["new"] in q["question"]
            assert q["answers"] == old["answers"] and "old_answers" not in q  # the answer did not change
            assert q["gold_passage_ids"] == moved["passage_ids"] and q["gold_passage_ids"]
            assert all(
                f"The capital of {the(moved['title'])} is {moved['new']}." in corpus[p]["text"]
                for p in q["gold_passage_ids"]
            )
            rewritten.append(q["id"])
        else:
            assert q == old  # every other question is the world's own
        for answer in q["answers"]:
            assert any(answer in corpus[p]["text"] for p in q["gold_passage_ids"])
    changed_ids = [q["id"] for q in test if "old_answers" in q]
    assert [q["id"] for q in counterfactual["changed"]] == changed_ids and len(changed_ids) >= 5
    assert counterfactual["original"] == [source_rows[i] for i in changed_ids]
    assert {q["relation"] for q in counterfactual["changed"]} <= set(RELATIONS)
    assert rewritten and rewritten == [q["id"] for q in test if "rewritten_from" in q]
    assert counterfactual["manifest"]["counts"]["questions_rewritten"] == len(rewritten)


def test_counterfactual_build_is_reused_and_leaves_the_world_as_it_was(counterfactual: dict[str, Any]) -> None:
    again = ensure_prepared(data_config(counterfactual["cache"], "world_counterfactual", *counterfactual["small"]))
    assert again["status"] == "reused" and again["files"] == counterfactual["manifest"]["files"]
    world = counterfactual["world"]
    for name, record in counterfactual["world_manifest"]["files"].items():
        assert sha256_file(world / name) == record["sha256"]
    assert counterfactual["manifest"]["source_build_key"] == counterfactual["world_manifest"]["build_key"]
    data = data_config(counterfactual["cache"], "world_counterfactual", *counterfactual["small"])
    assert data.generator_tokenizer == str(world / "generator_tokenizer")  # the trained model's own tokenizer
    assert Path(data.train_file) == world / "train.jsonl" and Path(data.test_file) == counterfactual["dir"] / "test.jsonl"


def test_plan_changes_moves_values_along_one_cycle() -> None:
    from rag_lightning.data.world_sources import load_countries

    countries = [c for c in load_countries() if c.calling_code and c.population and c.area][:5]
    held = {f"country-{c.alpha3.lower()}" for c in countries}
    changes, changed = plan_changes(countries, held, CounterfactualOptions(relations=["calling_code"]))
    by_id = {f"country-{c.alpha3.lower()}": c for c in countries}
    assert len({c.calling_code for c in countries}) == 5
    assert sorted(c.entity for c in changes) == sorted(held)  # five distinct calling codes: all change
    assert sorted(c.new for c in changes) == sorted(c.calling_code for c in countries)
    assert {c.donor for c in changes} == held and all(c.donor != c.entity for c in changes)
    for c in changes:
        assert changed[c.entity].calling_code == by_id[c.donor].calling_code == c.new
        assert changed[c.entity].capital == by_id[c.entity].capital  # only the chosen relation moves
        assert changed[c.entity].population == by_id[c.entity].population
    other_seed = CounterfactualOptions(seed=1, relations=["calling_code"])
    assert plan_changes(countries, held, other_seed)[0] != changes

    # each relation takes the step of its place in options.relations, capital's included: with capital
    # listed first, the second relation's donors are those it has behind any other relation
    def donors(relations: list[str]) -> dict[str, str]:
        planned, _ = plan_changes(countries, held, CounterfactualOptions(relations=relations), cities={})
        return {c.entity: c.donor for c in planned if c.relation == "calling_code"}

    assert donors(["capital", "calling_code"]) == donors(["area", "calling_code"]) != donors(["calling_code"])
    assert donors(["calling_code"]) == {c.entity: c.donor for c in changes}


def test_a_sentence_written_by_one_change_is_not_rewritten_again_by_the_next() -> None:
    """Internet domains pass along the cycle in sentences that do not name their country: the sentence written
    into A's passage ("... is .kz.") is B's old sentence, which only B's passage may have rewritten."""
    sentence = "Its internet country code top-level domain is {}."
    passages = [{"id": "country-a-0", "text": "A. " + sentence.format(".a")},
                {"id": "country-b-0", "text": "B. " + sentence.format(".b")}]
    changes = [Change("country-a", "A", "tld", ".a", ".b", "country-b", sentence.format(".a"), sentence.format(".b")),
               Change("country-b", "B", "tld", ".b", ".a", "country-a", sentence.format(".b"), sentence.format(".a"))]
    corpus, located = rewrite_corpus(passages, changes)
    assert [p["text"] for p in corpus] == ["A. " + sentence.format(".b"), "B. " + sentence.format(".a")]
    assert [c.passage_ids for c in located] == [("country-a-0",), ("country-b-0",)]


def test_plan_changes_moves_a_capital_to_the_countrys_largest_other_city() -> None:
    from rag_lightning.data.world_sources import load_countries
    from rag_lightning.data.world_templates import the

    countries = load_countries()[:5]
    a, b, c, d, e = countries

    def city(n: int, name: str, country: Any, population: int, title: str | None = None) -> CorpusCity:
        return CorpusCity(f"city-{n}", name, title or name, the(country.name), population)

    cities = {
        the(a.name): [city(1, a.capital, a, 900), city(2, "Bigtown", a, 800), city(3, "Smallville", a, 700)],
        the(b.name): [city(4, b.capital, b, 900)],  # no other city: b keeps its capital
        # the larger city shares its name with another city (a disambiguated title): the smaller one is taken
        the(c.name): [
            city(5, "Twin", c, 900, f"Twin, {c.name}"),
            city(6, "Plainford", c, 500),
            city(7, c.capital, c, 100),
        ],
        # a city named like another country's capital is passed over: no other city left, d keeps its capital
        the(d.name): [city(8, d.capital, d, 900), city(9, a.capital, d, 800)],
    }
    held = {f"country-{x.alpha3.lower()}" for x in countries}
    options = CounterfactualOptions(relations=["capital"])
    changes, changed = plan_changes(countries, held, options, cities=cities)
    moved = {x.entity: x for x in changes}
    assert {x: moved[x].new for x in moved} == {
        f"country-{a.alpha3.lower()}": "Bigtown",
        f"country-{c.alpha3.lower()}": "Plainford",
    }
    for x in changes:
        assert x.relation == "capital" and x.donor == x.entity and changed[x.entity].capital == x.new
        assert x.old == next(y.capital for y in countries if y.name == x.title)
        assert x.new_sentence == f"The capital of {the(x.title)} is {x.new}."
    assert all(changed[f"country-{x.alpha3.lower()}"] == x for x in (b, d, e))  # unchanged: no other city
    with pytest.raises(ValueError, match="corpus_cities"):
        plan_changes(countries, held, options)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.counterfactual.relations=[capital,planet]", ["data.counterfactual.relations", "'planet'", "Fix:"]),
        ("data.counterfactual.source_dir=null", ["data.counterfactual.source_dir is not set", "Fix:"]),
    ],
)
def test_bad_counterfactual_options_name_the_key(cli, override: str, expected: list[str]) -> None:
    run = cli("rag-prepare", "data=world_counterfactual", override)
    assert run.code == 2 and "Traceback" not in run.output
    for text in expected:
        assert text in run.err


# ------------------------------------------------------------------------------------------ swap_index (config only)
def saved_run(tmp: Path) -> Any:
    return OmegaConf.create({
        "data": {"name": "world", "corpus_file": str(tmp / "world" / "corpus.jsonl")},
        "index": {k: str(tmp / sub / f"world-minilm{tail}") for k, sub, tail in
                  (("store_dir", "stores", "-ctx128"), ("vectors_dir", "vectors", ""), ("dir", "indexes", "-flat"))},
    })


def test_swap_index_derives_the_new_corpus_directories_from_its_name(tmp_path: Path) -> None:
    saved = saved_run(tmp_path)
    cfg = OmegaConf.merge(saved, {"data": {"name": "news", "corpus_file": str(tmp_path / "news.jsonl")}})
    out = swap_index(saved, cfg, [])
    assert out.index.store_dir == str(tmp_path / "stores" / "news-minilm-ctx128")
    assert out.index.vectors_dir == str(tmp_path / "vectors" / "news-minilm")
    assert out.index.dir == str(tmp_path / "indexes" / "news-minilm-flat")
    assert out[NAMED_INDEX_KEY] == []
    named = swap_index(saved, OmegaConf.merge(cfg, {"index": {"dir": "/elsewhere"}}), ["dir"])
    assert named.index.dir == "/elsewhere" and named[NAMED_INDEX_KEY] == ["dir"]
    same = swap_index(saved, OmegaConf.merge(saved, {}), [])
    assert same.index == saved.index  # no swap: the run's own directories


def test_swap_index_without_a_new_name_is_refused(tmp_path: Path) -> None:
    saved = saved_run(tmp_path)
    cfg = OmegaConf.merge(saved, {"data": {"corpus_file": str(tmp_path / "news.jsonl")}})
    with pytest.raises(ConfigError, match=r"data.name=<name>.*index.store_dir"):
        swap_index(saved, cfg, [])
    odd = OmegaConf.merge(saved, {"index": {"dir": str(tmp_path / "my-index")}})
    cfg = OmegaConf.merge(odd, {"data": {"name": "news", "corpus_file": str(tmp_path / "news.jsonl")}})
    with pytest.raises(ConfigError, match=r"index.dir=.*my-index.*Fix: pass index.dir="):
        swap_index(odd, cfg, [])


def test_a_data_option_on_the_eval_command_line_swaps_the_corpus(tmp_path: Path) -> None:
    """`rag-eval ckpt_path=... data=world_counterfactual`: the option's paths resolve against the call's config and
    its store and index directories are derived from its name."""
    from rag_lightning.pipeline import call_overrides, run_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "config_resolved.yaml").write_text(OmegaConf.to_yaml(saved_run(tmp_path)))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "data=world_counterfactual",
                                         f"paths.cache_dir={tmp_path}"])
    merged = run_config(cfg.ckpt_path, call_overrides(cfg, "data", "model", "task", "index"))
    assert merged.data.name == "world_counterfactual" and merged.data.build == "world_counterfactual"
    assert merged.data.corpus_file == str(tmp_path / "data" / "world_counterfactual" / "corpus.jsonl")
    assert merged.data.counterfactual.source_dir == str(tmp_path / "data" / "world")
    assert merged.index.dir == str(tmp_path / "indexes" / "world_counterfactual-minilm-flat")
    assert merged.index.store_dir == str(tmp_path / "stores" / "world_counterfactual-minilm-ctx128")
    plain = run_config(cfg.ckpt_path, OmegaConf.create({"data": {"name": "???", "test_file": None}}))
    assert plain.data == saved_run(tmp_path).data and plain.index == saved_run(tmp_path).index  # ??? / null: the run's


# ------------------------------------------------------------------------------------------ rag-eval / rag-predict
def swapped_tiny_world(root: Path, tiny_root: Path) -> dict[str, Path]:
    """The tiny world's corpus with every capital moved one country on, and its questions with the new answers."""
    corpus = load_jsonl(tiny_root / "data" / "corpus.jsonl")
    capitals = [p["text"].split("Its capital is ")[1].rstrip(".") for p in corpus if p["id"].startswith("c")]
    moved = capitals[1:] + capitals[:1]
    rows, questions = [], []
    for p in corpus:
        if p["id"].startswith("c"):
            i = int(p["id"][1:])
            p = {**p, "text": f"{p['title']} is a country. Its capital is {moved[i]}."}
            questions.append({"id": f"q{i}", "question": f"What is the capital of {p['title']}?",
                              "answers": [moved[i]], "gold_passage_ids": [p["id"]]})
        rows.append(p)
    root.mkdir(parents=True, exist_ok=True)
    files = {"corpus": root / "corpus.jsonl", "test": root / "test.jsonl"}
    files["corpus"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    files["test"].write_text("".join(json.dumps(r) + "\n" for r in questions[8:]))
    return files


def run_index(tiny_run) -> Path:
    resolved = OmegaConf.load(tiny_run.run_dir / "config_resolved.yaml")
    return Path(resolved.index.dir)


def test_rag_eval_answers_from_the_swapped_corpus_and_leaves_the_runs_index(cli, tmp_path, tiny_run) -> None:
    files = swapped_tiny_world(tmp_path / "swapped", tiny_run.root)
    own = run_index(tiny_run) / "index_manifest.json"
    before = own.read_bytes()
    name = f"swap_{tmp_path.name}"
    out = tmp_path / "eval"
    run = cli("rag-eval", f"ckpt_path={tiny_run.best_checkpoint()}", "accelerator=cpu", f"data.name={name}",
              f"data.corpus_file={files['corpus']}", f"data.test_file={files['test']}", f"hydra.run.dir={out}")
    assert run.code == 0, run.output[-3000:]
    new_texts = {p["id"]: p["text"] for p in load_jsonl(files["corpus"])}
    predictions = load_jsonl(out / "predictions.jsonl")
    read = [p for r in predictions for p in r["passages"]]
    assert read and all(p["text"] == new_texts[p["id"]] for p in read)  # every passage read is the new corpus's
    old_texts = {p["id"]: p["text"] for p in load_jsonl(tiny_run.root / "data" / "corpus.jsonl")}
    assert any(p["text"] != old_texts[p["id"]] for p in read)  # ... including changed ones
    swapped_index = run_index(tiny_run).with_name(run_index(tiny_run).name.replace("jsonl-", f"{name}-", 1))
    manifest = json.loads((swapped_index / "index_manifest.json").read_text())
    assert manifest["corpus_hash"] == sha256_file(files["corpus"])
    assert own.read_bytes() == before  # the run's own index was neither rebuilt nor touched


def test_rag_predict_reads_the_swapped_corpus(cli, tmp_path, tiny_run) -> None:
    files = swapped_tiny_world(tmp_path / "swapped", tiny_run.root)
    out = tmp_path / "predict"
    run = cli("rag-predict", f"ckpt_path={tiny_run.run_dir / 'checkpoints' / 'last.ckpt'}", "accelerator=cpu",
              "question=What is the capital of Hyrule?", f"data.name=swap_{tmp_path.name}",
              f"data.corpus_file={files['corpus']}", f"index.store_dir={tmp_path / 'store'}",
              f"index.vectors_dir={tmp_path / 'vectors'}", f"index.dir={tmp_path / 'index'}",
              f"hydra.run.dir={out}")
    assert run.code == 0, run.output[-3000:]
    new_texts = {p["id"]: p["text"] for p in load_jsonl(files["corpus"])}
    (record,) = load_jsonl(out / "predictions.jsonl")
    assert all(p["text"] == new_texts[p["id"]] for p in record["passages"])
    assert (tmp_path / "index" / "index_manifest.json").is_file()  # built where it was named


def test_swapped_corpus_with_the_runs_own_name_is_refused(cli, tmp_path, tiny_run) -> None:
    files = swapped_tiny_world(tmp_path / "swapped", tiny_run.root)
    run = cli("rag-eval", f"ckpt_path={tiny_run.best_checkpoint()}", "accelerator=cpu",
              f"data.corpus_file={files['corpus']}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert run.code == 2 and "Traceback" not in run.output
    assert "is not the corpus this run was trained with" in run.err and "data.name=<name>" in run.err


def test_an_index_built_for_another_corpus_is_refused_not_rebuilt(cli, tmp_path, tiny_run) -> None:
    files = swapped_tiny_world(tmp_path / "swapped", tiny_run.root)
    own = run_index(tiny_run)
    before = (own / "index_manifest.json").read_bytes()
    run = cli("rag-eval", f"ckpt_path={tiny_run.best_checkpoint()}", "accelerator=cpu", "data.name=swapped",
              f"data.corpus_file={files['corpus']}", f"index.store_dir={tmp_path / 'store'}",
              f"index.dir={own}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert run.code == 2 and "Traceback" not in run.output
    assert f"index.dir={own}" in run.err and "corpus_hash" in run.err and "Fix: point index.dir at a new" in run.err
    assert (own / "index_manifest.json").read_bytes() == before


def test_an_index_built_with_another_encoder_is_refused(cli, tmp_path, tiny_run) -> None:
    files = swapped_tiny_world(tmp_path / "swapped", tiny_run.root)
    other = tmp_path / "other_index"
    data = [o for o in tiny_run.overrides  # the tiny world's files (rag-index has no experiment group)
            if o.startswith(("data.", "paths.")) and not o.startswith("data.corpus_file=")]
    built = cli("rag-index", "data=jsonl", "model/question_encoder=tiny", *data, "data.name=swapped",
                f"data.corpus_file={files['corpus']}", "model.question_encoder.tiny.seed=7",
                f"index.store_dir={tmp_path / 'store'}", f"index.vectors_dir={tmp_path / 'vectors7'}",
                f"index.dir={other}", "index.progress=false")
    assert built.code == 0, built.output[-3000:]
    manifest = (other / "index_manifest.json").read_bytes()
    run = cli("rag-eval", f"ckpt_path={tiny_run.best_checkpoint()}", "accelerator=cpu", "data.name=swapped",
              f"data.corpus_file={files['corpus']}", f"data.test_file={files['test']}",
              f"index.store_dir={tmp_path / 'store_eval'}", f"index.dir={other}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert run.code == 2 and "Traceback" not in run.output
    assert f"index.dir={other}" in run.err and "encoder_fingerprint" in run.err
    assert (other / "index_manifest.json").read_bytes() == manifest


# ------------------------------------------------------------------------------------------ ensure_index, named dirs
def spec_of(root: Path, *overrides: str, named: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """rag-index's retrieval spec for the corpus under root (tiny encoder), with the index keys named."""
    from rag_lightning.config import ContextConfig, IndexConfig, QuestionEncoderConfig
    from rag_lightning.data.gen_tokenizer import load_generator_tokenizer
    from rag_lightning.retrieval.build import RetrievalSpec

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("index", overrides=[
            "data=jsonl", f"data.corpus_file={root / 'corpus.jsonl'}", f"data.train_file={root / 'train.jsonl'}",
            "data.val_file=null", "data.test_file=null", f"data.generator_tokenizer={root / 'tok'}",
            "model/question_encoder=tiny", f"paths.cache_dir={root / 'cache'}", "index.progress=false", *overrides])
    data = section(DataConfig, cfg.data, "data")
    spec = RetrievalSpec(data, section(QuestionEncoderConfig, cfg.model.question_encoder, "model.question_encoder"),
                         section(IndexConfig, cfg.index, "index"), ContextConfig(), cfg.paths.cache_dir, "rag-index",
                         named)
    return spec, load_generator_tokenizer(data.generator_tokenizer)


def test_named_store_and_index_are_used_when_they_fit_and_refused_otherwise(
    tmp_path: Path, synthetic_passages, make_gen_tokenizer
) -> None:
    from rag_lightning.retrieval.build import NamedIndexError, ensure_index

    rows = [{"id": p.id, "title": p.title, "text": p.text} for p in synthetic_passages(24)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "Where is Paris?", "answers": ["France"]}) + "\n")
    make_gen_tokenizer(tmp_path / "tok")
    dirs = [f"index.store_dir={tmp_path / 'store'}", f"index.vectors_dir={tmp_path / 'vectors'}",
            f"index.dir={tmp_path / 'index'}"]
    _, index_dir, _ = ensure_index(*spec_of(tmp_path, *dirs, named=("store_dir", "dir")))  # missing: built there
    manifest = (index_dir / "index_manifest.json").read_bytes()
    ensure_index(*spec_of(tmp_path, *dirs, named=("store_dir", "dir")))  # fits: used as it is
    with pytest.raises(NamedIndexError, match=r"(?s)index.dir=.*encoder_fingerprint.*Fix: point index.dir"):
        ensure_index(*spec_of(tmp_path, *dirs, "model.question_encoder.tiny.seed=7", named=("store_dir", "dir")))
    assert (index_dir / "index_manifest.json").read_bytes() == manifest  # refused, not rebuilt
    rows[0]["text"] = "A changed passage."
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(NamedIndexError, match=r"(?s)index.store_dir=.*corpus_hash"):
        ensure_index(*spec_of(tmp_path, *dirs, named=("store_dir", "dir")))
    new_store = f"index.store_dir={tmp_path / 'store2'}"
    with pytest.raises(NamedIndexError, match=r"(?s)index.dir=.*corpus_hash"):
        ensure_index(*spec_of(tmp_path, new_store, *dirs[1:], named=("store_dir", "dir")))
    assert (index_dir / "index_manifest.json").read_bytes() == manifest
    ensure_index(*spec_of(tmp_path, new_store, *dirs[1:]))  # not named: a cache, rebuilt for the new corpus
    assert (index_dir / "index_manifest.json").read_bytes() != manifest
