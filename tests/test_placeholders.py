"""The one placeholder syntax: ``{name}`` filled by whoever knows the name, the rest left alone."""

from __future__ import annotations

import pytest

from antidote_pl.errors import ConfigError
from antidote_pl.utils.placeholders import fill_placeholders, placeholders_in


def test_fills_only_the_names_given_and_leaves_the_others():
    text = "outputs/{model}/{task}/seed{seed}/finetune"
    assert fill_placeholders("f", text, {"seed": 3}) == "outputs/{model}/{task}/seed3/finetune"
    assert (
        fill_placeholders("f", text, {"model": "m", "task": "t", "seed": 0}) == "outputs/m/t/seed0/finetune"
    )


def test_lists_fill_item_by_item_and_other_values_pass_through():
    assert fill_placeholders("f", ["a{seed}", "b", "{seed}{seed}"], {"seed": 1}) == ["a1", "b", "11"]
    assert fill_placeholders("f", 5, {"seed": 1}) == 5
    assert fill_placeholders("f", None, {"seed": 1}) is None


def test_braces_that_name_nothing_known_are_kept():
    assert fill_placeholders("f", "x/{other}/{seed}", {"seed": 2}) == "x/{other}/2"
    assert placeholders_in("x/{other}/{seed}/{model}") == {"seed", "model"}


@pytest.mark.parametrize(
    ("name", "hint"), [("task", "set run.task"), ("seed", "give the pipeline a list of seeds")]
)
def test_an_unknown_value_names_the_field_the_value_and_how_to_set_it(name, hint):
    with pytest.raises(ConfigError, match=rf"out\[1\].*\{{{name}\}}.*{hint}"):
        fill_placeholders("out", ["fine", f"o/{{{name}}}"], {name: None})
