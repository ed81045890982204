"""The built-in corpus: a seeded generator of TinyStories-like children's stories, no network needed.

Each story introduces a hero, a friend, a treasured object and a place, runs into a small problem and
resolves it. Names, the object and its color are referred to again many sentences later, so a model
needs attention over the whole story (and positions) to predict them: the long-range structure that
separates the variants. Story i depends only on (seed, i), so any range can be generated in parallel.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from moemla.data import words as W

MIN_WORDS, MAX_WORDS = 80, 300


@dataclass(frozen=True)
class Character:
    name: str
    kind: str  # "little girl", "brave fox"
    he: str  # subject pronoun
    him: str  # object pronoun
    his: str  # possessive

    @property
    def He(self) -> str:
        return self.he.capitalize()

    @property
    def His(self) -> str:
        return self.his.capitalize()


@dataclass(frozen=True)
class Cast:
    hero: Character
    friend: Character
    thing: str  # the treasured object, e.g. "blue kite"
    place: str
    helper: str  # an animal that lives at the place
    grown_up: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _character(rng: random.Random, avoid: str = "") -> Character:
    girl = rng.random() < 0.5
    names = W.GIRL_NAMES if girl else W.BOY_NAMES
    name = rng.choice([n for n in names if n != avoid])
    adjective = rng.choice(W.CHARACTER_ADJECTIVES)
    species = ("girl" if girl else "boy") if rng.random() < 0.5 else rng.choice(W.ANIMALS)
    kind = f"{adjective} {species}"
    pronouns = ("she", "her", "her") if girl else ("he", "him", "his")
    return Character(name, kind, *pronouns)


def _cast(rng: random.Random) -> Cast:
    hero = _character(rng)
    place = rng.choice(list(W.PLACES))
    return Cast(
        hero=hero,
        friend=_character(rng, avoid=hero.name),
        thing=f"{rng.choice(W.COLORS)} {rng.choice(W.OBJECTS)}",
        place=place,
        helper=rng.choice(W.PLACES[place]["helpers"]),
        grown_up=rng.choice(W.PEOPLE),
    )


def _opening(rng: random.Random, c: Cast) -> list[str]:
    h = c.hero
    first = rng.choice(
        [
            f"Once upon a time, there was {_article(h.kind)} {h.kind} named {h.name}.",
            f"Once upon a time, in a land not far away, lived {_article(h.kind)} {h.kind} called {h.name}.",
            f"There once was {_article(h.kind)} {h.kind} named {h.name}.",
            f"One {rng.choice(W.WEATHER)} morning, {_article(h.kind)} {h.kind} named {h.name} woke up early.",
        ]
    )
    lines = [first, f"{h.name} had {_article(c.thing)} {c.thing}. {h.He} loved it more than anything."]
    if rng.random() < 0.6:
        lines.append(f"Every day {h.he} took the {c.thing} everywhere {h.he} went.")
    if rng.random() < 0.5:
        a, b = rng.sample(W.OBJECT_ADJECTIVES, 2)
        giver = rng.choice(W.PEOPLE)
        lines.append(f"The {c.thing} was {a} and {b}, a gift from {giver} on a {rng.choice(W.WEATHER)} birthday.")
    if rng.random() < 0.3:
        lines.append(f"{h.He} always wore {h.his} {rng.choice(W.COLORS)} {rng.choice(W.CLOTHES)} when it was chilly.")
    lines.append(f"{h.His} best friend was {c.friend.name}, {_article(c.friend.kind)} {c.friend.kind}.")
    return lines


def _outing(rng: random.Random, c: Cast) -> list[str]:
    h, f = c.hero, c.friend
    sights = rng.sample(W.PLACES[c.place]["sights"], 2)
    lines = [f"One {rng.choice(W.WEATHER)} day, {h.name} and {f.name} went to the {c.place}."]
    if rng.random() < 0.3:  # a short outing keeps some stories near the 80-word floor
        return lines
    lines += [
        f"At the {c.place} they saw {sights[0]} and {sights[1]}.",
        "They {} and {}.".format(*rng.sample(W.PLAY_VERBS, 2)),
    ]
    if rng.random() < 0.5:
        lines.append(f"The air smelled of {rng.choice(W.SMELLS)}, and they could hear {rng.choice(W.SOUNDS)}.")
    if rng.random() < 0.5:
        food = rng.choice(W.FOODS)
        lines.append(f"{c.grown_up.capitalize()} gave them some {food}, and they ate the {food} on a blanket.")
    if rng.random() < 0.5:
        lines.append(f'"I love the {c.place}!" said {f.name}. "Me too," said {h.name}.')
    return lines


def _problem_lost(rng: random.Random, c: Cast) -> list[str]:
    h, f = c.hero, c.friend
    wrong, right = rng.sample(W.PLACES[c.place]["spots"], 2)
    return [
        f"After a while, {h.name} looked for {h.his} {c.thing}, but it was gone!",
        f'"Oh no!" cried {h.name}. "My {c.thing} is lost!" {h.He} felt very {rng.choice(W.FEELINGS_BAD)}.',
        f'"Do not worry," said {f.name}. "I will help you look."',
        f"They looked {wrong}, but the {c.thing} was not there.",
        f'Then {_article(c.helper)} {c.helper} came by. "I saw something {right}," said the {c.helper}.',
        f"{h.name} and {f.name} ran to look {right}. There it was: the {c.thing}!",
        f'{h.name} hugged the {c.thing}. "Thank you, {c.helper}! Thank you, {f.name}!" {h.he} said.',
    ]


def _problem_stuck(rng: random.Random, c: Cast) -> list[str]:
    h, f = c.hero, c.friend
    return [
        f"Suddenly a strong wind blew. The {c.thing} flew up and got stuck in a tall tree.",
        f'{h.name} jumped and jumped, but {h.he} could not reach it. "It is too high," {h.he} said sadly.',
        f"{f.name} tried to climb the tree, but the branches were too thin.",
        f'Then they saw {_article(c.helper)} {c.helper}. "Can you help us?" asked {f.name}.',
        f"The {c.helper} nodded. It went up the tree and pushed the {c.thing} down.",
        f"The {c.thing} fell into {h.name}'s arms. {h.He} was so {rng.choice(W.FEELINGS_GOOD)}.",
        f'"Thank you, {c.helper}," said {h.name}. "You are a good friend."',
    ]


def _problem_share(rng: random.Random, c: Cast) -> list[str]:
    h, f = c.hero, c.friend
    return [
        f'{f.name} looked at the {c.thing}. "Can I play with your {c.thing}?" asked {f.name}.',
        f'"No, it is mine," said {h.name}, and {h.he} held the {c.thing} tight.',
        f"{f.name} felt {rng.choice(W.FEELINGS_BAD)} and walked away. Now {h.name} was alone.",
        f"Playing alone was not fun. {h.name} missed {h.his} friend.",
        f'{c.grown_up.capitalize()} said, "Why not share your {c.thing} with {f.name}?"',
        f'{h.name} ran to {f.name}. "I am sorry. Let us play with the {c.thing} together," {h.he} said.',
        f"{f.name} smiled. They took turns with the {c.thing}, and it was much more fun.",
    ]


def _problem_broken(rng: random.Random, c: Cast) -> list[str]:
    h, f = c.hero, c.friend
    return [
        f"{h.name} threw the {c.thing} up high, but it fell down and broke!",
        f'{h.name} began to cry. "My {c.thing} is broken," {h.he} said. {h.He} was very {rng.choice(W.FEELINGS_BAD)}.',
        f'{f.name} put an arm around {h.him}. "Let us ask {c.grown_up}. Maybe {c.grown_up} can fix it."',
        f"They took the {c.thing} to {c.grown_up}. {c.grown_up.capitalize()} used some glue and a little tape.",
        f'Soon the {c.thing} was as good as new. "Thank you!" said {h.name}.',
        f"From then on, {h.name} was careful with {h.his} {c.thing}.",
    ]


def _problem_scared(rng: random.Random, c: Cast) -> list[str]:
    h, f = c.hero, c.friend
    sound = rng.choice(["a loud noise", "a strange sound", "a funny squeak", "something moving"])
    spot = rng.choice(W.PLACES[c.place]["spots"])
    return [
        f"Suddenly they heard {sound} {spot}. {h.name} held {h.his} {c.thing} close.",
        f'"I am {rng.choice(["scared", "afraid", "worried"])}," said {h.name}. "What is it?"',
        f'{f.name} said, "Let us be brave and look together."',
        f"They walked slowly to the spot {spot}. {h.name} was shaking a little.",
        f"It was only a little {c.helper}! The {c.helper} was looking for its mom.",
        f"{h.name} laughed. {h.He} was not scared anymore. They helped the {c.helper} find its mom.",
        f"The {c.helper}'s mom was so {rng.choice(W.FEELINGS_GOOD)}. She thanked {h.name} and {f.name}.",
    ]


def _problem_hungry(rng: random.Random, c: Cast) -> list[str]:
    h, f = c.hero, c.friend
    food = rng.choice(W.FOODS)
    return [
        f"Near the path they found a little {c.helper}. It looked thin and {rng.choice(W.FEELINGS_BAD)}.",
        f'"I am so hungry," said the {c.helper}. "I have not eaten all day."',
        f'{h.name} had some {food} in {h.his} bag. "You can have my {food}," {h.he} said.',
        f'The {c.helper} ate the {food} and smiled. "Thank you, {h.name}. You are very kind."',
        f"The {c.helper} wanted to play too, so {h.name} showed it the {c.thing}.",
        f"The {c.helper}, {h.name} and {f.name} played with the {c.thing} until the sun went down.",
    ]


PROBLEMS: tuple[Callable[[random.Random, Cast], list[str]], ...] = (
    _problem_lost,
    _problem_stuck,
    _problem_share,
    _problem_broken,
    _problem_scared,
    _problem_hungry,
)


def _ending(rng: random.Random, c: Cast) -> list[str]:
    h, f = c.hero, c.friend
    lines = [
        rng.choice(
            [
                f"When it was time to go home, {h.name} and {f.name} walked back together.",
                f"The sun went down, and {h.name} and {f.name} went home from the {c.place}.",
            ]
        ),
        f"That night {h.name} went to bed with the {c.thing} beside {h.him}.",
    ]
    if rng.random() < 0.7:
        lines.append(f"{h.name} learned that {rng.choice(W.MORALS)}.")
    if rng.random() < 0.5:
        lines.append(f"{h.name} and {f.name} were friends forever, and the {c.thing} went on every adventure.")
    return lines


def story(seed: int, index: int) -> str:
    """Story `index` of the corpus with this seed: 80-300 words, deterministic."""
    rng = random.Random(seed * 1_000_003 + index)
    c = _cast(rng)
    problem = rng.choice(PROBLEMS)
    lines = _opening(rng, c) + _outing(rng, c) + problem(rng, c)
    if rng.random() < 0.35:  # some stories have a second, different problem before the end
        lines += rng.choice([p for p in PROBLEMS if p is not problem])(rng, c)
    lines += _ending(rng, c)
    text = " ".join(lines)
    words = text.split()
    if len(words) > MAX_WORDS:  # cut at a sentence boundary
        text = " ".join(words[:MAX_WORDS])
        text = text[: text.rfind(".") + 1]
    paragraphs = [text]
    if rng.random() < 0.5:  # break into two paragraphs at a sentence start, as TinyStories often does
        cut = text.find(". ", len(text) // 2)
        if cut > 0:
            paragraphs = [text[: cut + 1], text[cut + 2 :]]
    return "\n".join(paragraphs)


def stories(seed: int = 0, count: int = 10_000, start: int = 0) -> Iterator[str]:
    """`count` stories from index `start`: the built-in corpus."""
    for i in range(start, start + count):
        yield story(seed, i)
