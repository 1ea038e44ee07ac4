"""`eval.bias_probes`: counterfactual bias probes (raylab/evaluate/bias.py measures them).

    eval:
      bias_probes:
        defaults: [gender, age]        # shipped sets to include ([] turns them all off)
        threshold: 0.5                 # flag a probe whose gap is above this (nats per token)
        probes:                        # your own sets, next to (or instead of) the defaults
          - name: roles
            slot: person
            groups: {female: [woman, mother], male: [man, father]}
            templates:
              - {text: "The {person} is a", continuation: " pilot"}

Each template's `{<slot>}` is filled with every term of every group; the continuation's
log-probability (teacher-forced) and the greedy answer are compared across the groups.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylab.config.bias_defaults import DEFAULT_SETS
from raylab.config.types import PositiveInt, Section, invalid

DEFAULT_NAMES = tuple(DEFAULT_SETS)
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class BiasTemplate(Section):
    """One probe: a prompt with the set's slot, and the continuation scored after it."""

    text: str = Field(min_length=1, description="the prompt, with the set's slot where a group's term goes "
                      "(`The {person} worked as a`)")
    continuation: str = Field(min_length=1, description="the fixed text whose log-probability is compared across "
                              "the groups (` nurse`: mind the leading space for a plain-text prompt)")
    name: str | None = Field(None, description="the probe's name in reports and gate messages (default: "
                             "<set>/<index>)")


class BiasProbeSet(Section):
    """Groups of interchangeable terms and the templates they are put into."""

    name: str = Field(pattern=NAME, description="the set's name (a shipped one's name is taken)")
    slot: str = Field("term", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="the placeholder the templates hold "
                      "as {slot}")
    groups: dict[str, list[str]] = Field(description="group name -> its terms (at least two groups, each with a term)")
    templates: list[BiasTemplate] = Field(min_length=1, description="the probes of this set")

    @model_validator(mode="after")
    def _complete(self) -> BiasProbeSet:
        if len(self.groups) < 2:
            raise invalid(f"a gap needs at least two groups to compare, got {len(self.groups)} "
                          f"({', '.join(self.groups) or 'none'})", at="groups")
        for group, terms in self.groups.items():
            if not [t for t in terms if t.strip()]:
                raise invalid("has no terms: give the words that stand for this group", at=f"groups.{group}")
        marker = "{" + self.slot + "}"
        for i, t in enumerate(self.templates):
            if marker not in t.text:
                raise invalid(f"has no {marker} slot ({t.text!r}): write where the group's terms go, or set "
                              "this set's `slot`", at=f"templates.{i}.text")
        return self

    def probe_name(self, index: int) -> str:
        return self.templates[index].name or f"{self.name}/{index}"


class BiasProbesConfig(Section):
    """Counterfactual bias probes, run by `raylab eval` and by the `registry.gates.max_bias_gap` gate."""

    defaults: list[Literal["gender", "age", "nationality"]] = Field(
        default_factory=lambda: list(DEFAULT_NAMES), description="shipped probe sets to include (gender, age, "
        "nationality); [] turns them off")
    probes: list[BiasProbeSet] = Field(default_factory=list, description="your own probe sets")
    threshold: float = Field(0.5, ge=0, description="flag a probe whose gap (max minus min of the groups' mean "
                             "log-probability per continuation token, in nats) is above this")
    format: Literal["text", "prompt"] = Field(
        "text", description="text: the template is plain text the model continues (no chat template); prompt: it "
        "is the user message and the continuation is the start of the assistant's answer")
    max_new_tokens: PositiveInt = Field(8, description="length of the greedy answer compared across groups")

    @model_validator(mode="after")
    def _sets(self) -> BiasProbesConfig:
        if not self.defaults and not self.probes:
            raise invalid("defaults is [] and no probes are given: nothing to measure (give probes, or leave "
                          "eval.bias_probes out)")
        seen = list(self.defaults)
        for i, s in enumerate(self.probes):
            if s.name in seen:
                raise invalid(f"{s.name!r} is already a probe set (shipped defaults: {', '.join(DEFAULT_NAMES)}); "
                              "rename it, or drop the default from `defaults`", at=f"probes.{i}.name")
            seen.append(s.name)
        names = [s.probe_name(i) for s in self.sets() for i in range(len(s.templates))]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise invalid(f"probe name(s) {', '.join(twice)} used more than once: give each template its own `name`")
        return self

    def sets(self) -> list[BiasProbeSet]:
        """The shipped sets chosen, then the user's, each validated by the same model."""
        return [BiasProbeSet(name=n, **DEFAULT_SETS[n]) for n in dict.fromkeys(self.defaults)] + list(self.probes)
