"""Make the demo dataset: sentences about a person -> one line of JSON with fixed keys.

The bundled model writes JSON readily, but not with these exact keys, order and spacing, so before training its
exact-match accuracy is near zero; a QLoRA adapter learns the format and the extraction in a few minutes on a CPU.
Names, cities and sentence shapes vary; the test split uses people the training split never saw.

    python scripts/make_demo_data.py        # writes data/demo/train.jsonl and data/demo/test.jsonl
"""

import json
import random
from pathlib import Path

NAMES = """Alice Bob Carla David Emma Farid Grace Hiro Ines Jonas Kira Liam Maya Nikos Olga Pablo Quinn Rosa Sami Tara
Umar Vera Wim Xena Yusuf Zoe Amir Beatriz Chen Dara Elif Femi Gustav Hana Ivan Jade Kofi Lena Mateo Nadia Oscar Priya
Rafael Sofia Tomas Uma Viktor Wen Yara Zain Anya Bruno Clara Diego Esme Felix Gita Hugo Isla Jamal Katya Lucas Mira
Noah Omar Petra Ravi Selma Theo Una Vlad Willa Ximena Yosef Zara""".split()
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


def record(rng: random.Random, name: str) -> dict:
    age, city = rng.randint(18, 90), rng.choice(CITIES)
    sentence = rng.choice(SHAPES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    prompt = f"{rng.choice(INSTRUCTIONS)} {sentence}"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def main(out: Path = Path(__file__).resolve().parent.parent / "data" / "demo") -> None:
    rng = random.Random(2305_14314)  # the QLoRA paper's arXiv number
    names = NAMES[:]
    rng.shuffle(names)
    test_names, train_names = names[:16], names[16:]
    train = [record(rng, rng.choice(train_names)) for _ in range(600)]
    test = [record(rng, rng.choice(test_names)) for _ in range(100)]
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} records to {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
