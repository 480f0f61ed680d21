"""Make the demo dataset: sentences about a person -> one line of JSON with fixed keys.

The bundled model writes JSON readily, but not with these exact keys, order and spacing, so before training its
exact-match accuracy is near zero; a QLoRA adapter learns the format and the extraction in a few minutes on a CPU.
Names are made up from syllables, cities and sentence shapes vary; the test split uses names the training split
never contains.

    python scripts/make_demo_data.py        # writes data/demo/train.jsonl and data/demo/test.jsonl
"""

import json
import random
from pathlib import Path

SYLLABLES = """ka ri to me lu na so vi de ra mi zo el an ya ko sa ti mo be ju fa re no li da go ha ni pe""".split()
CITIES = """Paris Berlin Tokyo Lagos Lima Oslo Cairo Seoul Quito Rome Madrid Dublin Nairobi Hanoi Austin Denver Porto Accra
Kyoto Lyon Milan Perth Boston Dakar Delhi Tunis Sofia Riga Vienna Prague Zurich Havana Manila Osaka Bergen Cork""".split()
SHAPES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) moved to {city} last year.",
    "Living in {city}, {name} turned {age} this spring.",
    "Our new colleague {name} is {age} and based in {city}.",
    "At {age}, {name} still calls {city} home.",
    "{city} resident {name}, aged {age}, joined the club.",
    "Say hello to {name} from {city}, who is {age}.",
]
INSTRUCTIONS = ["Extract the person as JSON:", "Give the name, age and city as JSON:", "Turn this into JSON:"]


def make_name(rng: random.Random) -> str:
    # made-up names, so the model must copy the name from the sentence rather than recall it
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def record(rng: random.Random, name: str) -> dict:
    age, city = rng.randint(18, 90), rng.choice(CITIES)
    sentence = rng.choice(SHAPES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    prompt = f"{rng.choice(INSTRUCTIONS)} {sentence}"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


OUT = Path(__file__).resolve().parent.parent / "data" / "demo"


def main(out: Path = OUT) -> None:
    rng = random.Random(2305_14314)  # the QLoRA paper's arXiv number
    train = [record(rng, make_name(rng)) for _ in range(400)]
    seen = {r["messages"][1]["content"].split('"')[3] for r in train}
    test = []
    while len(test) < 100:  # held-out people: names the training split never uses
        name = make_name(rng)
        if name not in seen:
            test.append(record(rng, name))
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} records to {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
