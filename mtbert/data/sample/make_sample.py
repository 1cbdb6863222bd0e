"""Writes the packaged SAMPLE task files (synthetic, templated sentences written for mtbert).

They have the CS224N files' format (names prefixed sample_, '-' -> '_') (tab-separated, unnamed index column, doubled-quote
CSV quoting, a Quora row with an empty label) so that the default run exercises the same code
as the real data. They are NOT the course data: scores on them mean nothing.

    python mtbert/data/sample/make_sample.py   # rewrites the files next to this script
"""

import csv
import hashlib
import random
from pathlib import Path

HERE = Path(__file__).parent
rng = random.Random(224)
SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the story", "the soundtrack", "the director's work",
            "the ending", "the cast", "the script", "the cinematography", "the dialogue"]
BY_LABEL = {0: ["dreadful", "a total disaster", "unbearably boring", "awful from start to end"],
            1: ["weak", "disappointing", "rather dull", "mostly forgettable"],
            2: ["fine", "average", "neither good nor bad", "ordinary"],
            3: ["good", "enjoyable", "quite charming", "well made"],
            4: ["brilliant", "a masterpiece", "absolutely wonderful", "stunning in every way"]}
TOPICS = ["learn python", "lose weight", "start a company", "improve my english", "get a job at google",
          "travel to japan", "study for exams", "become a doctor", "save money", "write a novel",
          "play the guitar", "stop procrastinating", "make friends", "cook rice", "learn machine learning"]
PARA = ["How can I {t}?", "What is the best way to {t}?", "What should I do to {t}?", "How do I {t} quickly?"]
SCENES = ["a man is playing a guitar", "a woman is slicing an onion", "two dogs run on the grass",
          "a child rides a bike", "a cat sleeps on a sofa", "people walk in the rain", "a chef cooks pasta",
          "a boy kicks a ball", "a plane lands at the airport", "a girl reads a book"]


def uid(*parts):
    return hashlib.md5("|".join(map(str, parts)).encode()).hexdigest()[:25]


def write(name, header, rows, index_col=True):
    with open(HERE / ("sample_" + name.replace("-", "_")), "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(([""] if index_col else []) + header)
        for i, row in enumerate(rows):
            w.writerow(([i] if index_col else []) + row)


def sentiment(n, seed):
    rows = []
    for i in range(n):
        y = rng.randrange(5)
        rows.append([uid("sst", seed, i), f" {rng.choice(SUBJECTS).capitalize()} is {rng.choice(BY_LABEL[y])} .", y])
    return rows


def quora(n, seed):
    rows = []
    for i in range(n):
        t = rng.choice(TOPICS)
        same = rng.random() < 0.4
        q1 = rng.choice(PARA).format(t=t)
        q2 = rng.choice(PARA).format(t=t if same else rng.choice([x for x in TOPICS if x != t]))
        if i == 3:
            q1 = 'What does "' + t + '" mean?'  # exercises doubled-quote CSV quoting
        rows.append([uid("q", seed, i), q1, q2, f"{float(same)}"])
    return rows


def sts(n, seed):
    rows = []
    for i in range(n):
        a = rng.choice(SCENES)
        level = rng.randrange(4)
        b = a if level == 3 else (a.replace("a ", "one ", 1) if level == 2 else
                                  (a.split(" ")[0] + " " + " ".join(rng.choice(SCENES).split(" ")[1:]) if level == 1
                                   else rng.choice([s for s in SCENES if s != a])))
        score = {3: 5.0, 2: 4.0, 1: 2.0, 0: 0.4}[level]
        rows.append([uid("sts", seed, i), a.capitalize() + ".", b.capitalize() + ".", f"{score:.1f}"])
    return rows


if __name__ == "__main__":
    write("ids-sst-train.csv", ["id", "sentence", "sentiment"], sentiment(320, "train"))
    write("ids-sst-dev.csv", ["id", "sentence", "sentiment"], sentiment(80, "dev"))
    write("ids-sst-test-student.csv", ["id", "sentence"], [r[:2] for r in sentiment(40, "test")])
    write("ids-cfimdb-train.csv", ["id", "sentence", "sentiment"],
          [[r[0], r[1], int(r[2] >= 3)] for r in sentiment(160, "cf-train") if r[2] != 2])
    write("ids-cfimdb-dev.csv", ["id", "sentence", "sentiment"],
          [[r[0], r[1], int(r[2] >= 3)] for r in sentiment(60, "cf-dev") if r[2] != 2])
    write("ids-cfimdb-test-student.csv", ["id", "sentence"], [r[:2] for r in sentiment(20, "cf-test")])
    train = quora(321, "train")
    train[10][3] = ""  # like the real Quora files: a row with an empty label (skipped, counted)
    write("quora-train.csv", ["id", "sentence1", "sentence2", "is_duplicate"], train)
    write("quora-dev.csv", ["id", "sentence1", "sentence2", "is_duplicate"], quora(80, "dev"))
    write("sts-train.csv", ["id", "sentence1", "sentence2", "similarity"], sts(320, "train"))
    write("sts-dev.csv", ["id", "sentence1", "sentence2", "similarity"], sts(80, "dev"))
    write("sts-test-student.csv", ["id", "sentence1", "sentence2"], [r[:3] for r in sts(40, "test")])
