"""Small, fast fixtures shared by tests: hand-made facts, a tokenizer, a micro model."""

from __future__ import annotations

import random

from rtteval.data.types import MCQ
from rtteval.models import build_tiny_model, train_word_tokenizer

FIRST = ["Alo", "Bren", "Cira", "Dov", "Eka", "Fen", "Gal", "Hiro", "Iva", "Jor", "Kel", "Lum"]
LAST = ["Marr", "Nox", "Orl", "Pask", "Quen", "Rill", "Sov", "Tarn"]


def toy_facts(n: int = 24, seed: int = 0) -> tuple[list[MCQ], list[str]]:
    """``n`` people with random birth years: questions and their QA training sentences."""
    rng = random.Random(seed)
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(names)
    qs, texts = [], []
    for name in names[:n]:
        years = rng.sample(range(1900, 2000), 4)
        ans = rng.randrange(4)
        q = MCQ(question=f"When was {name} born?", choices=tuple(str(y) for y in years), answer=ans)
        qs.append(q)
        texts.append(f"Q: {q.question} A: {q.choices[ans]}.")
    return qs, texts


def toy_tokenizer_and_model(preset: str = "micro", seed: int = 0, n: int = 24):
    qs, texts = toy_facts(n, seed)
    vocab_texts = texts + [c for q in qs for c in q.choices] + [q.question for q in qs]
    tok = train_word_tokenizer(vocab_texts)
    model = build_tiny_model(preset, tok, seed=seed)
    return qs, texts, tok, model
