"""An offline SigLIP tokenizer for the tiny base models.

No model hub is reachable when building the ``tiny`` preset, so its tokenizer is a SentencePiece
unigram model trained here, deterministically, on a small embedded corpus of remote-sensing
referring expressions. It is saved and loaded as a regular Hugging Face ``SiglipTokenizer``
(``spiece.model`` + ``tokenizer_config.json``), exactly the layout of the real SigLIP tokenizers,
with the same special ids: ``<pad>`` 0, ``</s>`` 1 (also SigLIP's padding token), ``<unk>`` 2.
Unknown characters fall back to bytes, so any text tokenises.
"""

from __future__ import annotations

import functools
import io
import itertools
import tempfile
from pathlib import Path

CLASSES = [
    "airplane", "ship", "storage tank", "baseball diamond", "tennis court", "basketball court",
    "ground track field", "harbor", "bridge", "vehicle", "building", "road", "car", "tree",
    "swimming pool", "roundabout", "soccer field", "dam", "stadium", "train station", "overpass",
    "windmill", "golf field", "chimney", "expressway", "airport", "parking lot", "river", "lake",
]
PLURALS = [c + ("es" if c.endswith(("s", "sh", "ch")) else "s") for c in CLASSES]
POSITIONS = [
    "on the far left", "on the far right", "at the top", "at the bottom", "closest to the top",
    "closest to the bottom", "on the left", "on the right", "in the middle", "in the center",
    "in the upper left", "in the lower right", "in the upper right", "in the lower left",
    "leftmost", "rightmost", "topmost", "bottommost", "above", "below", "next to", "near",
]
ADJECTIVES = [
    "largest", "smallest", "biggest", "tiny", "big", "small", "long", "short", "white", "gray",
    "dark", "red", "blue", "green", "round", "square", "only", "whole", "large", "little",
]
TEMPLATES = [
    "the {c} {p}", "the {a} {c}", "{c} {p}", "all the {cs}", "the only {c}", "the {a} {c} {p}",
    "a {c} that is {p}", "the {c} which is {a}", "every {c}", "the {a} one of the {cs}",
]


def corpus_lines() -> list[str]:
    """The deterministic training corpus: templated expressions over classes/positions/adjectives."""
    lines = []
    for i, (c, p, a) in enumerate(itertools.product(CLASSES, POSITIONS, ADJECTIVES)):
        t = TEMPLATES[i % len(TEMPLATES)]
        cs = PLURALS[CLASSES.index(c)]
        lines.append(t.format(c=c, cs=cs, p=p, a=a))
    return lines


@functools.lru_cache(maxsize=4)
def _trained_model(vocab_size: int) -> bytes:
    """Train the SentencePiece model once per process; returns the serialised model proto."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return buffer.getvalue()


def save_offline_tokenizer(directory: str | Path, vocab_size: int = 600, max_length: int = 64) -> Path:
    """Write a SiglipTokenizer (``spiece.model`` + configs) into ``directory`` and return it."""
    from transformers import SiglipTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "spiece.model"
        model_file.write_bytes(_trained_model(vocab_size))
        tokenizer = SiglipTokenizer(vocab_file=str(model_file), model_max_length=max_length)
        tokenizer.save_pretrained(str(directory))
    return directory


@functools.lru_cache(maxsize=4)
def offline_tokenizer(vocab_size: int = 600, max_length: int = 64):
    """An in-memory offline SiglipTokenizer (cached per process)."""
    from transformers import SiglipTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        save_offline_tokenizer(tmp, vocab_size, max_length)
        return SiglipTokenizer.from_pretrained(tmp)
