"""One mediation step: generate candidates, predict agreement, rank by welfare.

A pure function over plain data, so the Celery task stays thin and the whole
step is testable without Django.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from .generation.base import Candidate, GenerationRequest, Generator, SamplingParams
from .generation.quality import carried_payloads, find_injection
from .reward.base import AgreementQuery, RewardModel
from .welfare import WelfareResult, rank_candidates


class PipelineStage(StrEnum):
    GENERATING = "generating"
    RANKING = "ranking"


class HasText(Protocol):
    """A written statement: a generated Candidate, or a stored one."""

    @property
    def text(self) -> str: ...


# on_stage(stage, done, total)
StageCallback = Callable[[PipelineStage, int, int], None]


@dataclass
class MediationResult:
    candidates: list[Candidate]
    # predicted[p][c]: predicted agreement (1-7) of participant p with candidate c.
    predicted: list[list[float]]
    welfare: WelfareResult
    reward_model: str
    reward_model_version: str
    # Candidates that repeat what an opinion tried to make the mediator say (a URL, a shouted slogan,
    # "end with ..."): ranked after every other candidate, so they are shown only if nothing else is left.
    demoted: list[int] = field(default_factory=list)
    # The sampling settings the generator was asked for (temperature, top-p, token budget).
    sampling: SamplingParams = field(default_factory=SamplingParams)


def demote_injected(candidates: Sequence[HasText], opinions: Sequence[str], ranking: list[int]) -> tuple[list[int], list[int]]:
    """(new ranking, demoted indices): candidates carrying a payload of an opinion's injection attempt go last.

    The reward model cannot be trusted with these: the injecting member's "opinion" is the payload, so
    a statement that repeats it may even be predicted to please them. Only real attempts count
    (modeling.generation.quality.find_injection), not an opinion that merely mentions a website.
    """
    payloads = [payload for opinion in opinions if (attempt := find_injection(opinion)) for payload in attempt.payloads]
    if not payloads:
        return ranking, []
    demoted = [index for index in ranking if carried_payloads(candidates[index].text, payloads)]
    if not demoted:
        return ranking, []
    return [index for index in ranking if index not in demoted] + demoted, demoted


def mediate(
    *,
    question: str,
    opinions: Sequence[str],
    n: int,
    seed: int,
    generator: Generator,
    reward_model: RewardModel,
    welfare_method: str = "utilitarian",
    welfare_alpha: float = 1.0,
    welfare_tie_break: str = "index",
    sampling: SamplingParams | None = None,
    on_stage: StageCallback | None = None,
) -> MediationResult:
    if len(opinions) < 1:
        raise ValueError("mediate needs at least one opinion")
    notify = on_stage or (lambda stage, done, total: None)

    notify(PipelineStage.GENERATING, 0, n)
    request = GenerationRequest(
        question=question, opinions=list(opinions), n=n, seed=seed, sampling=sampling or SamplingParams()
    )
    candidates = generator.generate(request, on_progress=lambda done, total: notify(PipelineStage.GENERATING, done, total))

    notify(PipelineStage.RANKING, 0, len(candidates))
    # Every (participant, candidate) pair in one batch: one forward pass, not P x N.
    queries = [
        AgreementQuery(question=question, opinion=opinion, statement=candidate.text)
        for opinion in opinions
        for candidate in candidates
    ]
    flat = reward_model.predict(queries)
    predicted = [flat[p * len(candidates) : (p + 1) * len(candidates)] for p in range(len(opinions))]
    # The round's seed also seeds the tie-break, so a round's ranking can be reproduced.
    welfare = rank_candidates(predicted, method=welfare_method, alpha=welfare_alpha, tie_break=welfare_tie_break, seed=seed)
    welfare.ranking, demoted = demote_injected(candidates, opinions, welfare.ranking)
    notify(PipelineStage.RANKING, len(candidates), len(candidates))
    return MediationResult(
        candidates=candidates,
        predicted=predicted,
        welfare=welfare,
        reward_model=reward_model.name,
        reward_model_version=reward_model.version,
        demoted=demoted,
        sampling=request.sampling,
    )
