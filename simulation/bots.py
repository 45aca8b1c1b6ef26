"""Simulated participants that go through the real flow, over HTTP and websockets.

Like oTree's browser bots, a bot does what a person's browser does: it opens the
invite link, consents, follows its own websocket, posts its opinion with the CSRF
token, waits for the statements to be pushed, rates and ranks them.

Opinions are written by the generator from a persona (a stance on the question,
at some strength). Ratings come from a simulated judgement that uses no reward
model (see `simulated_agreement`), so a pilot can measure the reward model rather
than echo it. docs/bots.md describes both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlparse

import aiohttp

if TYPE_CHECKING:
    from modeling.generation.transformers_backend import TransformersGenerator

_VIEW_RE = re.compile(r'<section id="main"[^>]*data-view="(?P<view>[a-z_]+)"')
_STATEMENT_RE = re.compile(
    r'data-candidate="(?P<id>\d+)".*?<blockquote>(?P<text>.*?)</blockquote>', re.DOTALL
)
_CODE_RE = re.compile(r'class="completion-code">(?P<code>[^<]+)<')
_PREFERENCE_RE = re.compile(r'id="preference-(?P<a>\d+)-(?P<b>\d+)"')
_OPINION_RE = re.compile(r'id="opinion-(?P<id>\d+)".*?<blockquote class="opinion">(?P<text>.*?)</blockquote>', re.DOTALL)
_ATTENTION_RE = re.compile(r'id="attention-form".*?please choose “[^”]*” \((?P<expected>\d)\)', re.DOTALL)
_WORD_RE = re.compile(r"[a-z']+")
# Negations are kept: "should not" and "should" are opposite stances.
_STOPWORDS = frozenset(
    "a an the and or but of to in on for with at by from as is are was were be been being it its this that these "
    "those we you they he she i my our your their his her them us me do does did so if than then there here which who "
    "whom what when where why how all any both each few more most other some such only own same too very can will "
    "just should would could may might must shall also into about over under again further once".split()
)


@dataclass(frozen=True)
class Persona:
    """A simulated participant's position: +1 agrees with the affirming statement, -1 with the negating one.

    Stored on the participant (Participant.simulated_persona, via `as_record`), so the export says which rows
    are simulated and what each bot was told to be."""

    stance: int
    strength: float  # 0..1: how firmly they hold it
    attentive: bool = True  # False: answers the attention item wrongly (to pilot the exclusion rules)

    def describe(self) -> str:
        return "strongly" if self.strength >= 0.7 else "somewhat"

    def as_record(self) -> dict[str, object]:
        return {"kind": "bot", "stance": self.stance, "strength": self.strength, "attentive": self.attentive}


def make_personas(rng: random.Random, count: int, *, inattentive_share: float = 0.0) -> list[Persona]:
    # Alternate stances so every group disagrees, as the paper's groups were chosen to.
    first = rng.choice([1, -1])
    personas = [Persona(stance=first if i % 2 == 0 else -first, strength=round(rng.uniform(0.4, 1.0), 2)) for i in range(count)]
    if inattentive_share > 0:  # drawn only when asked for, so pilots without it keep their sequences
        personas = [dataclasses.replace(p, attentive=rng.random() >= inattentive_share) for p in personas]
    return personas


def template_opinions(*, affirming: str, negating: str, personas: Sequence[Persona]) -> list[str]:
    """Opinions without a language model (simulate_cohort --opinions template): the persona's own claim, said
    with its strength. For pilots of the protocol, where what the opinions say matters less than that the
    whole flow runs; the default writes them with the generator (`write_opinions`)."""
    return [
        f"{affirming if p.stance > 0 else negating} I {p.describe()} believe this, and it is the main reason for my view."
        for p in personas
    ]


def persona_messages(question: str, statement: str, persona: Persona) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a member of the public taking part in a discussion group."},
        {
            "role": "user",
            "content": (
                f"Question: {question}\n"
                f"You {persona.describe()} believe this: \"{statement}\"\n"
                "In two or three sentences, in the first person, give your opinion on the question and your main reason."
            ),
        },
    ]


def write_opinions(
    generator: TransformersGenerator,
    *,
    question: str,
    affirming: str,
    negating: str,
    personas: Sequence[Persona],
    seed: int,
    max_new_tokens: int = 80,
) -> list[str]:
    """One opinion per persona, all sampled in one batch by the generator."""
    from modeling.generation.base import SamplingParams

    prompts = [
        generator.render_chat(persona_messages(question, affirming if p.stance > 0 else negating, p))
        for p in personas
    ]
    completions = generator.sample_prompts(
        prompts, sampling=SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens), seed=seed
    )
    opinions = []
    for persona, completion in zip(personas, completions):
        text = " ".join(completion.text.split())
        statement = affirming if persona.stance > 0 else negating
        # A tiny model sometimes rambles off-topic or stops early; the persona's own claim keeps
        # the opinion on its side, as a person's would be.
        if len(text) < 40:
            text = f"{statement} {text}".strip()
        opinions.append(text[:900])
    return opinions


def content_words(text: str) -> set[str]:
    return {w for w in _WORD_RE.findall(text.lower()) if w not in _STOPWORDS}


def _overlap(a: set[str], b: set[str]) -> float:
    return len(a & b) / math.sqrt(len(a) * len(b)) if a and b else 0.0


def simulated_agreement(
    *, statement: str, own_opinion: str, persona: Persona, affirming: str, negating: str, rng: random.Random
) -> int:
    """Stance agreement plus noise, from word overlap alone (no embedding, no reward model).

    lean = overlap(statement, own side) - overlap(statement, other side), where a side is
    the claim it makes (the affirming or negating statement) and, for the own side, the
    bot's own opinion. Agreement = 4 + 3 * strength * tanh(4 * lean) + N(0, 0.6), rounded
    and clipped to 1..7.
    """
    own_claim, other_claim = (affirming, negating) if persona.stance > 0 else (negating, affirming)
    words = content_words(statement)
    lean = _overlap(words, content_words(own_claim + " " + own_opinion)) - _overlap(words, content_words(other_claim))
    score = 4 + 3 * persona.strength * math.tanh(4 * lean) + rng.gauss(0, 0.6)
    return int(min(7, max(1, round(score))))


def simulated_quality(*, statement: str, rng: random.Random) -> int:
    """Readable length scores well: 12-80 words is what a group statement needs."""
    words = len(statement.split())
    score = 4 + (1.5 if 12 <= words <= 80 else -1.5) + rng.gauss(0, 0.7)
    return int(min(7, max(1, round(score))))


# --- The bot itself ---------------------------------------------------------------------


class BotError(RuntimeError):
    pass


@dataclass
class BotResult:
    label: str
    participant_code: str = ""
    opinion_sent_at: float = 0.0
    statements_seen_at: float = 0.0
    completion_code: str = ""
    ratings: dict[int, tuple[int, int]] = field(default_factory=dict)
    preferences: dict[tuple[int, int], int] = field(default_factory=dict)
    opinion_ratings: dict[int, int] = field(default_factory=dict)
    attention_answer: int | None = None
    steps: list[str] = field(default_factory=list)  # the rating-page steps this bot answered, in order


class Bot:
    # The rating page's steps, in the order a person meets them; each answers what the page shows and
    # does nothing when the experiment does not enable it. A new protocol step (e.g. critique rounds)
    # is one more method here and one more name in this list.
    RATING_STEPS: tuple[str, ...] = ("rate_statements", "answer_preferences", "rate_opinions", "answer_attention_check")

    def __init__(self, *, base_url: str, label: str, persona: Persona, opinion: str, rng: random.Random, timeout: float) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.label = label
        self.persona = persona
        self.opinion = opinion
        self.rng = rng
        self.timeout = timeout
        self.result = BotResult(label=label)
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.socket: aiohttp.ClientWebSocketResponse | None = None
        self.main_html = ""
        self.affirming = ""
        self.negating = ""

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        await self.session.close()

    def _csrf(self) -> str:
        for cookie in self.session.cookie_jar:
            if cookie.key == "csrftoken":
                return cookie.value
        raise BotError("no CSRF cookie")

    async def _post(self, path: str, data: dict[str, str]) -> str:
        headers = {"X-CSRFToken": self._csrf(), "HX-Request": "true", "Referer": self.base_url}
        async with self.session.post(urljoin(self.base_url, path), data=data, headers=headers) as response:
            body = await response.text()
            if response.status >= 400:
                raise BotError(f"{self.label}: POST {path} -> {response.status}: {body[:200]}")
            return body

    async def join(self, join_path: str) -> None:
        url = urljoin(self.base_url, join_path) + f"?participant_label={self.label}"
        async with self.session.get(url) as response:
            if response.status != 200:
                raise BotError(f"{self.label}: invite link -> {response.status}")
        headers = {"X-CSRFToken": self._csrf(), "Referer": url}
        async with self.session.post(url, data={"consent": "yes", "participant_label": self.label}, headers=headers) as response:
            if response.status != 200 or "/p/" not in response.url.path:
                raise BotError(f"{self.label}: join -> {response.status} at {response.url}")
            self.result.participant_code = response.url.path.rstrip("/").rsplit("/", 1)[-1]
        parsed = urlparse(self.base_url)
        ws_url = f"{'wss' if parsed.scheme == 'https' else 'ws'}://{parsed.netloc}/ws/p/{self.result.participant_code}/"
        self.socket = await self.session.ws_connect(ws_url, origin=f"{parsed.scheme}://{parsed.netloc}", heartbeat=20)

    def view(self) -> str:
        match = _VIEW_RE.search(self.main_html)
        return match.group("view") if match else ""

    async def wait_for(self, *views: str) -> str:
        assert self.socket is not None
        deadline = time.monotonic() + self.timeout
        while self.view() not in views:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BotError(f"{self.label}: waited {self.timeout:.0f}s for {views}, still at {self.view() or 'nothing'}")
            message = await self.socket.receive(timeout=remaining)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise BotError(f"{self.label}: socket closed ({message.type.name}) while waiting for {views}")
            start = message.data.find('<section id="main"')
            if start >= 0:
                self.main_html = message.data[start:]
        return self.view()

    def _judge(self, text: str) -> int:
        return simulated_agreement(
            statement=text, own_opinion=self.opinion, persona=self.persona, affirming=self.affirming, negating=self.negating, rng=self.rng
        )

    async def _answer(self, path: str, data: dict[str, str]) -> None:
        """Post one answer; the page's new state (the #main section) comes back in the response."""
        body = await self._post(f"p/{self.result.participant_code}/{path}", data)
        start = body.find('<section id="main"')
        if start >= 0:
            self.main_html = body[start:]

    # --- The rating page's steps ---------------------------------------------------------------------

    async def rate_statements(self) -> None:
        statements = [(int(m.group("id")), html.unescape(m.group("text"))) for m in _STATEMENT_RE.finditer(self.main_html)]
        if not statements:
            raise BotError(f"{self.label}: rating view without statements")
        for candidate_id, text in statements:
            agreement, quality = self._judge(text), simulated_quality(statement=text, rng=self.rng)
            await self._answer(f"rate/{candidate_id}/", {"agreement": str(agreement), "quality": str(quality)})
            self.result.ratings[candidate_id] = (agreement, quality)

    async def answer_preferences(self) -> None:
        """Head-to-head: in each pair from different arms, prefer the statement it agreed with more (quality, then
        a coin, breaking ties)."""
        for match in list(_PREFERENCE_RE.finditer(self.main_html)):
            a, b = int(match.group("a")), int(match.group("b"))
            score_a, score_b = self.result.ratings.get(a, (0, 0)), self.result.ratings.get(b, (0, 0))
            preferred = a if score_a > score_b else b if score_b > score_a else self.rng.choice([a, b])
            await self._answer("prefer/", {"candidate_a": str(a), "candidate_b": str(b), "preferred": str(preferred)})
            self.result.preferences[(a, b)] = preferred

    async def rate_opinions(self) -> None:
        """Best-human-opinion protocol: the other members' opinions, judged like statements."""
        for match in list(_OPINION_RE.finditer(self.main_html)):
            opinion_id, agreement = int(match.group("id")), self._judge(html.unescape(match.group("text")))
            await self._answer(f"opinion-rating/{opinion_id}/", {"agreement": str(agreement)})
            self.result.opinion_ratings[opinion_id] = agreement

    async def answer_attention_check(self) -> None:
        match = _ATTENTION_RE.search(self.main_html)
        if match is None:
            return
        expected = int(match.group("expected"))
        # An inattentive persona picks another answer, so a pilot can exercise the exclusion rule.
        answer = expected if self.persona.attentive else (expected % 7) + 1
        await self._answer("attention/", {"answer": str(answer)})
        self.result.attention_answer = answer

    async def rank_statements(self) -> None:
        if 'id="ranking-form"' not in self.main_html:
            raise BotError(f"{self.label}: the ranking is not open after every step was answered: {self.main_html[:300]}")
        # Rank by agreement, quality breaking ties, as a person would.
        order = sorted(self.result.ratings, key=lambda cid: (-self.result.ratings[cid][0], -self.result.ratings[cid][1], cid))
        await self._answer("rank/", {f"rank_{cid}": str(position + 1) for position, cid in enumerate(order)})

    async def run(self, *, join_path: str, affirming: str, negating: str) -> BotResult:
        self.affirming, self.negating = affirming, negating
        await self.join(join_path)
        view = await self.wait_for("opinions", "done", "dropped")
        if view != "opinions":
            return self.result
        body = await self._post(f"p/{self.result.participant_code}/opinion/", {"text": self.opinion})
        if 'data-view="opinions"' in body:
            raise BotError(f"{self.label}: opinion refused: {body[:300]}")
        self.result.opinion_sent_at = time.monotonic()
        view = await self.wait_for("rating", "done", "not_rating", "dropped")
        self.result.statements_seen_at = time.monotonic()
        if view != "rating":
            return self.result
        for step in self.RATING_STEPS:
            await getattr(self, step)()
            self.result.steps.append(step)
        await self.rank_statements()
        await self.wait_for("done")
        match = _CODE_RE.search(self.main_html)
        self.result.completion_code = match.group("code") if match else ""
        return self.result


@dataclass
class GroupPlan:
    join_path: str
    question: str
    affirming: str
    negating: str
    labels: list[str]
    personas: list[Persona]
    opinions: list[str]
    seed: int


async def run_group(*, base_url: str, plan: GroupPlan, timeout: float) -> list[BotResult]:
    rng = random.Random(plan.seed)
    bots = [
        Bot(base_url=base_url, label=label, persona=persona, opinion=opinion, rng=random.Random(rng.getrandbits(32)), timeout=timeout)
        for label, persona, opinion in zip(plan.labels, plan.personas, plan.opinions)
    ]
    try:
        return list(
            await asyncio.gather(*(bot.run(join_path=plan.join_path, affirming=plan.affirming, negating=plan.negating) for bot in bots))
        )
    finally:
        await asyncio.gather(*(bot.close() for bot in bots), return_exceptions=True)
