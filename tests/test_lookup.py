"""The detail lookups written under a question (experts/lookup.py), the detail lines they read
(experts/context.py), the colour naming (experts/colour.py) and OCR's text blocks
(experts/ocr/layout.py), on findings, pixels and boxes made by hand."""
from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from experts.colour import main_colour
from experts.context import as_prose, is_detail, without_details
from experts.detection import describe_colours
from experts.lookup import check, colour_check, naming_check
from experts.ocr import describe_blocks
from experts.ocr.layout import TextBox, TextLine, text_blocks

TAGGED = ("[detection] Objects detected: 2 people (left), 1 motorcycle (centre).\n"
          "[detection] Colours: people: 1 black, 1 white; motorcycle: red.\n"
          '[ocr] "Musee du LOUVRE"\n'
          '[ocr] "Theatre"\n'
          '[ocr] "du PALAIS-ROYAL"\n'
          '[ocr] "World Health"\n'
          '[ocr] "Organization"\n'
          '[ocr] "BASRURKAR MARKET\'"\n'
          '[ocr] Text blocks: "Theatre du PALAIS-ROYAL"; "World Health Organization"; '
          '"BASRURKAR MARKET\' SPEED LIMIT".')


def test_detail_lines_are_kept_apart_and_left_out_of_what_a_prompt_shows() -> None:
    assert is_detail("[detection] Colours: bus: blue.") and is_detail('Text blocks: "A B".')
    assert not is_detail("[detection] Objects detected: 1 bus (centre).") and not is_detail('[ocr] "Colours:"')
    prose = as_prose(TAGGED).splitlines()
    assert prose[0] == "Objects detected: 2 people (left), 1 motorcycle (centre)."
    assert prose[1] == "Colours: people: 1 black, 1 white; motorcycle: red."  # its own line, not in the sentence
    assert prose[2].startswith('Text written in the image: "Musee du LOUVRE", "Theatre"') and "blocks" not in prose[2]
    assert prose[3].startswith('Text blocks: "Theatre du PALAIS-ROYAL"')
    for form in (TAGGED, as_prose(TAGGED)):
        shown = without_details(form)
        assert "Colours" not in shown and "Text blocks" not in shown and "Objects detected" in shown
        assert '"Theatre"' in shown


@pytest.mark.parametrize("findings", [TAGGED, as_prose(TAGGED)], ids=["tagged", "prose"])
def test_a_question_about_colour_gets_the_colour_of_the_thing_it_names(findings: str) -> None:
    assert check("What colour is the motorcycle?", findings) == "Findings check: the motorcycle is red."
    assert check("What color is the motorbike's tank?", findings) is None  # no motorbike listed by that name
    assert check("Is the motorcycle red?", findings) == "Findings check: the motorcycle is red."
    assert check("What colours are the men wearing?", findings) == "Findings check: the people: 1 black, 1 white."
    assert check("What colour is the sky?", findings) is None  # two kinds listed, none of them the sky
    assert check("Is the motorcycle fast?", findings) is None  # not about colour


def test_with_one_kind_of_object_what_colour_is_it_gets_that_kind() -> None:
    one = "[detection] Objects detected: 1 cat (centre).\n[detection] Colours: cat: orange."
    assert colour_check("What colour is it?", one) == "Findings check: the cat is orange."
    assert colour_check("What colour is the sky?", one) is None  # names something else, that nothing lists
    assert colour_check("What colour is the text?", one) is None
    assert colour_check("What colour is it?", "[detection] Objects detected: 1 cat (centre).") is None  # no colours


@pytest.mark.parametrize("findings", [TAGGED, as_prose(TAGGED)], ids=["tagged", "prose"])
def test_a_question_after_a_name_gets_the_text_that_names_that_kind(findings: str) -> None:
    # the kind's word alone ("Theatre") names nothing: its block does
    assert check("Which theatre is named on the bottom sign?", findings) == \
        'Findings check: the text naming the theatre: "Theatre du PALAIS-ROYAL".'
    assert check("What is the name of the organization?", findings) == \
        'Findings check: the text naming the organization: "World Health Organization".'
    # the shortest text that names it, and not the longer block that holds it too
    assert check("What is the name of the market?", findings) == \
        'Findings check: the text naming the market: "BASRURKAR MARKET".'
    assert check("Which museum do the signs point to?", findings) is None  # "museum" is not written there
    assert check("What kind of vehicle is this?", findings) is None
    assert check("What words are on the sign?", findings) is None
    assert check("What does the top sign say?", findings) is None


def test_lines_alone_serve_when_there_are_no_blocks() -> None:
    lines = '[ocr] "CITY MARKET"\n[ocr] "OPEN 9-5"'
    assert naming_check("Which market is it?", lines) == 'Findings check: the text naming the market: "CITY MARKET".'
    assert naming_check("Which market is it?", '[ocr] "MARKET"\n[ocr] "OPEN"') is None


def test_presence_questions_keep_their_check_and_ignore_detail_lines() -> None:
    assert check("Is there a motorcycle?", TAGGED) == "Findings check: yes (motorcycle: 1 motorcycle)."
    # a colours line naming a bus does not make a bus listed
    only_colours = "[detection] Objects detected: 1 car (centre).\n[detection] Colours: bus: blue."
    assert check("Is there a bus?", only_colours) == "Findings check: no (bus not listed)."
    assert check("What colour is the bus?", "") is None and check("What colour is the bus?", None) is None


def test_describe_colours_counts_each_kinds_colours() -> None:
    found = [{"label": "person", "score": 0.9, "colour": "black"}, {"label": "bus", "score": 0.95, "colour": "blue"},
             {"label": "person", "score": 0.8, "colour": "white"}, {"label": "person", "score": 0.7, "colour": "black"}]
    assert describe_colours(found) == "Colours: people: 2 black, 1 white; bus: blue."
    assert describe_colours([]) == ""


def _box(colour: tuple[int, int, int], background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    image = Image.new("RGB", (100, 80), background)
    ImageDraw.Draw(image).rectangle((20, 10, 80, 70), fill=colour)
    return image


@pytest.mark.parametrize("rgb, name", [((220, 20, 30), "red"), ((30, 60, 200), "blue"), ((40, 170, 60), "green"),
                                       ((240, 220, 30), "yellow"), ((245, 140, 20), "orange"),
                                       ((120, 70, 30), "brown"), ((250, 250, 250), "white"), ((15, 15, 20), "black"),
                                       ((128, 128, 128), "grey"), ((150, 40, 190), "purple")])
def test_main_colour_names_the_middle_of_the_box(rgb: tuple[int, int, int], name: str) -> None:
    # the box's edges are background: only its middle counts
    on_grey = _box(rgb, background=(128, 128, 128) if name != "grey" else (255, 255, 255))
    assert main_colour(on_grey, (10, 0, 90, 80)) == name
    assert main_colour(Image.new("RGB", (10, 10), rgb)) == name  # no box: the whole image


def _line(text: str, x0: float, y0: float, x1: float, y1: float) -> TextLine:
    box = TextBox(text, ((x0, y0), (x1, y0), (x1, y1), (x0, y1)), 0.9)
    return TextLine(text, (box,))


def test_text_blocks_join_a_line_set_right_under_another_of_its_size() -> None:
    lines = [_line("World Health", 100, 100, 190, 118),
             _line("Organization", 102, 120, 188, 138),  # right under it: one block
             _line("Clean your hands", 100, 200, 260, 218),  # far below: a block of its own
             _line("small print", 100, 221, 140, 227),  # under it, but a third of its height
             _line("LEFT | RIGHT", 100, 229, 260, 247)]  # two signs side by side stay alone
    blocks = text_blocks(lines)
    assert [[line.text for line in block] for block in blocks] == [
        ["World Health", "Organization"], ["Clean your hands"], ["small print"], ["LEFT | RIGHT"]]
    assert describe_blocks(blocks) == 'Text blocks: "World Health Organization".'
    assert describe_blocks(text_blocks(lines[2:3])) == ""
    beside = [_line("MARKET", 0, 0, 50, 10), _line("OPEN", 300, 11, 340, 21)]  # no shared columns
    assert len(text_blocks(beside)) == 2
