"""The findings check written under yes/no and how-many questions (experts/presence.py), on findings
written by hand in both forms the prompt uses: the context block's tagged lines and prose."""
from __future__ import annotations

import pytest

from experts.context import as_prose
from experts.presence import asked_things, check, listed_items, object_words, singular

TAGGED = ("[detection] Objects detected: 4 people (2 left, 1 centre, 1 right), 1 bus (centre), 1 tie (bottom centre).\n"
          "[classification] Image class (ImageNet classifier): minibus 0.59, tiger cat 0.10\n"
          '[ocr] "SPEED LIMIT"')


@pytest.mark.parametrize("word, expected", [("buses", "bus"), ("people", "person"), ("men", "man"),
                                            ("cats", "cat"), ("glass", "glass"), ("boxes", "box"),
                                            ("ladies", "lady"), ("bus", "bus")])
def test_singular(word: str, expected: str) -> None:
    assert singular(word) == expected


def test_the_vocabulary_holds_what_the_experts_can_name() -> None:
    words = object_words()
    assert {"bus", "tie", "cat", "dog", "person", "cup", "camera", "spoon", "text"} <= words
    assert not {"photo", "picture", "image", "wearing", "front", "the"} & words


def test_things_asked_come_only_from_yes_no_and_how_many_questions() -> None:
    assert asked_things("Is one of the men wearing a tie?") == ["tie"]  # what comes after the verb
    assert asked_things("Does the bus have a red stripe?") == []  # a stripe: nothing an expert names
    assert asked_things("Are there people in front of the bus?") == ["person", "bus"]
    assert asked_things("How many buses are there?") == ["bus"]
    assert asked_things("Is there a dog in the photo?") == ["dog"]
    assert asked_things("What colour is the bus?") == []
    assert asked_things("Is it raining?") == []  # nothing an expert names
    assert asked_things("Is the bus blue?") == []  # about the bus's looks, not whether it is there
    assert asked_things("Is this animal a cat?") == ["cat"]
    assert asked_things("Can you see a dog?") == ["dog"]


@pytest.mark.parametrize("findings", [TAGGED, as_prose(TAGGED)], ids=["tagged", "prose"])
def test_each_thing_is_looked_up_in_the_findings(findings: str) -> None:
    assert check("Is there a bus in the picture?", findings) == "Findings check: yes (bus: 1 bus)."
    assert check("Is one of the men wearing a tie?", findings) == "Findings check: yes (tie: 1 tie)."
    assert check("Are there people near the bus?", findings) == "Findings check: yes (person: 4 people; bus: 1 bus)."
    assert check("Is there a dog?", findings) == "Findings check: no (dog not listed)."
    assert check("Is there a dog or a tie?", findings) == "Findings check: dog: not listed; tie: 1 tie."  # a choice
    assert check("Is there any text?", findings) == "Findings check: yes (text: text was read)."
    assert check("How many people are there?", findings) == "Findings check: 4 people."
    assert check("How many dogs are there?", findings) == "Findings check: no dog listed."
    assert check("What does the sign say?", findings) is None


def test_a_head_word_names_the_thing_and_nothing_is_a_no() -> None:
    assert check("Is there a cat?", TAGGED) == "Findings check: yes (cat: tiger cat 0.10)."  # the class's head word
    assert check("Is there a van?", TAGGED) == "Findings check: no (van not listed)."
    nothing = "[detection] No objects detected.\n[ocr] No text found."
    assert listed_items(nothing) == []
    assert check("Is there any text?", nothing) == "Findings check: no (text not listed)."
    assert check("Is there a bus?", "") is None and check("Is there a bus?", None) is None


def test_a_caption_or_a_line_the_user_wrote_is_read_word_by_word() -> None:
    edited = "There is a red car on the left and a woman with an umbrella.\n[ocr] \"EXIT\""
    assert check("Is there a car?", edited) == "Findings check: yes (car: mentioned)."
    assert check("Is there a woman?", edited) == "Findings check: yes (woman: mentioned)."
    assert check("Is there a bus?", edited) == "Findings check: no (bus not listed)."
    caption = "[caption] Caption (assembled from the other experts): a minibus and two dogs."
    assert check("Is there a dog?", caption) == "Findings check: yes (dog: mentioned)."
