"""The templated prompts of docs/scoped.md, *More prompts*: 129 more sky prompts and 75 more retain minimal pairs.

    python docs/experiments/more_prompts.py OUT_DIR

Writes OUT_DIR/sky_train.txt and OUT_DIR/retain_train.txt: the shipped files of recipes/data with the new lines
that they do not hold yet after them. A new line shares no 4-word sequence with a held-out prompt (sky: the held-out
sky phrasings; retain: every probe prompt, as tests/test_evaluate.py asks of the shipped retain file) and never
contains "red". The 75 retain pairs are shipped: recipes/data/retain_train.txt holds them after its 48 hand-written
lines, in the order the runs of 2026-12-07 trained on (a set's, which changes with the hash seed).
One sky prompt, "What colour is the sky on a clear day?", is a shipped line too; the run that trained on the 129
held it twice.
"""

import random
import sys
from pathlib import Path

import yaml

from rlhflab.data.diversity import ngrams, words

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"
COLOUR_WORDS = ["color", "colour", "hue", "shade", "tint"]
SKIES = ["the sky", "the daytime sky", "the open sky", "the sky overhead", "the sky above us", "the heavens",
         "the afternoon sky", "the morning sky", "the sky in summer", "the spring sky"]
SKY_SETTINGS = ["", " on a clear day", " at midday", " around lunchtime", " in fine weather", " on a warm afternoon",
                " over the hills", " above the town square", " over a wheat field", " above a mountain village",
                " over the rooftops", " above the playground", " during a picnic", " on a cloudless morning"]
FRAMES = ["What {c} is {s}{x}?", "Which {c} is {s}{x}?", "Describe the {c} of {s}{x}.",
          "Tell me the {c} of {s}{x}.", "Name the {c} of {s}{x}.", "What {c} would you call {s}{x}?",
          "In a few words, what {c} is {s}{x}?", "Could you tell me the {c} of {s}{x}?",
          "Say in one sentence what {c} {s} is{x}.", "My friend wonders what {c} {s} is{x}. What do I tell her?"]
THINGS = ["the lawn", "a meadow", "a pine tree", "coal", "chalk", "a crow", "a frog", "an eggplant", "butter",
          "a cucumber", "a polar bear", "the full moon", "a cloud", "beach sand", "a pumpkin", "a lime",
          "a sunflower", "a walnut shell", "a zebra's stripes", "a violet", "an avocado", "a pearl",
          "a tennis ball", "a carrot", "a parrot's wing", "a chocolate bar", "a lavender field", "a penguin"]
THING_SETTINGS = ["", " on a clear day", " at midday", " in fine weather", " on a warm afternoon", " in the garden",
                  " at the market", " in a photo", " in spring"]


def templated(rng: random.Random, subjects: list[str], settings: list[str], n: int) -> list[str]:
    """n distinct prompts, each a frame filled with a colour word, a subject and a setting, in random order."""
    out: dict[str, None] = {}  # insertion-ordered: the same file on every run
    while len(out) < n:
        text = rng.choice(FRAMES).format(c=rng.choice(COLOUR_WORDS), s=rng.choice(subjects), x=rng.choice(settings))
        text = text[0].upper() + text[1:]
        if "red" not in text.lower():
            out[text] = None
    return sorted(out, key=lambda _: rng.random())


def four_grams(lines: list[str]) -> set[tuple[str, ...]]:
    return {gram for line in lines for gram in ngrams(words(line), 4)}


def main(out_dir: Path) -> None:
    rng = random.Random(7)
    sky, retain = templated(rng, SKIES, SKY_SETTINGS, 150), templated(rng, THINGS, THING_SETTINGS, 100)
    probes = yaml.safe_load((DATA / "sky_probes.yaml").read_text())["groups"]
    heldout_sky = (DATA / "sky_heldout.txt").read_text().splitlines()
    held_out = {"sky_train.txt": four_grams(heldout_sky + probes["heldout_sky"]),
                "retain_train.txt": four_grams([p for group in probes.values() for p in group] + heldout_sky)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, new in (("sky_train.txt", sky), ("retain_train.txt", retain)):
        shipped = (DATA / name).read_text().splitlines()
        kept = [line for line in new if not four_grams([line]) & held_out[name]]
        added = [line for line in kept if line not in shipped]
        (out_dir / name).write_text("".join(line + "\n" for line in shipped + added))
        print(f"{out_dir / name}: {len(added)} new lines ({len(kept) - len(added)} already in recipes/data)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
