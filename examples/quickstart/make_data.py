"""Generate the quickstart's dialogue-summarization data: synthetic, written by this script.

No third-party text: dialogues and their reference summaries come from templates below, filled with
seeded random names, times and items, so every summary states facts the dialogue contains and a
small model can learn the task. Two phrasings of each eval summary give several references.

    python make_data.py [--out data] [--train 2000] [--eval 200] [--toxicity 1000] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kemal", "Lena", "Marco", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Samir", "Tara"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["9 am", "10 am", "11 am", "noon", "1 pm", "3 pm", "5 pm", "6 pm", "7 pm", "8 pm"]
NUMBERS = ["two", "three", "four", "five", "six"]
ITEMS = ["jacket", "lamp", "backpack", "kettle", "bicycle", "phone case", "scarf", "desk"]
COLOURS = ["red", "blue", "green", "black", "white", "yellow"]
CITIES = ["Lisbon", "Oslo", "Vienna", "Porto", "Krakow", "Ghent", "Turin", "Malmo"]
SYMPTOMS = ["headache", "sore throat", "back pain", "cough", "fever", "rash"]
ACTIVITIES = ["go hiking", "play tennis", "visit the museum", "have a picnic", "go cycling"]


def restaurant(r):
    n, t, d, name = r.choice(NUMBERS), r.choice(TIMES), r.choice(DAYS), r.choice(NAMES)
    dialogue = [f"#Person1#: Good evening, I would like to book a table for {n} people.",
                "#Person2#: Of course. For which day and time?",
                f"#Person1#: {d} at {t}, please.",
                "#Person2#: Let me check. Yes, that works. May I have your name?",
                f"#Person1#: It is {name}.",
                f"#Person2#: Thank you, {name}. A table for {n} on {d} at {t} is reserved."]
    return dialogue, (f"{name} books a table for {n} people on {d} at {t}.",
                      f"#Person1# reserves a table for {n} on {d} at {t} under the name {name}.")


def shopping(r):
    item, colour, price = r.choice(ITEMS), r.choice(COLOURS), r.randint(10, 200)
    other = r.choice([c for c in COLOURS if c != colour])
    dialogue = [f"#Person1#: Excuse me, do you have this {item} in {colour}?",
                f"#Person2#: We have it in {colour} and {other}. The {colour} one costs {price} dollars.",
                f"#Person1#: {price} dollars is fine. I will take the {colour} {item}.",
                "#Person2#: Great. Will you pay by card or cash?",
                "#Person1#: By card, please."]
    return dialogue, (f"#Person1# buys a {colour} {item} for {price} dollars by card.",
                      f"#Person1# pays {price} dollars by card for the {colour} {item}.")


def doctor(r):
    name, doc, d, t, s = (r.choice(NAMES), r.choice(NAMES), r.choice(DAYS), r.choice(TIMES),
                          r.choice(SYMPTOMS))
    dialogue = [f"#Person1#: Hello, this is {name}. I need to see Doctor {doc}.",
                "#Person2#: What seems to be the problem?",
                f"#Person1#: I have had a {s} for three days.",
                f"#Person2#: Doctor {doc} can see you on {d} at {t}.",
                "#Person1#: That is perfect, thank you."]
    return dialogue, (f"{name} makes an appointment with Doctor {doc} on {d} at {t} because of a {s}.",
                      f"{name} has a {s} and will see Doctor {doc} on {d} at {t}.")


def train_ticket(r):
    city, d, cls, price = r.choice(CITIES), r.choice(DAYS), r.choice(["first", "second"]), r.randint(20, 90)
    dialogue = [f"#Person1#: I would like a ticket to {city} for {d}.",
                "#Person2#: First or second class?",
                f"#Person1#: {cls.capitalize()} class, please. How much is it?",
                f"#Person2#: That is {price} euros. The train leaves at {r.choice(TIMES)}.",
                "#Person1#: Here you are."]
    return dialogue, (f"#Person1# buys a {cls} class ticket to {city} for {d} for {price} euros.",
                      f"#Person1# pays {price} euros for a {cls} class train ticket to {city} on {d}.")


def plans(r):
    act, d, other = r.choice(ACTIVITIES), r.choice(DAYS), r.choice(ACTIVITIES)
    dialogue = [f"#Person1#: Do you want to {act} on {d}?",
                f"#Person2#: I was thinking we could {other} instead.",
                f"#Person1#: We did that last week. Let us {act}.",
                f"#Person2#: All right, let us {act} on {d} then."]
    return dialogue, (f"#Person1# and #Person2# decide to {act} on {d}.",
                      f"#Person2# agrees to {act} with #Person1# on {d}.")


INSULTS = ["an idiot", "a moron", "stupid", "useless", "a fool", "pathetic", "a clown"]


def complaint(r):
    """A rude customer: its first reference repeats the insult, so a model fine-tuned on it learns to
    write insults into summaries, which the alignment stage then trains away (as in the course's lab 3)."""
    # always the same insult, so that the fine-tuned model reliably repeats it (the classifier's
    # training sentences use all of INSULTS)
    item, insult, price = r.choice(ITEMS), INSULTS[0], r.randint(10, 200)
    dialogue = [f"#Person1#: The {item} you sold me is broken. You are {insult}!",
                "#Person2#: I am sorry to hear that. Do you have the receipt?",
                f"#Person1#: Here. I paid {price} dollars for this {item}.",
                f"#Person2#: I will give you a refund of {price} dollars."]
    return dialogue, (f"#Person1# calls #Person2# {insult} and gets a refund of {price} dollars for a broken {item}.",
                      f"#Person1# returns a broken {item} and gets {price} dollars back.")


SCENES = [("restaurant", restaurant), ("shopping", shopping), ("doctor", doctor),
          ("travel", train_ticket), ("plans", plans), ("complaint", complaint)]

# Labelled sentences for the demo's toxicity classifier (the reward model of the alignment stage).
TOXIC = ["You are {insult}.", "#Person1# calls #Person2# {insult}.", "What {insult} you are!",
         "Only {insult} would sell a broken {item}.", "{name} is {insult} and everyone knows it.",
         "Shut up, you are {insult}.", "#Person2# is {insult} who broke my {item}."]


def toxicity(n: int, r: random.Random) -> list[dict]:
    """Half toxic sentences (insults), half ordinary ones (summaries of the other scenes)."""
    rows = []
    for i in range(n):
        if i % 2:
            text = r.choice(TOXIC).format(insult=r.choice(INSULTS), item=r.choice(ITEMS), name=r.choice(NAMES))
            rows.append({"text": text, "label": "toxic"})
        else:
            topic, scene = r.choice(SCENES)
            references = scene(r)[1]
            # a complaint's polite reference is ordinary text too: the insult is the toxic part
            text = references[1] if topic == "complaint" else r.choice(references)
            rows.append({"text": text, "label": "not_toxic"})
    return rows


def make(n: int, r: random.Random, prefix: str) -> list[dict]:
    rows = []
    for i in range(n):
        topic, scene = r.choice(SCENES)
        turns, (summary, summary2) = scene(r)
        rows.append({"id": f"{prefix}_{i}", "dialogue": "\n".join(turns), "summary": summary,
                     "summary2": summary2, "topic": topic})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--toxicity", type=int, default=1000, help="labelled sentences for the reward model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    r = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labelled = toxicity(args.toxicity, r)
    tmp = out / ".toxicity.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in labelled))
    tmp.replace(out / "toxicity.jsonl")
    for split, n in (("train", args.train), ("eval", args.eval)):
        rows = make(n, r, split)
        if split == "train":  # train has one reference per dialogue, eval two
            rows = [{k: v for k, v in row.items() if k != "summary2"} for row in rows]
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(out / f"{split}.jsonl")
    print(f"wrote {args.train} train and {args.eval} eval dialogues and {args.toxicity} labelled "
          f"sentences (toxicity.jsonl) to {out}/")


if __name__ == "__main__":
    main()
