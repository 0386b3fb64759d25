"""The hallucinated-entity rate on hand-written cases: which words are entities, which are supported."""
import pytest

from llmcycle.evaluation import faithfulness as F
from llmcycle.evaluation.metrics import compute_all, higher_is_better

SCARF = ("#Person1#: Excuse me, do you have this scarf in black?\n"
         "#Person2#: We have it in black and red. The black one costs 18 dollars.\n"
         "#Person1#: By card, please.")
DOCTOR = ("#Person1#: Hello, this is Rosa. I need to see Doctor Grace.\n"
          "#Person2#: Doctor Grace can see you on Friday at noon.\n"
          "#Person1#: I have had a back pain for three days.")
LEXICON = F.name_lexicon([SCARF, DOCTOR, "Rosa makes an appointment with Doctor Grace on Friday.",
                          "Ben sees Doctor Hugo on Monday at 8 pm."])


def test_lexicon_holds_words_written_capitalised_mid_sentence():
    # Rosa, Grace, Doctor, Friday, Hugo, Monday: capitalised inside sentences; Hello / Excuse / We /
    # The / By start a sentence or a turn; "I" is a pronoun; Ben only ever starts a sentence
    assert LEXICON == {"rosa", "grace", "doctor", "friday", "hugo", "monday"}


def test_numbers_names_and_what_is_not_an_entity():
    text = "#Person1# buys a yellow lamp for 38 dollars by card, says I, and meets Zorbak."
    # the speaker tag, "I", colours and nouns are not entities; 38 is; Zorbak is capitalised mid-sentence
    assert F.entities(text, LEXICON) == ["38", "zorbak"]
    # a lowercased output still has its names, through the lexicon; "ben" started a sentence only
    assert F.entities("ben makes an appointment with doctor hugo on monday at 8 pm", LEXICON) == \
        ["doctor", "hugo", "monday", "8"]


def test_invented_entities_are_those_the_input_lacks():
    assert F.hallucinated("#Person1# buys a yellow lamp for 38 dollars by card.", SCARF, LEXICON) == ["38"]
    assert F.hallucinated("#Person1# buys a black scarf for 18 dollars by card.", SCARF, LEXICON) == []
    # case-insensitive names, numbers by value: "3" is supported by "three"
    assert F.hallucinated("rosa sees doctor grace on friday after 3 days", DOCTOR, LEXICON) == []
    assert F.hallucinated("Rosa sees Doctor Hugo on Monday", DOCTOR, LEXICON) == ["hugo", "monday"]


def test_number_forms():
    assert F.entities("It costs 1,000 dollars or 9.50 euros at 10:30 for twenty people.") == \
        ["1000", "9.5", "10:30", "20"]
    assert F.hallucinated("forty euros", "That is 40 euros.") == []


def test_scores_average_over_outputs_with_entities():
    outputs = ["Rosa sees Doctor Hugo on Monday",      # rosa initial -> lexicon; 4 entities, 2 invented
               "#Person1# buys a black scarf.",        # no entities: left out of the mean, counted
               "#Person1# pays 18 dollars."]           # 1 entity, supported
    summary, per = F.scores(outputs, [DOCTOR, SCARF, SCARF], LEXICON)
    assert per["hallucinated_entity_rate"] == [0.5, None, 0.0]
    assert per["invented_entities"] == [["hugo", "monday"], [], []]
    assert summary["hallucinated_entity_rate"] == pytest.approx(0.25)
    assert summary["outputs_without_entities"] == 1
    assert summary["hallucinated_entities"] == 2
    assert summary["entities_per_output"] == pytest.approx(5 / 3)


def test_compute_all_reports_it_with_an_interval_for_summaries_and_qa_only():
    preds = ["Rosa sees Doctor Hugo on Monday", "#Person1# pays 18 dollars."]
    refs = [["Rosa sees Doctor Grace on Friday."], ["#Person1# pays 18 dollars by card."]]
    summary, per = compute_all("summarization", preds, refs, sources=[DOCTOR, SCARF])
    assert summary["hallucinated_entity_rate"] == pytest.approx(0.25)
    low, high = summary["hallucinated_entity_rate_ci_low"], summary["hallucinated_entity_rate_ci_high"]
    assert 0.0 <= low <= 0.25 <= high <= 0.5
    assert higher_is_better("hallucinated_entity_rate") is False
    classified, _ = compute_all("classification", ["a"], [["a"]], sources=["x"])
    assert "hallucinated_entity_rate" not in classified
    without, _ = compute_all("summarization", preds, refs)  # no sources: not scored
    assert "hallucinated_entity_rate" not in without


def test_no_entities_anywhere_gives_none_not_zero():
    summary, _ = F.scores(["a nice chat", "they talk"], ["x", "y"], set())
    assert summary["hallucinated_entity_rate"] is None
    assert summary["outputs_without_entities"] == 2


def test_names_known_from_the_training_data_are_caught_in_lowercase_outputs():
    # "anna" is nowhere in the evaluated examples, so only a lexicon from the training data knows it
    preds, refs = ["anna sees doctor grace"], [["Rosa sees Doctor Grace."]]
    alone, _ = compute_all("summarization", preds, refs, sources=[DOCTOR])
    assert alone["hallucinated_entity_rate"] == 0.0  # doctor, grace: supported; anna: not recognised
    with_train, per = compute_all("summarization", preds, refs, sources=[DOCTOR], lexicon={"anna"})
    assert with_train["hallucinated_entity_rate"] == pytest.approx(1 / 3)
    assert per["invented_entities"] == [["anna"]]


def test_project_lexicon_reads_train_and_eval(tmp_path):
    import json

    from llmcycle.project.config import load_project
    from llmcycle.evaluation.settings import name_lexicon

    rows = [{"d": "#Person1#: It is Anna. We meet on Friday.", "s": "Anna books it."},
            {"d": "#Person1#: I see Doctor Hugo today.", "s": "They meet."}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "llmcycle.yaml").write_text("project: {task: summarization}\n"
                                            "data: {train: t.jsonl, input: d, target: s, eval_size: 1}\n")
    assert name_lexicon(load_project(tmp_path / "llmcycle.yaml")) == {"anna", "friday", "doctor", "hugo"}
