"""The embedded demo corpus: seeded, synthetic children's stories in simple English.

This is *synthetic demo data*, written by a small story grammar so that the quickstart runs
offline on a fresh machine. Each story has a hero, a friend, a place, an object and a plot
(a lost thing, a wish, a fear, a broken thing, a race), told with varied sentences and
dialogue, so a few-million-parameter model learns grammar and story shape rather than lines.

`iter_stories(n, seed)` yields plain stories; `iter_instructions(n, seed, split)` yields
prompt/completion pairs built from the same plots (write a story, summarise it, answer
questions about it). The `eval` split uses a disjoint seed stream, so its pairs are held out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

GIRLS = ["Lily", "Mia", "Sara", "Emma", "Anna", "Lucy", "Zoe", "Ella", "Rose", "Amy", "Kim", "Nina",
         "Ruby", "Grace", "Maya", "Ivy", "Lola", "Jane", "Molly", "Daisy", "Hana", "Leah", "Sophie", "Clara"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Noah", "Oscar", "Jake", "Eli",
        "Sid", "Luke", "Omar", "Ravi", "Dan", "Pete", "Theo", "Alex", "Milo", "Kai", "Hugo", "Ned"]
ANIMALS = [("dog", "Buddy"), ("cat", "Whiskers"), ("bunny", "Hops"), ("bird", "Tweety"), ("frog", "Jumpy"),
           ("duck", "Quackers"), ("mouse", "Squeak"), ("bear", "Fuzzy"), ("fox", "Rusty"), ("turtle", "Shelly"),
           ("pig", "Pinky"), ("owl", "Hoot"), ("lion", "Sunny"), ("puppy", "Spot"), ("horse", "Star")]
PLACES = ["park", "forest", "beach", "garden", "farm", "school", "river", "lake", "zoo", "market",
          "hill", "library", "playground", "field", "town square", "meadow", "pond", "yard", "shop", "kitchen"]
PLACE_SIGHTS = {
    "park": "green trees and a big slide", "forest": "tall trees and soft moss", "beach": "warm sand and blue waves",
    "garden": "bright flowers and buzzing bees", "farm": "cows, hens and a red barn", "school": "desks, books and a bell",
    "river": "cold water and smooth stones", "lake": "ducks and a small boat", "zoo": "lions, monkeys and a tall giraffe",
    "market": "fruit, bread and many people", "hill": "windy grass and a wide sky", "library": "quiet rows of books",
    "playground": "swings and a sandbox", "field": "long grass and yellow flowers", "town square": "a fountain and a clock",
    "meadow": "butterflies and daisies", "pond": "lily pads and little fish", "yard": "a fence and an old tree",
    "shop": "toys and sweets on every shelf", "kitchen": "pots, pans and a warm oven",
}
COLORS = ["red", "blue", "green", "yellow", "purple", "pink", "orange", "white", "black", "brown", "shiny", "little"]
OBJECTS = ["ball", "kite", "hat", "book", "toy car", "doll", "balloon", "bike", "drum", "boat", "box", "cup",
           "shoe", "scarf", "robot", "teddy bear", "crayon", "map", "key", "bell", "flower", "rock", "shell", "cake"]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited", "thankful", "calm", "cheerful"]
FEELINGS_BAD = ["sad", "worried", "scared", "upset", "lonely", "grumpy", "nervous"]
TIMES = ["One sunny day", "One morning", "One rainy afternoon", "Last summer", "One cold winter day",
         "On a windy day", "One evening", "On a bright spring morning", "Long ago", "One day"]
OPENINGS = ["Once upon a time, there was a {adj} {kind} named {hero}.",
            "There once was a {adj} {kind} called {hero}.",
            "{hero} was a {adj} {kind} who lived near the {place}.",
            "In a small town, there lived a {adj} {kind} named {hero}."]
KIND_ADJ = ["little", "kind", "curious", "brave", "shy", "happy", "clever", "funny", "gentle", "busy"]
LIKES = ["{Sub} loved to play with {pos} {color} {obj}.", "{Sub} liked to sing songs all day.",
         "{Sub} liked to draw pictures of animals.", "{Sub} loved to run and jump.",
         "Every day, {sub} read a book before bed.", "{Sub} had a pet {animal} named {pet}.",
         "{Sub} liked to help {pos} mom in the kitchen.", "{Sub} loved to look at the stars at night."]


@dataclass
class Plot:
    hero: str
    sub: str  # he / she
    pos: str  # his / her
    friend: str
    place: str
    color: str
    obj: str
    kind: str  # lost | wish | fear | broken | race | share
    story: str = ""
    summary: str = ""


def _hero(rng: random.Random) -> tuple[str, str, str, str]:
    if rng.random() < 0.5:
        return rng.choice(GIRLS), "she", "her", "girl"
    return rng.choice(BOYS), "he", "his", "boy"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _art(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_plot(rng: random.Random) -> Plot:
    """Draw one story (text and one-sentence summary) from the grammar."""
    hero, sub, pos, kind_word = _hero(rng)
    friend = rng.choice([n for n in GIRLS + BOYS if n != hero])
    animal, pet = rng.choice(ANIMALS)
    place = rng.choice(PLACES)
    color, obj = rng.choice(COLORS), rng.choice(OBJECTS)
    kind = rng.choice(["lost", "wish", "fear", "broken", "race", "share"])
    p = Plot(hero, sub, pos, friend, place, color, obj, kind)
    f = dict(hero=hero, sub=sub, Sub=_cap(sub), pos=pos, Pos=_cap(pos), friend=friend, place=place,
             color=color, obj=obj, animal=animal, pet=pet, kind=kind_word, adj=rng.choice(KIND_ADJ),
             good=rng.choice(FEELINGS_GOOD), bad=rng.choice(FEELINGS_BAD), time=rng.choice(TIMES),
             sight=PLACE_SIGHTS[place], a_color=_art(color))
    s: list[str] = [rng.choice(OPENINGS), rng.choice(LIKES)]
    s.append(rng.choice(["{time}, {hero} went to the {place}.", "{time}, {hero} and {friend} walked to the {place}.",
                         "{time}, {hero} wanted to go to the {place}.", "{time}, {hero} visited the {place} with {pos} dad."]))
    if rng.random() < 0.6:
        s.append(rng.choice(["At the {place}, there were {sight}.", "The {place} had {sight}.",
                             "{Sub} saw {sight}."]))
    if kind == "lost":
        s += ["{Sub} brought {pos} {color} {obj} to play with.",
              rng.choice(["But then the {obj} was gone!", "Suddenly, {sub} could not find the {obj}.",
                          "After a while, {hero} looked down and the {obj} was not there."]),
              "{hero} felt {bad}. \"Where is my {obj}?\" {sub} cried.",
              "{friend} saw {hero} and asked, \"What is wrong?\"",
              "\"I lost my {color} {obj},\" said {hero}.",
              "\"Do not worry. I will help you look,\" said {friend}.",
              rng.choice(["They looked under a bench and behind a tree.", "They looked high and low.",
                          "They searched everywhere, step by step."]),
              rng.choice(["At last, {friend} found the {obj} next to a big rock.",
                          "Then {hero} saw something {color} in the grass. It was the {obj}!",
                          "Finally, a little {animal} came out with the {obj} in its mouth."]),
              "{hero} was so {good}. \"Thank you, {friend}!\" {sub} said.",
              rng.choice(["From that day on, {hero} always kept the {obj} close.",
                          "{hero} learned that friends help each other.",
                          "They played with the {obj} until the sun went down."])]
        p.summary = f"{hero} lost {pos} {color} {obj} at the {place}, and {friend} helped {hero} find it."
    elif kind == "wish":
        s += ["{hero} saw {a_color} {color} {obj} and wanted it very much.",
              "\"I wish I had {a_color} {color} {obj},\" {sub} said to {friend}.",
              "{friend} said, \"Maybe you can make one yourself.\"",
              rng.choice(["So {hero} worked hard all week.", "{hero} saved {pos} coins, one by one.",
                          "{hero} asked {pos} grandma to help."]),
              rng.choice(["It was not easy, but {sub} did not give up.", "Some days {sub} felt {bad}, but {sub} kept trying."]),
              "At last, {hero} had {pos} very own {color} {obj}.",
              "{Sub} felt {good} and showed it to {friend}.",
              rng.choice(["\"You did it!\" said {friend} with a big smile.", "{friend} clapped and cheered."]),
              rng.choice(["{hero} learned that hard work pays off.", "It was the best {obj} in the whole town."])]
        p.summary = f"{hero} wished for {_art(color)} {color} {obj}, worked hard at the {place}, and finally got one."
    elif kind == "fear":
        scary = rng.choice(["the dark", "the big dog", "the tall slide", "the deep water", "the loud thunder"])
        f["scary"] = scary
        s += ["But {hero} was scared of {scary}.",
              "\"I do not want to go near {scary},\" {sub} said. {Sub} felt {bad}.",
              "{friend} held {pos} hand. \"I am here with you,\" said {friend}.",
              rng.choice(["Together they took one small step, then another.", "They counted to three and tried together."]),
              "It was not so bad after all!",
              "{hero} smiled. \"I was brave!\" {sub} said.",
              rng.choice(["{hero} learned that being brave is easier with a friend.",
                          "From that day on, {hero} was not scared of {scary} anymore."])]
        p.summary = f"{hero} was scared of {scary} at the {place}, but {friend} helped {hero} be brave."
    elif kind == "broken":
        s += ["{hero} was playing with {pos} {color} {obj} when it broke.",
              "\"Oh no!\" said {hero}. {Sub} felt very {bad}.",
              "{friend} came over to look. \"We can fix it,\" {friend} said.",
              rng.choice(["They used glue and tape.", "They found some string and a little nail.",
                          "They asked a kind old man for help."]),
              rng.choice(["It took a long time, but they did not stop.", "They worked slowly and carefully."]),
              "Soon the {obj} was as good as new.",
              "{hero} hugged {friend}. \"You are the best friend,\" {sub} said.",
              rng.choice(["{hero} learned that broken things can often be fixed.",
                          "They played with the {obj} all day long."])]
        p.summary = f"{hero}'s {color} {obj} broke at the {place}, and {friend} helped fix it."
    elif kind == "race":
        s += ["{friend} said, \"Let us have a race to the big tree!\"",
              "\"Yes!\" said {hero}. {Sub} felt {good}.",
              "They ran as fast as they could. {hero} fell down and hurt {pos} knee.",
              "{friend} stopped running and went back to help.",
              "\"Are you okay?\" asked {friend}.",
              "\"I am okay,\" said {hero}. \"Thank you for coming back.\"",
              rng.choice(["They walked to the tree together, side by side.", "They finished the race holding hands."]),
              rng.choice(["{hero} learned that being kind is better than winning.",
                          "Nobody won, but they both laughed all the way home."])]
        p.summary = f"{hero} and {friend} had a race at the {place}, and {friend} stopped to help when {hero} fell."
    else:  # share
        s += ["{hero} had {a_color} {color} {obj}. {friend} had nothing to play with.",
              "{friend} looked {bad}.",
              rng.choice(["{hero} thought for a moment.", "{hero} did not want to share at first."]),
              "Then {sub} said, \"Do you want to play with my {obj}?\"",
              "{friend} smiled. \"Yes, please!\"",
              "They took turns with the {obj} and had lots of fun.",
              rng.choice(["{hero} learned that sharing makes everyone {good}.",
                          "At the end of the day, they were best friends."])]
        p.summary = f"{hero} shared {pos} {color} {obj} with {friend} at the {place}, and they became friends."
    if rng.random() < 0.3:
        s.append(rng.choice(["The end.", "And they lived happily ever after.", "It was a wonderful day."]))
    p.story = " ".join(x.format(**f) for x in s)
    return p


def iter_stories(n: int, seed: int = 1337) -> Iterator[str]:
    """`n` stories, deterministic for `seed`."""
    rng = random.Random(seed)
    for _ in range(n):
        yield make_plot(rng).story


def _questions(p: Plot, rng: random.Random) -> list[tuple[str, str]]:
    pairs = [
        (rng.choice([f"Write a story about {p.hero} and {_art(p.color)} {p.color} {p.obj} at the {p.place}.",
                     f"Write a short story for children about {p.hero} at the {p.place}. Include {_art(p.color)} {p.color} {p.obj}.",
                     f"Tell me a story about {p.hero}, {p.friend} and {_art(p.color)} {p.color} {p.obj}."]), p.story),
        (rng.choice(["Summarise this story in one sentence:", "Summarize the story in one sentence.",
                     "What happens in this story? Answer in one sentence."]) + "\n" + p.story, p.summary),
        ("Who is the main character of this story?\n" + p.story, f"The main character is {p.hero}."),
        ("Where does this story take place?\n" + p.story, f"The story takes place at the {p.place}."),
        ("Who helps the main character in this story?\n" + p.story,
         f"{p.friend} helps {p.hero}." if p.kind != "share" else f"{p.hero} helps {p.friend} by sharing."),
    ]
    return pairs


def iter_instructions(n: int, seed: int = 1337, split: str = "train") -> Iterator[dict]:
    """`n` prompt/completion pairs. `split="eval"` draws from a disjoint seed stream (held out)."""
    if split not in ("train", "eval"):
        raise ValueError(split)
    rng = random.Random(f"{seed}-{split}")  # string seeds hash deterministically (not PYTHONHASHSEED)
    made = 0
    while made < n:
        p = make_plot(rng)
        for prompt, completion in _questions(p, rng):
            if made >= n:
                return
            yield {"prompt": prompt, "completion": completion}
            made += 1
