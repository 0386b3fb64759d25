"""Text from data and models printed literally: markup-like brackets and control sequences."""
from rich.console import Console

from llmcycle.evaluation.compare import print_side_by_side
from llmcycle.core.textsafe import as_text, visible

NASTY = "[INST] hi [/INST] [bold]loud[/bold] [link=http://x]x[/link] \x1b[31mred\x1b[0m \x1b]0;title\x07 \x9b2J"


def test_control_characters_become_visible_one_for_one():
    assert visible("a\x1b[31mb\x07\x7f\x9bc") == "a\u241b[31mb\u2407\u2421\ufffdc"
    assert visible("line\n\ttab") == "line\n\ttab"  # layout characters stay
    assert len(visible(NASTY)) == len(NASTY)
    assert as_text("[/INST]").plain == "[/INST]"


def test_side_by_side_prints_markup_and_escapes_as_text():
    console = Console(record=True, width=200, force_terminal=True, color_system="truecolor")
    example = {"index": 0, "where": "data/[/x].jsonl:1", "input": NASTY, "references": ["[/INST] ref"],
               "outputs": {"[red]run[/red] (ab12)": "\x1b[2J Ben [/INST] paid 40 dollars", "other (cd34)": ""},
               "invented": {"[red]run[/red] (ab12)": ["ben", "40"]}}
    print_side_by_side([example], console)  # raised MarkupError on `[/INST]` before
    raw = console.export_text(styles=True, clear=False)
    assert "\x1b[2J" not in raw and "\x1b]0;" not in raw and "\x9b" not in raw  # nothing reaches the terminal
    text = console.export_text()
    for literal in ("[INST] hi [/INST]", "[bold]loud[/bold]", "[link=http://x]x[/link]", "\u241b[31mred",
                    "[/INST] ref", "[red]run[/red] (ab12)", "data/[/x].jsonl:1", "\u241b[2J Ben [/INST] paid"):
        assert literal in text, literal


def test_marked_spans_stay_on_the_entities_after_a_control_character():
    from llmcycle.evaluation.compare import marked

    out = marked("\x1b[1m Ben paid 40", ["ben", "40"])
    styled = [out.plain[span.start:span.end] for span in out.spans]
    assert styled == ["Ben", "40"]
