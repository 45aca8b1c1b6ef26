"""Simulated participants for the Habermas Machine protocol (docs/habermas-protocol.md).

A ProtocolBot is a Bot (simulation/bots.py) that follows whatever screen it is shown until it is done: the
position before its opinion, the opinion, rating and ranking, a critique of the winning statement in each
critique round, the human mediator's statement when the draw makes it the mediator, and the closing questions
(the final preference and the position after).

What it writes beyond its opinion is simple and deterministic, not a model's: a critique that asks the
statement to give its own side more room (its persona's stance), and, as mediator, a statement that sets the
members' first sentences side by side. Preferences and ranks come from the same simulated judgement as the
plain bots' ratings (`bots.simulated_agreement`), so a pilot still measures the mediator, not an echo of it.
"""

from __future__ import annotations

import asyncio
import html
import random
import re
import time

import aiohttp

from . import bots

_OPINION_BLOCK_RE = re.compile(r'<blockquote class="opinion">(?P<text>.*?)</blockquote>', re.DOTALL)
_CLOSING_RE = re.compile(r'name="preferred" value="(?P<id>\d+)"[^>]*> Statement \d+<blockquote>(?P<text>.*?)</blockquote>', re.DOTALL)
_PREVIOUS_RE = re.compile(r'id="previous-statement">(?P<text>.*?)</blockquote>', re.DOTALL)

# Screens that ask the bot to do something; on any other it waits for the next push.
_ACTIONS = {"position_before", "opinions", "rating", "closing", "done", "dropped", "released"}


def _first_sentence(text: str) -> str:
    sentence = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0].strip()
    return sentence.rstrip(".!?")


def persona_position(persona: bots.Persona) -> int:
    """A persona's place on the 1 (negating) ... 7 (affirming) scale: further out the firmer it is."""
    offset = 3 if persona.strength >= 0.8 else 2 if persona.strength >= 0.55 else 1
    return 4 + persona.stance * offset


def persona_strength(persona: bots.Persona) -> int:
    return max(1, min(7, round(1 + persona.strength * 6)))


def write_critique(*, persona: bots.Persona, affirming: str, negating: str) -> str:
    side = affirming if persona.stance > 0 else negating
    return (
        f"The statement is fair to the other side, but it should give more room to the view that {_first_sentence(side).lower()}, "
        f"which I hold {persona.describe()}."
    )


def write_statement(opinions: list[str]) -> str:
    """The bot mediator's statement: the members' first sentences side by side."""
    views = "; ".join(_first_sentence(text).lower() for text in opinions if text.strip())
    return f"We have heard several views: {views}. We agree that each deserves a hearing, and we still differ on how far to go."


class ProtocolBot(bots.Bot):
    def __init__(self, *, affirming: str, negating: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.affirming = affirming
        self.negating = negating
        self.critiques_sent = 0
        self.statements_written = 0
        self.ranked: set[int] = set()  # candidate ids this bot has ranked, in any round

    def _main(self, body: str) -> None:
        start = body.find('<section id="main"')
        if start >= 0:
            self.main_html = body[start:]

    async def _next_screen(self, *, previous: str) -> None:
        """Wait until #main is pushed with something to do (a different screen, or the mediator's form)."""
        assert self.socket is not None
        deadline = time.monotonic() + self.timeout
        while True:
            view = self.view()
            if self.main_html != previous and (view in _ACTIONS or 'id="mediator-form"' in self.main_html) and not self._stale():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise bots.BotError(f"{self.label}: waited {self.timeout:.0f}s at {view or 'nothing'}")
            message = await self.socket.receive(timeout=remaining)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise bots.BotError(f"{self.label}: socket closed ({message.type.name}) at {view}")
            self._main(message.data)

    def _stale(self) -> bool:
        """A push rendered before the bot's last answer (the socket delivers in order, but the answer's own response
        came first): a rating page of statements it has already ranked."""
        if self.view() != "rating":
            return False
        shown = {int(m.group("id")) for m in bots._STATEMENT_RE.finditer(self.main_html)}
        return bool(shown) and shown <= self.ranked

    def _agreement(self, text: str) -> int:
        return bots.simulated_agreement(
            statement=text, own_opinion=self.opinion, persona=self.persona, affirming=self.affirming, negating=self.negating, rng=self.rng
        )

    async def _rate_and_rank(self) -> str:
        statements = [(int(m.group("id")), html.unescape(m.group("text"))) for m in bots._STATEMENT_RE.finditer(self.main_html)]
        if not statements:
            raise bots.BotError(f"{self.label}: rating view without statements")
        ratings: dict[int, tuple[int, int]] = {}
        for candidate_id, text in statements:
            ratings[candidate_id] = (self._agreement(text), bots.simulated_quality(statement=text, rng=self.rng))
            body = await self._post(
                f"p/{self.result.participant_code}/rate/{candidate_id}/",
                {"agreement": str(ratings[candidate_id][0]), "quality": str(ratings[candidate_id][1])},
            )
            if 'class="error"' in body:
                raise bots.BotError(f"{self.label}: rating refused: {body[:300]}")
        self.result.ratings.update(ratings)
        self.ranked |= set(ratings)
        order = sorted(ratings, key=lambda cid: (-ratings[cid][0], -ratings[cid][1], cid))
        return await self._post(f"p/{self.result.participant_code}/rank/", {f"rank_{cid}": str(i + 1) for i, cid in enumerate(order)})

    async def run(self, *, join_path: str, affirming: str, negating: str) -> bots.BotResult:
        await self.join(join_path)
        previous = ""
        while True:
            await self._next_screen(previous=previous)
            previous = self.main_html
            view = self.view()
            code = self.result.participant_code
            if view in ("done", "dropped", "released"):
                match = bots._CODE_RE.search(self.main_html)
                self.result.completion_code = match.group("code") if match else ""
                return self.result
            if view == "position_before":
                body = await self._post(
                    f"p/{code}/position/",
                    {"position": str(persona_position(self.persona)), "strength": str(persona_strength(self.persona))},
                )
            elif view == "opinions" and "critique-form" in self.main_html:
                body = await self._post(
                    f"p/{code}/opinion/", {"text": write_critique(persona=self.persona, affirming=affirming, negating=negating)}
                )
                self.critiques_sent += 1
            elif view == "opinions":
                body = await self._post(f"p/{code}/opinion/", {"text": self.opinion})
                self.result.opinion_sent_at = time.monotonic()
            elif view == "rating":
                self.result.statements_seen_at = self.result.statements_seen_at or time.monotonic()
                body = await self._rate_and_rank()
            elif view == "mediator":
                opinions = [html.unescape(m.group("text")) for m in _OPINION_BLOCK_RE.finditer(self.main_html)]
                body = await self._post(f"p/{code}/statement/", {"text": write_statement(opinions)})
                self.statements_written += 1
            elif view == "closing":
                choices = [(int(m.group("id")), html.unescape(m.group("text"))) for m in _CLOSING_RE.finditer(self.main_html)]
                data = {"position": str(persona_position(self.persona)), "strength": str(max(1, persona_strength(self.persona) - 1))}
                if choices:
                    scored = sorted(choices, key=lambda choice: (-self._agreement(choice[1]), choice[0]))
                    data["preferred"] = str(scored[0][0])
                body = await self._post(f"p/{code}/closing/", data)
            else:
                raise bots.BotError(f"{self.label}: no action for screen {view!r}")
            if 'class="error"' in body:
                raise bots.BotError(f"{self.label}: refused at {view}: {body[:300]}")
            self._main(body)


async def run_protocol_group(*, base_url: str, plan: bots.GroupPlan, timeout: float) -> list[bots.BotResult]:
    rng = random.Random(plan.seed)
    group = [
        ProtocolBot(
            base_url=base_url, label=label, persona=persona, opinion=opinion, rng=random.Random(rng.getrandbits(32)), timeout=timeout,
            affirming=plan.affirming, negating=plan.negating,
        )
        for label, persona, opinion in zip(plan.labels, plan.personas, plan.opinions)
    ]
    try:
        return list(
            await asyncio.gather(*(bot.run(join_path=plan.join_path, affirming=plan.affirming, negating=plan.negating) for bot in group))
        )
    finally:
        await asyncio.gather(*(bot.close() for bot in group), return_exceptions=True)
