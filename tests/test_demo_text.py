"""`factedit demo`'s table cells: one line each, cut before control tokens that a tokenizer
adds without marking them special (Gemma's "<start_of_image>" decodes as plain text)."""

from types import SimpleNamespace

from factedit.cli import _first_line


def test_first_line_cuts_newlines_and_control_tokens():
    model = SimpleNamespace(tokenizer=SimpleNamespace(
        get_added_vocab=lambda: {"<start_of_image>": 255999, "<pad>": 0, "[multimodal]": 7}))
    assert _first_line(model, " Rome, Italy<start_of_image>Rome") == "Rome, Italy"
    assert _first_line(model, " Paris, France.\n\nThe city") == "Paris, France."
    assert _first_line(model, "\n Berlin\nGermany") == "Berlin"
    assert _first_line(model, " a [multimodal] b") == "a [multimodal] b"
