"""The filters on fixed inputs, each with the control that shows it does not drop everything."""

from __future__ import annotations

from raylab import config
from raylab.synth.filters import Contamination, Filters, Novelty, evolution_failure

EVAL = ("Acme customers who return a damaged widget within thirty days of delivery receive a full refund "
        "to their original payment method")


def _filters(eval_texts=()):
    cfg = config.SynthFiltersConfig()
    return Filters(cfg, config.PiiConfig(), list(eval_texts))


def _novelty(**kw):
    f = config.SynthFiltersConfig(**kw)
    return Novelty(f.novelty, f.num_perm, f.bands, f.ngram, recall_sample=50)


def test_two_paraphrases_keep_one_and_two_different_prompts_keep_both():
    n = _novelty()
    first = "How many business days does Acme take to ship a widget order?"
    paraphrase = "How many business days does Acme need to ship a widget order?"
    assert n.rouge_l(first, paraphrase) >= 0.7
    assert n.offer(first)[0] is True
    kept, similar, score = n.offer(paraphrase)
    assert (kept, similar) == (False, first) and score >= 0.7
    # negative control: a different question is kept beside the first
    assert n.offer("Which payment methods does the Acme online store accept?")[0] is True
    assert n.kept == [first, "Which payment methods does the Acme online store accept?"]


def test_only_candidates_are_compared_and_the_sample_measures_their_recall():
    n = _novelty()
    texts = [f"Write a short poem about the number {i} and the colour {c}." for i, c in
             zip(range(12), ["red", "blue", "green", "amber", "teal", "pink"] * 2, strict=True)]
    texts += ["Translate 'good morning' into French.", "List three prime numbers above fifty.",
              "Explain why the sky looks blue at noon."]
    for t in texts:
        n.offer(t)
    # the poems are near-duplicates of each other; the three other tasks share no band with them
    assert len(n.kept) < len(texts)
    assert n.compared < len(texts) * (len(texts) - 1) // 2
    recall = n.recall()
    assert recall["sample"] == len(texts) and recall["similar_pairs"] > 0
    assert 0 < recall["recall"] <= 1


def test_pii_is_redacted_and_its_count_kept():
    f = _filters()
    out = f.redact("Write to jane.doe@example.com or call about order 12.")
    assert "jane.doe@example.com" not in out and "<EMAIL>" in out
    assert f.pii["EMAIL"] == 1 and f.redacted_texts == 1
    assert f.redact("No personal data here.") == "No personal data here."  # control
    assert f.redacted_texts == 1


def test_a_refusal_is_dropped_and_an_answer_is_not():
    f = _filters()
    assert f.check("What is the capital of France?", "I'm sorry, as an AI I cannot answer that.") == "refusal"
    assert f.check("What is the capital of France?", "Paris.") is None


def test_an_example_copied_from_the_evaluation_texts_is_contaminated():
    f = _filters([EVAL])
    copied = "What is the return policy? " + EVAL.lower() + "."
    assert f.check("What is the return policy?", copied) == "contaminated"
    # control: the same topic in other words shares no 13-gram
    assert f.check("What is the return policy?", "Damaged widgets can be sent back within a month for a refund.") is None


def test_short_evaluation_texts_count_whole_and_very_short_ones_not_at_all():
    c = Contamination(["Which colour is the Acme logo?", "yes"], 13)
    assert c.hit("Tell me: which colour is the Acme logo? It is red.")
    assert not c.hit("yes, the logo is red")      # "yes" alone would match everything
    assert not c.hit("Which colour is the widget?")


def test_length_limits():
    f = _filters()
    assert f.check("Q", "An answer.") == "length"      # below min_chars=2
    assert f.check("Q?", "x" * 9000) == "length"
    assert f.check("Q?", "An answer.") is None


MARKERS = config.EvolInstructConfig(seeds=["x"]).copy_markers


def test_an_evolution_that_copies_the_prompt_or_adds_nothing_is_eliminated():
    original = "Explain what a purchase order is."
    assert evolution_failure(original, "#Rewritten Prompt#: Explain what a purchase order is, in detail.",
                             MARKERS) == "copies_prompt"
    assert evolution_failure(original, "In the given prompt, explain purchase orders to a clerk.", MARKERS) == (
        "copies_prompt")
    assert evolution_failure(original, "What is a purchase order? Explain.", MARKERS) == "no_gain"  # reordered
    assert evolution_failure(original, "explain what a purchase order is", MARKERS) == "no_gain"
    # control: a real in-depth evolution adds a constraint
    assert evolution_failure(original, "Explain what a purchase order is to a new employee, in under 50 words, "
                             "with one example from a stationery supplier.", MARKERS) is None


def test_an_evolved_answer_that_is_a_short_refusal_or_only_stop_words_is_eliminated():
    f = _filters()
    assert f.answer_failure("I'm sorry, I cannot help with that request.", 80) == "refusal"
    assert f.answer_failure("It is what it is, and so on...", 80) == "no_content"
    assert f.answer_failure("?!", 80) == "no_content"
    # controls: a real answer, and a long answer that apologises once (the paper: sorry AND short)
    assert f.answer_failure("A purchase order lists the goods, prices and delivery date agreed.", 80) is None
    long = "I'm sorry for the confusion earlier. " + "A purchase order confirms goods and prices. " * 12
    assert f.answer_failure(long, 80) is None
    assert f.answer_failure(long, 200) == "refusal"
