"""The arguments of the named sources and the DataModules, and the data fingerprints they yield, stay
as recorded in ``tests/data/config_arguments.json``.

The named sources forward their location arguments (``**location``) to
:class:`~antidote_pl.data.paper.PaperSource` and the DataModules their loader settings
(``**settings``) to :class:`~antidote_pl.training.batcher.SFTBatcher`, so each argument is declared
once (issue #23). Two things must not move with that:

* the parser's view: every argument still listed, with its type, default and a description of its
  own in ``--help`` (not a "See ..." pointer);
* the sources' :meth:`~antidote_pl.data.records.Source.spec` and ``describe()`` for every source of
  the tiny and paper configs, as the CLI builds them: both are recorded in stage metadata and cache
  keys, so a change would invalidate every recorded run.

The JSON file was written by the code before the change. Regenerate it only for an intended change
of arguments or fingerprints: ``python tests/test_config_arguments.py``.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser
from test_configs import COMPOSED, CONFIGS, SOURCE_FRAGMENTS, rel, resolve

from antidote_pl.data.records import Source, source_from_spec

GOLDEN = Path(__file__).parent / "data" / "config_arguments.json"
CLASSES = [
    "antidote_pl.data.paper.BeaverTails",
    "antidote_pl.data.paper.SST2",
    "antidote_pl.data.paper.AGNews",
    "antidote_pl.data.paper.GSM8K",
    "antidote_pl.data.paper.AlpacaEval",
    "antidote_pl.data.paper.SafetyTunedLlamas",
    "antidote_pl.training.datamodules.SFTDataModule",
    "antidote_pl.training.datamodules.AlignmentDataModule",
    "antidote_pl.training.datamodules.HarmfulFinetuneDataModule",
]
WORLDS = ("tiny", "paper")


def _import(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def parser_arguments(path: str) -> dict[str, dict[str, str]]:
    """``name -> {type, default, required, help}`` as the CLI's parser sees the class."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(_import(path), "x")
    out = {}
    for action in parser._actions:
        name = action.dest.removeprefix("x.")
        if action.dest.startswith("x.") and not name.endswith("help"):
            out[name] = {
                "type": repr(getattr(action, "_typehint", None)),
                "default": repr(action.default),
                "required": action.required,
                "help": str(action.help),
            }
    return out


def _sources(node, found: dict, where: str = "") -> None:
    """Every ``{class_path, init_args}`` of a record source in a resolved config, by dotted place."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _sources(item, found, f"{where}[{i}]")
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("class_path"), str) and "init_args" in node:
        try:
            cls = _import(node["class_path"])
        except (ImportError, AttributeError, ValueError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, Source):
            found[where] = node
            return
    for key, value in node.items():
        _sources(value, found, f"{where}.{key}" if where else key)


def _cases() -> list[list[Path]]:
    """The tiny and paper stage configs, and each fragment composed over its base."""
    cases = [[c] for c in CONFIGS] + [[base, fragment] for base, fragment in COMPOSED]
    return [case for case in cases if rel(case[0]).split("/")[1] in WORLDS]


def source_fingerprints() -> dict[str, dict]:
    """``"<configs> :: <place>" -> {spec, describe}`` of every source the CLI builds from them."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in _cases():
            found: dict = {}
            _sources(resolve(*case), found)
            for where, spec in found.items():
                source = source_from_spec(spec, where)
                out[f"{' + '.join(rel(c) for c in case)} :: {where}"] = _entry(source)
    for fragment in SOURCE_FRAGMENTS:
        out[rel(fragment)] = _entry(source_from_spec(yaml.safe_load(fragment.read_text()), rel(fragment)))
    return out


def _entry(source: Source) -> dict:
    # Through JSON, as the stage metadata and the cache keys hold them.
    return json.loads(json.dumps({"spec": source.spec(), "describe": source.describe()}, default=str))


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("path", CLASSES, ids=lambda p: p.rsplit(".", 1)[1])
def test_every_argument_is_listed_as_before_with_its_own_description(golden, path):
    now, before = parser_arguments(path), golden["arguments"][path]
    assert sorted(now) == sorted(before)
    for name, arg in now.items():
        assert {k: v for k, v in arg.items() if k != "help"} == before[name], name
        assert arg["help"].strip() and not arg["help"].startswith("See "), (name, arg["help"])


def test_source_specs_and_descriptions_are_unchanged(golden):
    now = source_fingerprints()
    before = {key: golden["sources"][i] for key, i in golden["source_at"].items()}
    assert sorted(now) == sorted(before)
    changed = [key for key in before if now[key] != before[key]]
    assert not changed, f"{len(changed)} sources changed, first {changed[0]}: {now[changed[0]]}"


def test_a_forwarded_argument_given_in_python_is_in_the_spec_by_name():
    """Built in Python with only some arguments, a named source's spec still names every one."""
    from antidote_pl.data.paper import GSM8K, AlpacaEval

    spec = GSM8K("test", local_path="test.jsonl", limit=3).spec()["init_args"]
    assert spec == {
        "split": "test",
        "hub_path": "openai/gsm8k",
        "hub_name": "main",
        "local_path": "test.jsonl",
        "data_files": None,
        "revision": None,
        "cache_dir": None,
        "limit": 3,
        "offset": 0,
    }
    alpaca = AlpacaEval("test", cache_dir="c").spec()["init_args"]
    assert sorted(alpaca) == sorted(
        ["part", "train_size", "test_start", "hub_path", "data_files", "local_path", "hub_name", "cache_dir"]
    )
    assert source_from_spec(AlpacaEval("test", cache_dir="c").spec(), "s").describe() == (
        AlpacaEval("test", cache_dir="c").describe()
    )


@pytest.mark.parametrize("path", [c for c in CLASSES if ".paper." in c], ids=lambda p: p.rsplit(".", 1)[1])
def test_a_named_source_spec_holds_exactly_the_arguments_the_parser_lists(path):
    """What a subclass forwards (jsonargparse reads its code) and what its spec names (at run time,
    minus ``fixed_arguments``) must agree, or a config could set an argument its spec drops."""
    cls = _import(path)
    required = {"BeaverTails": {"split": "30k_train", "safe": False}, "SafetyTunedLlamas": {"path": "x.json"}}
    spec = cls(**required.get(cls.__name__, {})).spec()
    assert sorted(spec["init_args"]) == sorted(parser_arguments(path))


def main() -> None:
    """Rewrites the JSON file from the current code (for an intended change only)."""
    # Descriptions are not recorded: they may improve; the test only asks that each has one.
    arguments = {
        c: {n: {k: v for k, v in a.items() if k != "help"} for n, a in parser_arguments(c).items()}
        for c in CLASSES
    }
    sources = source_fingerprints()
    # Most sources recur over many configs: each distinct one is written once, and named by index.
    distinct = sorted({json.dumps(e, sort_keys=True) for e in sources.values()})
    index = {e: i for i, e in enumerate(distinct)}
    at = {key: index[json.dumps(e, sort_keys=True)] for key, e in sources.items()}
    data = {"arguments": arguments, "sources": [json.loads(e) for e in distinct], "source_at": at}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}: {len(at)} sources ({len(distinct)} distinct), {len(arguments)} classes")


if __name__ == "__main__":
    main()
