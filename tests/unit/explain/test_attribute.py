"""Token attributions on tiny Llamas built from config (no Ray, CPU): integrated gradients'
completeness against the model's own log-probabilities, and a model-randomisation sanity
check (Adebayo et al. 2018) with teeth: a model trained for a few hundred steps to copy the
one marked token of a sequence puts its highest attribution on that token under every
method (SHAP included), and the same architecture re-initialised does not; over spans, the
span that holds the marked token gets the highest."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from raylab import models
from raylab.explain import explain_ids, summary

pytest.importorskip("captum")

from raylab.explain import attribute  # noqa: E402  (a test may reach inside its own stage)

FILL = list(range(10, 18))  # ordinary tokens
MARKED = list(range(30, 38))  # one of these per sequence: the token to copy
PAD = 0  # the byte tokenizer's pad: the baseline ("absent") token


@pytest.fixture(scope="module")
def tok():
    return models.build_byte_tokenizer()


def sample(rng: random.Random, pads: bool = False) -> tuple[list[int], int, int]:
    """(six tokens, the marked one, its position); with `pads`, ordinary tokens are dropped to
    the pad token at random, so training shows the model what 'absent' looks like."""
    xs = [rng.choice(FILL) for _ in range(6)]
    pos, marked = rng.randrange(6), rng.choice(MARKED)
    xs[pos] = marked
    if pads:
        xs = [PAD if i != pos and rng.random() < 0.2 else t for i, t in enumerate(xs)]
    return xs, marked, pos


def copier(tok, seed: int, steps: int):
    """tiny-llama trained `steps` AdamW steps to emit the marked token next (0: as initialised)."""
    torch.manual_seed(seed)
    model = models.build_tiny_model("tiny-llama", tok, seed=seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = None
    for _ in range(steps):
        batch = [sample(rng, pads=True) for _ in range(32)]
        logits = model(input_ids=torch.tensor([b[0] for b in batch])).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([b[1] for b in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss


def test_integrated_gradients_are_complete_within_the_reported_delta(tok, copiers):
    model = copiers[0]
    rng = random.Random(5)
    with torch.no_grad():  # what it answers to the baseline itself (all pads): a guess among MARKED
        guess = int(model(input_ids=torch.tensor([[PAD] * 6])).logits[0, -1].argmax())
    # its answer on three prompts whose answer is not that guess, so the baseline changes the answer
    cases = [(ids, [marked]) for ids, marked, _ in (sample(rng) for _ in range(12)) if marked != guess][:3]
    all_deltas = []
    for prompt, target in cases:
        rows, deltas = attribute.integrated_gradients(model, prompt, target, n_steps=64, baseline_id=PAD)
        assert len(rows) == len(deltas) == 1 and len(rows[0]) == len(prompt)
        gap = (attribute.token_logprob(model, prompt, target[0])
               - attribute.token_logprob(model, [PAD] * len(prompt), target[0]))
        assert abs(gap) > 0.5  # the baseline changes the answer: completeness is not 0 == 0
        assert abs(sum(rows[0]) - gap) <= abs(deltas[0]) + 1e-4  # completeness, up to the delta captum reports
        assert abs(deltas[0]) <= 0.05 * abs(gap), (deltas[0], gap)  # 64 steps are enough: within 5 %
        all_deltas += deltas
    # negative control: the delta measures the path integral's error, so one step reports more of it
    coarse = [attribute.integrated_gradients(model, p, t, n_steps=1, baseline_id=PAD)[1][0] for p, t in cases]
    assert sum(map(abs, coarse)) > 5 * sum(map(abs, all_deltas))


@pytest.mark.skipif(importlib.util.find_spec("shap") is None, reason="shap: the explain extra on Python >= 3.11")
def test_shap_values_add_up_to_the_log_odds_gap_and_one_token_is_exact(tok, copiers):
    import math

    def log_odds(ids, token):  # what shap's TeacherForcing scores: logit(p)
        lp = attribute.token_logprob(copiers[0], ids, token)
        return lp - math.log1p(-math.exp(lp))

    rng = random.Random(3)
    for prompt, marked, _ in [sample(rng) for _ in range(2)] + [([MARKED[2]], MARKED[2], 0)]:  # the last: one token
        result = explain_ids(copiers[0], tok, prompt, [marked], "shap", n_steps=1, samples=1, evals=64, baseline="pad")
        gap = log_odds(prompt, marked) - result["base_values"][0]
        assert result["base_values"][0] == pytest.approx(log_odds([PAD] * len(prompt), marked), abs=1e-3)
        assert abs(gap) > 0.5  # the masked prompt scores differently: efficiency is not 0 == 0
        assert sum(result["attributions"][0]) == pytest.approx(gap, abs=1e-3)  # efficiency (Shapley, Owen)


METHODS = ["integrated_gradients", "feature_ablation", "shapley_sampling"]
if importlib.util.find_spec("shap") is not None:  # the explain extra installs it on Python >= 3.11
    METHODS.append("shap")


@pytest.mark.parametrize("method", METHODS)
def test_a_trained_copier_attributes_to_the_marked_token_and_a_random_one_does_not(tok, method, copiers):
    trained, fresh = copiers
    rng = random.Random(99)
    prompts = [sample(rng) for _ in range(8)]

    def hits(model) -> int:
        n = 0
        for ids, marked, pos in prompts:
            result = explain_ids(model, tok, ids, [marked], method, n_steps=32, samples=10, evals=64, baseline="pad")
            row = result["attributions"][0]
            assert len(row) == len(ids)
            n += max(range(len(row)), key=row.__getitem__) == pos
        return n

    assert hits(trained) >= 7
    assert hits(fresh) <= 4  # model randomisation: chance is 8/6 hits, so the check above can fail


@pytest.mark.parametrize("method", ["feature_ablation", "shapley_sampling"])
def test_over_spans_the_one_holding_the_marked_token_comes_first(tok, method, copiers):
    trained, fresh = copiers
    rng = random.Random(7)
    prompts = [sample(rng) for _ in range(8)]
    thirds = [{"start": 2 * j, "end": 2 * j + 2, "text": "", "tokens": [2 * j, 2 * j + 1]} for j in range(3)]

    def hits(model) -> int:
        n = 0
        for ids, marked, pos in prompts:
            result = explain_ids(model, tok, ids, [marked], method, n_steps=1, samples=5, baseline="pad",
                                 features=thirds)
            row = result["attributions"][0]
            assert len(row) == len(result["input_totals"]) == 3 and result["input_spans"] == thirds
            n += max(range(3), key=row.__getitem__) == pos // 2
        return n

    assert hits(trained) >= 7
    assert hits(fresh) <= 5  # the control: chance is 8/3 hits


@pytest.fixture(scope="module")
def copiers(tok):
    trained, loss = copier(tok, seed=0, steps=200)
    assert loss < 0.1  # it learned the copy (else the sanity check would test nothing)
    return trained, copier(tok, seed=1, steps=0)[0]


def test_the_summary_lists_the_top_inputs_per_output_token(tok):
    result = {"model": "widgets/1", "method": "feature_ablation", "parameters": {"baseline": "pad token"},
              "input_tokens": ["a", "b", "\n"], "output_tokens": ["x", "y"], "attributions": [[0.1, 0.9, -0.2],
              [0.5, 0.0, 0.7]], "input_totals": [0.6, 0.9, 0.5], "seconds": 0.01, "output_text": "xy"}
    lines = summary(result, k=1).splitlines()
    assert "b@1 +0.900" in lines[2] and "\\n@2 +0.700" in lines[3] and "b@1 +0.900" in lines[4]
    assert "a@0" not in "\n".join(lines[2:])  # negative control: k=1 leaves the others out
