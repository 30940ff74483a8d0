from llmgen.data.demo import iter_instructions, iter_stories


def test_stories_are_deterministic_and_varied():
    a = list(iter_stories(300, seed=1))
    assert a == list(iter_stories(300, seed=1))
    assert a != list(iter_stories(300, seed=2))
    assert len(set(a)) == 300  # no repeated stories
    words = {w.strip('.,!?"\'') for s in a for w in s.split()}
    assert len(words) > 400  # a real vocabulary, not a handful of templates
    first_sentences = {s.split(". ")[0] for s in a}
    assert len(first_sentences) > 150


def test_instructions_and_held_out_split():
    train = list(iter_instructions(200, seed=1))
    held = list(iter_instructions(200, seed=1, split="eval"))
    assert all(set(r) == {"prompt", "completion"} for r in train + held)
    kinds = {r["prompt"].split()[0] for r in train}
    assert {"Write", "Who", "Where"} <= kinds or {"Tell", "Who", "Where"} <= kinds
    assert not ({r["prompt"] for r in train} & {r["prompt"] for r in held if "\n" in r["prompt"]})
    summary = next(r for r in train if r["prompt"].lower().startswith(("summar", "what happens")))
    assert summary["completion"].endswith(".") and summary["completion"].count(". ") == 0
