"""Data for training and evaluating LongNet: the embedded default dataset, tokenizers that need no download,
loading text from files or the Hub, and packing into fixed-length contexts.

The embedded default dataset (:func:`generate_default_dataset`) is generated, not downloaded: a document is a
pure function of ``(split, seed, index)``, so every machine builds the same data without a network. It mixes
three tasks:

* ``passkey``: a pass key (an uppercase letter and a digit, ``"E2"``) stated four times, then lowercase sentences
  in which the question ``" key? "`` is asked again and again, each time followed by the key. Every answer lies
  at least ``min_distance`` characters after the previous statement of the key. The filler has no capitals and
  no digits, so that the key's two characters are found by what they are; the four statements are padded so that
  they land on the four residues modulo 4, because a head of a dilated branch only sees the keys of its own
  residue (docs/quality.md tells the experiments that chose this design). Held-out splits use keys that the
  ``train`` split never contains (:func:`pass_keys`).
* ``key_value``: a list of ``name = value`` records, then "The value of NAME is" and that record's value.
* ``text``: ordinary English sentences from a small grammar (no retrieval).

In the retrieval tasks the answer's only evidence lies at least ``min_distance`` characters before the answer,
and the answer string occurs nowhere in between: the model has to attend that far back. With the byte-level
tokenizer one character is one token, so ``min_distance`` larger than the smallest segment length of a LongNet
puts the evidence outside the smallest segment, where only the longer, dilated branches reach. Each record
carries the character spans of its evidence and its answer, from which :mod:`modeling_longnet.evaluation`
measures retrieval accuracy by distance with any tokenizer that reports offsets.

``datasets`` is imported only by the functions that build :class:`datasets.DatasetDict` objects, so that the
generator, the tokenizers, the packing and :class:`DefaultDatasetStream` (the default dataset made as it is read,
for long contexts) also run where that package is not installed.
"""

from __future__ import annotations

import bisect
import math
import os
import random
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import IterableDataset, get_worker_info

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_TASK_WEIGHTS",
    "END_OF_TEXT",
    "PACKING_MODES",
    "PADDING",
    "PASSKEY_QUESTION",
    "PASSKEY_STATEMENTS",
    "TASKS",
    "DefaultDatasetStream",
    "PackedRowsCollator",
    "byte_level_tokenizer",
    "default_documents_per_row",
    "generate_default_dataset",
    "is_retrieval_record",
    "least_document_length",
    "load_records",
    "load_text_datasets",
    "load_tokenizer",
    "min_retrieval_distance",
    "pack_documents",
    "pass_keys",
    "question_records",
    "tokenize_and_pack",
    "train_bpe_tokenizer",
]

TASKS = ("passkey", "key_value", "text")
DEFAULT_TASK_WEIGHTS = (0.4, 0.4, 0.2)  # the mix of the three kinds when none is given
STREAM_ROWS_PER_CHUNK = 8  # DefaultDatasetStream packs this many rows at a time, by default (its last one padded)
PACKING_MODES = ("documents", "concat")
END_OF_TEXT = "<|endoftext|>"
PADDING = "<|pad|>"
NO_SPAN = -1  # span fields of `text` records, which have no answer
_SPAN_FIELDS = ("evidence_start", "evidence_end", "answer_start", "answer_end")

# File extensions -> the `datasets` builder that reads them.
_FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# ----------------------------------------------------------------------------------------------------------
# The embedded default dataset
# ----------------------------------------------------------------------------------------------------------

_SUBJECTS = (
    "The old sailor", "A small child", "The gardener", "My neighbour", "The teacher", "A tired traveller",
    "The baker", "Her brother", "The young doctor", "A quiet student", "The farmer", "Our guide", "The painter",
    "A stray cat", "The engineer", "His grandmother", "The librarian", "A curious fox", "The captain", "The poet",
)
_VERBS = (
    "painted", "found", "carried", "watched", "repaired", "forgot", "described", "cleaned", "opened", "sold",
    "borrowed", "measured", "followed", "drew", "hid", "counted", "visited", "wrapped", "noticed", "built",
)
_OBJECTS = (
    "a wooden boat", "the red door", "an old map", "the garden wall", "a basket of apples", "the broken clock",
    "a letter from home", "the blue kite", "a pile of books", "the narrow bridge", "a silver spoon",
    "the stone well", "a paper lantern", "the winter coat", "a jar of honey", "the church bell", "a long rope",
    "the kitchen table", "a bright umbrella", "the last train",
)
_PLACES = (
    "near the river", "in the market", "behind the library", "on the hill", "by the harbour", "in the forest",
    "at the station", "under the bridge", "beside the lake", "in the old town", "on the beach", "at the farm",
)
_TIMES = (
    "In the morning", "After the storm", "Before dinner", "Every Sunday", "Late at night", "During the summer",
    "On a cold day", "Years ago", "At noon", "Last spring",
)
_ADJECTIVES = ("quiet", "warm", "grey", "busy", "bright", "calm", "windy", "strange", "pleasant", "long")
_WEATHER_NOUNS = ("day", "evening", "week", "winter", "afternoon", "journey", "season", "morning")

_KEY_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_KEY_DIGITS = "0123456789"
PASSKEY_STATEMENTS = 4  # the largest dilation rate the default data serves on every residue
PASSKEY_QUESTION = " key? "
_KEY_VALUE_INTRO = "Here is a list of names and their values.\n"


def _sentence(rng: random.Random) -> str:
    pattern = rng.randrange(4)
    subject, verb, obj, place = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)
    if pattern == 0:
        return f"{subject} {verb} {obj} {place}."
    if pattern == 1:
        return f"{rng.choice(_TIMES)}, {subject[0].lower() + subject[1:]} {verb} {obj}."
    if pattern == 2:
        return f"{subject} {verb} {obj} and {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
    return f"It was a {rng.choice(_ADJECTIVES)} {rng.choice(_WEATHER_NOUNS)} {place}."


def _prose(rng: random.Random, num_chars: int) -> str:
    """Paragraphs of 3 to 6 sentences, at most ``num_chars`` characters (possibly empty)."""
    text, sentences_left = "", rng.randint(3, 6)
    while True:
        sentence = _sentence(rng)
        separator = "" if not text else ("\n" if sentences_left == 0 else " ")
        if len(text) + len(separator) + len(sentence) > num_chars:
            return text
        if sentences_left == 0:
            sentences_left = rng.randint(3, 6)
        text += separator + sentence
        sentences_left -= 1


def _document_rng(split: str, seed: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512: the same on every machine and independent of PYTHONHASHSEED.
    return random.Random(f"longnet-default/{split}/{seed}/{index}")


@lru_cache(maxsize=2)
def pass_keys(split: str) -> tuple[str, ...]:
    """The pass keys of a split: an uppercase letter and a digit. One (letter, digit) pair in five is held out: the
    ``train`` split never uses those, every other split uses only those. Every letter and every digit occurs in
    both, so a held-out key is new only as a pair."""
    held_out = split != "train"
    return tuple(
        letter + digit
        for i, letter in enumerate(_KEY_LETTERS)
        for j, digit in enumerate(_KEY_DIGITS)
        if ((7 * i + 3 * j) % 5 == 0) == held_out
    )


def _key_statement(key: str, statements: int = PASSKEY_STATEMENTS) -> str:
    """``" the pass key is E2."`` padded with spaces to 1 mod ``statements`` characters: statements in a row then put
    the key on successive residues modulo ``statements``. In a branch of dilation rate r a query sees only the keys
    of its own residue modulo r, so one statement would be visible to one query in r; ``statements`` of them (a
    power of two) reach every query of the rates that divide it."""
    text = f" the pass key is {key}."
    return text + " " * ((1 - len(text)) % statements)


def _filler(rng: random.Random, num_chars: int) -> str:
    """Exactly ``num_chars`` characters of lowercase sentences, without digits: no character of a pass key."""
    text = ""
    while len(text) < num_chars:
        text += _sentence(rng).lower() + " "
    return text[:num_chars]


def _passkey_document(
    rng: random.Random, length: int, min_distance: int, split: str, *, max_distance: int | None = None,
    statements: int = PASSKEY_STATEMENTS,
) -> dict:
    key = rng.choice(pass_keys(split))
    text = _filler(rng, rng.randint(0, 24)) + "".join(_key_statement(key, statements) for _ in range(statements))
    evidence = text.rindex(key)  # the latest statement of the key
    questions = []
    while True:
        # The answer starts at least min_distance characters after the end of the latest statement.
        least_filler = max(0, min_distance - (len(text) - evidence - len(key)) - len(PASSKEY_QUESTION))
        room = length - len(text) - least_filler - len(PASSKEY_QUESTION) - len(key) - 1
        if room < 0:
            break
        if max_distance is None:
            extra = rng.randint(0, min(room, 3 * min_distance // 2))
        else:  # log-uniform: every scale of distance between the two bounds gets its share of the questions
            shortest = len(text) - evidence - len(key) + least_filler + len(PASSKEY_QUESTION)  # >= min_distance
            longest = max(min_distance, min(max_distance, shortest + room))
            distance = round(math.exp(rng.uniform(math.log(min_distance), math.log(longest))))
            extra = min(room, max(0, distance - shortest))
        text += _filler(rng, least_filler + extra) + PASSKEY_QUESTION
        questions.append([evidence, evidence + len(key), len(text), len(text) + len(key)])
        evidence = len(text)
        text += key + "."
    text += _filler(rng, length - len(text))
    return _record(text, "passkey", *questions[-1], questions=questions)


def _key_value_document(rng: random.Random, length: int, min_distance: int) -> dict:
    letters = "abcdefghijklmnopqrstuvwxyz"
    seen: set[str] = set()
    records: list[tuple[str, str, int]] = []  # name, value, where the value starts
    text = _KEY_VALUE_INTRO
    question_length = len("The value of abcd is 0000.")
    while True:
        name = "".join(rng.choice(letters) for _ in range(4))
        value = f"{rng.randrange(10000):04d}"
        if name in seen or value in seen:
            continue  # unique names and values: the queried value occurs once before the answer
        line = f"{name} = {value}\n"
        if len(text) + len(line) + question_length > length:
            break
        seen.update((name, value))
        records.append((name, value, len(text) + len(name) + 3))
        text += line
    # Query a record whose value ends at least `min_distance` characters before the answer.
    answer_start = len(text) + len("The value of abcd is ")
    candidates = [record for record in records if answer_start - (record[2] + len(record[1])) >= min_distance]
    name, value, evidence_start = rng.choice(candidates)
    text += f"The value of {name} is {value}."
    span = [evidence_start, evidence_start + len(value), answer_start, answer_start + len(value)]
    return _record(text, "key_value", *span, questions=[span])


def _text_document(rng: random.Random, length: int) -> dict:
    return _record(_prose(rng, length), "text", NO_SPAN, NO_SPAN, NO_SPAN, NO_SPAN, questions=[])


def _record(text: str, task: str, evidence_start: int, evidence_end: int, answer_start: int, answer_end: int, *, questions: list) -> dict:
    return {
        "text": text,
        "task": task,
        "evidence_start": evidence_start,
        "evidence_end": evidence_end,
        "answer_start": answer_start,
        "answer_end": answer_end,
        "questions": questions,
    }


def generate_default_dataset(
    num_documents: int,
    *,
    split: str = "train",
    seed: int = 0,
    max_chars: int = 1024,
    min_distance: int = 128,
    task_weights: Sequence[float] = DEFAULT_TASK_WEIGHTS,
    max_distance: int | None = None,
    passkey_statements: int = PASSKEY_STATEMENTS,
    first_document: int = 0,
) -> list[dict]:
    """The embedded default dataset: ``num_documents`` records, a deterministic function of the arguments.

    Args:
        num_documents: how many documents.
        split: any name; different splits (e.g. ``"train"``, ``"validation"``) give different documents.
        seed: another way to get different documents for the same split.
        max_chars: the longest document, in characters (ASCII: one byte-level token each); documents are
            between half of it (at least ``min_distance + 192``) and all of it.
        min_distance: the least distance, in characters, from the end of the evidence to the start of the answer.
            Set it above the smallest segment length to make retrieval need the dilated, longer branches.
        task_weights: relative frequencies of ``passkey``, ``key_value`` and ``text`` documents.
        max_distance: the longest such distance in ``passkey`` documents (or the least that the key's padded
            statement and the question take, if that is more), with distances drawn log-uniformly between the two
            bounds (as many questions from 64 to 128 characters back as from 8K to 16K). By default (``None``)
            they are drawn uniformly between ``min_distance`` and 2.5 times it.
        passkey_statements: how often a ``passkey`` document states its key at the start, a power of two: the
            statements land on every residue modulo it, so that it should be at least the largest dilation rate
            of the model that learns from them.
        first_document: the index of the first document: ``first_document=k`` gives documents ``k, k+1, ...``
            of the same sequence (how :class:`DefaultDatasetStream` reads it in pieces).

    Returns:
        A list of dicts with ``text``, ``task`` (one of :data:`TASKS`), ``questions`` (the character spans
        ``[evidence_start, evidence_end, answer_start, answer_end]`` of every answer and its evidence: several in a
        ``passkey`` document, one in a ``key_value`` one, none in ``text``) and the spans of the last question as
        ``evidence_start``/``evidence_end``/``answer_start``/``answer_end`` (``-1`` for ``text`` documents).
        Document ``i`` does not depend on ``num_documents``.
    """
    _check_int(num_documents, "num_documents", minimum=0)
    _check_int(first_document, "first_document", minimum=0)
    _check_int(seed, "seed", minimum=0)
    _check_int(min_distance, "min_distance", minimum=1)
    _check_int(max_chars, "max_chars", minimum=1)
    if max_distance is not None:
        _check_int(max_distance, "max_distance", minimum=min_distance)
    if (
        isinstance(passkey_statements, bool) or not isinstance(passkey_statements, int) or passkey_statements < 1
        or passkey_statements & (passkey_statements - 1)
    ):
        raise ValueError(
            f"`passkey_statements` must be a power of two (1, 2, 4, 8, ...: the statements then cover every residue "
            f"of the dilation rates that divide it), got {passkey_statements!r}"
        )
    if not isinstance(split, str) or not split:
        raise ValueError(f"`split` must be a non-empty string, got {split!r}")
    least_length = least_document_length(min_distance, passkey_statements)
    if max_chars < least_length:
        raise ValueError(
            f"`max_chars` ({max_chars}) is too short for `min_distance`={min_distance}: documents must be able to "
            f"hold the evidence, the distance and the question; use max_chars >= {least_length}"
        )
    if (
        len(task_weights) != len(TASKS)
        or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in task_weights)
        or sum(task_weights) <= 0
    ):
        raise ValueError(
            f"`task_weights` must be {len(TASKS)} non-negative numbers (for {', '.join(TASKS)}) with a positive "
            f"sum, got {list(task_weights)!r}"
        )
    documents = []
    for index in range(first_document, first_document + num_documents):
        rng = _document_rng(split, seed, index)
        task = rng.choices(TASKS, weights=task_weights)[0]
        length = rng.randint(max(max_chars // 2, least_length), max_chars)
        if task == "passkey":
            documents.append(
                _passkey_document(rng, length, min_distance, split, max_distance=max_distance, statements=passkey_statements)
            )
        elif task == "key_value":
            documents.append(_key_value_document(rng, length, min_distance))
        else:
            documents.append(_text_document(rng, length))
    return documents


def min_retrieval_distance(segment_lengths: Sequence[int]) -> int:
    """Twice the smallest segment: evidence that far before its answer lies outside the answer's smallest
    segment, where only the longer, dilated branches reach. The default distance of the embedded dataset's
    questions (``train.py``, ``evaluate.py``), and where evaluation's "far" questions begin."""
    return 2 * min(segment_lengths)


def least_document_length(min_distance: int, passkey_statements: int = PASSKEY_STATEMENTS) -> int:
    """The shortest ``max_chars`` that :func:`generate_default_dataset` accepts for ``min_distance``: a document
    must hold the fixed parts (intro, the key's statements, question: under 150 characters with four statements),
    the distance, and a sentence of slack."""
    return min_distance + 192 + 32 * max(0, passkey_statements - PASSKEY_STATEMENTS)


def _check_int(value, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# Tokenizers that need no download
# ----------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, the alphabet of byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + shift)
            shift += 1
    return dict(zip(printable, map(chr, characters)))


def _wrap(tokenizer_object) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=PADDING
    )


def byte_level_tokenizer() -> PreTrainedTokenizerBase:
    """A tokenizer whose tokens are the 256 bytes (token id = byte value), plus ``<|endoftext|>`` (256, also BOS)
    and ``<|pad|>`` (257). Nothing to train or download, lossless on any text, one token per ASCII character;
    ``save_pretrained`` writes a ``tokenizer.json`` that ``AutoTokenizer`` loads back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocabulary = {character: byte for byte, character in _bytes_to_unicode().items()}
    vocabulary[END_OF_TEXT] = 256
    vocabulary[PADDING] = 257
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([END_OF_TEXT, PADDING])
    return _wrap(tokenizer)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on ``texts`` with ``vocab_size`` tokens (>= 258: the 256 bytes and the
    two special tokens come first), the same special tokens as :func:`byte_level_tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"`vocab_size` must be an int >= 258 (256 bytes and 2 special tokens), got {vocab_size!r}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, PADDING],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer)


def load_tokenizer(
    name_or_path: str, *, texts: Iterable[str] | None = None, vocab_size: int = 4096, **from_pretrained_kwargs
) -> PreTrainedTokenizerBase:
    """``"byte"``: :func:`byte_level_tokenizer`; ``"bpe"``: :func:`train_bpe_tokenizer` on ``texts``; anything
    else: ``AutoTokenizer.from_pretrained(name_or_path)`` (a folder or a Hub id). A tokenizer without a padding
    token gets its end-of-sequence token as padding."""
    if name_or_path == "byte":
        return byte_level_tokenizer()
    if name_or_path == "bpe":
        if texts is None:
            raise ValueError("`texts` are needed to train the 'bpe' tokenizer")
        return train_bpe_tokenizer(texts, vocab_size)
    from transformers import AutoTokenizer

    if _looks_like_path(name_or_path) and not Path(name_or_path).exists():
        raise FileNotFoundError(f"tokenizer folder {name_or_path!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **from_pretrained_kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id ("user/name"): absolute, relative with ./ or ../, or existing."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name)


# ----------------------------------------------------------------------------------------------------------
# Loading text
# ----------------------------------------------------------------------------------------------------------


def _builder_for(paths: Sequence[str], option: str) -> str:
    builders = set()
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{option}: file {path!r} does not exist")
        suffix = Path(path).suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(
                f"{option}: cannot read {path!r}: the extension {suffix or '(none)'!r} is not one of "
                f"{sorted(_FILE_BUILDERS)} (text, JSON lines or parquet)"
            )
        builders.add(_FILE_BUILDERS[suffix])
    if len(builders) > 1:
        raise ValueError(f"{option}: mix of file kinds {sorted(builders)}; give files of one kind")
    return builders.pop()


def load_text_datasets(
    *,
    train_files: Sequence[str] = (),
    validation_files: Sequence[str] = (),
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    sample_by: str = "document",
    validation_fraction: float = 0.05,
    seed: int = 0,
    default_documents: int = 2000,
    default_validation_documents: int = 100,
    default_max_chars: int = 1024,
    default_min_distance: int = 128,
    default_task_weights: Sequence[float] = DEFAULT_TASK_WEIGHTS,
    default_max_distance: int | None = None,
    default_passkey_statements: int = PASSKEY_STATEMENTS,
) -> DatasetDict:
    """A :class:`datasets.DatasetDict` with ``train`` and ``validation`` splits that have a ``text`` column.

    The source is, by priority: ``train_files`` (text, JSON lines or parquet files, by extension), else the Hub
    dataset ``dataset_name`` (``dataset_config`` names its configuration), else the embedded default dataset
    (:func:`generate_default_dataset` with the ``default_*`` settings, different documents in each split; for long
    contexts :class:`DefaultDatasetStream` makes the same documents without ``datasets`` as they are read).

    Text files are read one example per file (``sample_by="document"``), per blank-line separated paragraph or
    per line. ``text_column`` names the column that holds the text in JSON, parquet and Hub data; it is renamed
    ``text``. Without ``validation_files`` (or a Hub ``validation`` split), ``validation_fraction`` of the
    training examples are held out.
    """
    try:
        import datasets
    except ImportError as error:  # the GPU machines of the project's CI carry no `datasets`
        raise ImportError("loading data needs the `datasets` package: pip install datasets") from error

    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"`validation_fraction` must be in [0, 1), got {validation_fraction!r}")
    if sample_by not in ("document", "paragraph", "line"):
        raise ValueError(f"`sample_by` must be 'document', 'paragraph' or 'line', got {sample_by!r}")
    if validation_files and not train_files:
        raise ValueError("validation files were given without training files")
    if train_files and dataset_name:
        raise ValueError("give either training files or a Hub dataset name, not both")

    if train_files:
        builder = _builder_for(train_files, "train files")
        data_files = {"train": list(train_files)}
        if validation_files:
            if _builder_for(validation_files, "validation files") != builder:
                raise ValueError("training and validation files must be of the same kind (text, JSON or parquet)")
            data_files["validation"] = list(validation_files)
        kwargs = {"sample_by": sample_by} if builder == "text" else {}
        try:
            loaded = datasets.load_dataset(builder, data_files=data_files, **kwargs)
        except datasets.exceptions.DatasetGenerationError as error:
            cause = error.__cause__ or error
            raise ValueError(f"cannot read {', '.join(train_files)} as {builder}: {cause}") from error
    elif dataset_name:
        try:
            loaded = datasets.load_dataset(dataset_name, dataset_config)
        except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as error:
            offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
            hint = (
                " (offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
                if offline
                else " (no network? use local files with --train-files, or the embedded default dataset)"
            )
            raise ConnectionError(f"cannot load the Hub dataset {dataset_name!r}: {error}{hint}") from error
        if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded:
            raise ValueError(f"the Hub dataset {dataset_name!r} has no 'train' split")
    else:
        return datasets.DatasetDict(
            train=datasets.Dataset.from_list(
                generate_default_dataset(
                    default_documents, split="train", seed=seed, max_chars=default_max_chars,
                    min_distance=default_min_distance, task_weights=default_task_weights,
                    max_distance=default_max_distance, passkey_statements=default_passkey_statements,
                )
            ),
            validation=datasets.Dataset.from_list(
                generate_default_dataset(
                    default_validation_documents, split="validation", seed=seed, max_chars=default_max_chars,
                    min_distance=default_min_distance, task_weights=default_task_weights,
                    max_distance=default_max_distance, passkey_statements=default_passkey_statements,
                )
            ),
        )

    for name, split in loaded.items():
        if text_column not in split.column_names:
            raise ValueError(
                f"the {name} data has no column {text_column!r} (its columns: {split.column_names}); "
                "name the text column with text_column"
            )
    if text_column != "text":
        if "text" in loaded["train"].column_names:
            loaded = loaded.remove_columns("text")  # the chosen column replaces it
        loaded = loaded.rename_column(text_column, "text")
    if "validation" not in loaded:
        if validation_fraction == 0.0 or len(loaded["train"]) < 2:
            loaded["validation"] = loaded["train"].select([])
        else:
            parts = loaded["train"].train_test_split(test_size=validation_fraction, seed=seed)
            loaded = datasets.DatasetDict(train=parts["train"], validation=parts["test"])
    return datasets.DatasetDict(train=loaded["train"], validation=loaded["validation"])


def load_records(
    *,
    files: Sequence[str] = (),
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    split: str = "test",
    text_column: str = "text",
    sample_by: str = "document",
    default_documents: int = 200,
    default_max_chars: int = 1024,
    default_min_distance: int = 128,
    seed: int = 0,
    default_task_weights: Sequence[float] = DEFAULT_TASK_WEIGHTS,
    default_max_distance: int | None = None,
    default_passkey_statements: int = PASSKEY_STATEMENTS,
) -> list[dict]:
    """Evaluation records (dicts with at least ``text``) from files, a Hub dataset split, or the embedded default
    dataset's ``split``. Retrieval fields (``evidence_start``, ``evidence_end``, ``answer_start``,
    ``answer_end``) are kept where the data has them."""
    if not files and not dataset_name:
        return generate_default_dataset(
            default_documents, split=split, seed=seed, max_chars=default_max_chars, min_distance=default_min_distance,
            task_weights=default_task_weights, max_distance=default_max_distance, passkey_statements=default_passkey_statements,
        )
    try:
        import datasets
    except ImportError as error:
        raise ImportError("reading files or Hub datasets needs the `datasets` package: pip install datasets") from error
    if files and dataset_name:
        raise ValueError("give either files or a Hub dataset name, not both")
    if files:
        builder = _builder_for(files, "files")
        kwargs = {"sample_by": sample_by} if builder == "text" else {}
        try:
            loaded = datasets.load_dataset(builder, data_files={"train": list(files)}, **kwargs)["train"]
        except datasets.exceptions.DatasetGenerationError as error:
            raise ValueError(f"cannot read {', '.join(files)} as {builder}: {error.__cause__ or error}") from error
    else:
        try:
            loaded = datasets.load_dataset(dataset_name, dataset_config, split=split)
        except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as error:
            raise ConnectionError(f"cannot load the Hub dataset {dataset_name!r} (split {split!r}): {error}") from error
        except ValueError as error:  # an unknown split
            raise ValueError(f"the Hub dataset {dataset_name!r}: {error}") from error
    if text_column not in loaded.column_names:
        raise ValueError(f"the data has no column {text_column!r} (its columns: {loaded.column_names})")
    records = loaded.to_list()
    if text_column != "text":
        for record in records:
            record["text"] = record.pop(text_column)
    return records


def question_records(records: Iterable[dict]) -> list[dict]:
    """One retrieval record per question: each record's ``questions`` spans, or for a record without that field
    (JSON lines of one's own) its one evidence/answer span; records with neither are left out. Evaluation scores
    every question this way, each on the document up to its own answer."""
    expanded = []
    for record in records:
        spans = record.get("questions")
        if spans is None:
            spans = [[record.get(key) for key in _SPAN_FIELDS]] if is_retrieval_record(record) else []
        for span in spans:
            expanded.append({**{k: v for k, v in record.items() if k != "questions"}, **dict(zip(_SPAN_FIELDS, span))})
    return expanded


def is_retrieval_record(record: dict) -> bool:
    """Whether a record has evidence and answer spans to score retrieval on."""
    return all(isinstance(record.get(key), int) and record[key] >= 0 for key in _SPAN_FIELDS)


# ----------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------


def pack_documents(
    documents: Iterable[Sequence[int]],
    block_size: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    mode: str = "documents",
    answer_masks: Sequence[Sequence[int]] | None = None,
) -> dict[str, list[list[int]]]:
    """Packs token sequences into rows of exactly ``block_size`` tokens.

    ``answer_masks``, one 0/1 list per document as long as it, marks the tokens of retrieval answers: the rows
    then also get an ``answer_mask`` (0 on end tokens and padding), for a loss that weights the answers.

    Every document gets ``eos_token_id`` appended. Then:

    * ``mode="documents"``: documents are placed whole, in order, into the current row while they fit, else
      into a new row; a document longer than a row is cut into row-sized pieces. ``position_ids`` restart at 0
      with each document (piece): LongNet reads the restarts as document boundaries, so every document's logical
      positions, hence its segments, start at 0, and no token attends another document (see
      :class:`PackedRowsCollator`). The rest of a row is padding, with positions of its own restarting at 0 (a
      pseudo-document nobody attends) and label -100. The first token of each document has label -100 too: it
      is not predicted from another document.
    * ``mode="concat"``: the documents are concatenated and cut every ``block_size`` tokens, as in GPT-2
      pre-training; the tail shorter than a row is dropped. Positions run 0..block_size-1 in every row, and
      attention crosses document boundaries.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids``: lists of rows.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"`block_size` must be an int >= 2, got {block_size!r}")
    if mode not in PACKING_MODES:
        raise ValueError(f"`mode` must be one of {PACKING_MODES}, got {mode!r}")
    documents = list(documents)
    if answer_masks is not None:
        answer_masks = list(answer_masks)
        if len(answer_masks) != len(documents) or any(len(m) != len(d) for m, d in zip(answer_masks, documents)):
            raise ValueError("`answer_masks` must hold one mask per document, as long as the document")
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    if answer_masks is not None:
        rows["answer_mask"] = []

    if mode == "concat":
        stream: list[int] = []
        flags: list[int] = []
        for index, document in enumerate(documents):
            stream.extend(document)
            stream.append(eos_token_id)
            if answer_masks is not None:
                flags.extend(answer_masks[index])
                flags.append(0)
            while len(stream) >= block_size:
                row, stream = stream[:block_size], stream[block_size:]
                rows["input_ids"].append(row)
                rows["labels"].append(list(row))
                rows["position_ids"].append(list(range(block_size)))
                if answer_masks is not None:
                    rows["answer_mask"].append(flags[:block_size])
                    flags = flags[block_size:]
        return rows

    current: dict[str, list[int]] = {key: [] for key in rows}

    def close_row() -> None:
        if not current["input_ids"]:
            return
        padding = block_size - len(current["input_ids"])
        current["input_ids"] += [pad_token_id] * padding
        current["labels"] += [-100] * padding
        current["position_ids"] += list(range(padding))
        if answer_masks is not None:
            current["answer_mask"] += [0] * padding
        for key, kept_rows in rows.items():
            kept_rows.append(current[key])
            current[key] = []

    for index, document in enumerate(documents):
        tokens = list(document) + [eos_token_id]
        flags = list(answer_masks[index]) + [0] if answer_masks is not None else None
        for start in range(0, len(tokens), block_size):
            piece = tokens[start : start + block_size]
            if len(current["input_ids"]) + len(piece) > block_size:
                close_row()
            current["input_ids"] += piece
            current["labels"] += [-100] + piece[1:]
            current["position_ids"] += list(range(len(piece)))
            if flags is not None:
                current["answer_mask"] += [0] + flags[start + 1 : start + len(piece)]  # the first token has no label
    close_row()
    return rows


class PackedRowsCollator:
    """Collates rows made by :func:`pack_documents`.

    ``mode="documents"``: the rows of a batch are joined end to end into a single row of
    ``batch_size * block_size`` tokens, with no attention mask, so that the restarting ``position_ids`` mark
    every document (LongNet, like transformers' ``DataCollatorWithFlattening`` convention, reads packed
    documents from a batch of one row). ``mode="concat"``, or ``flatten=False`` (for transformers' Llama with SDPA or
    flash attention): the rows are stacked into ``(batch, block_size)`` without ``position_ids``, each row one
    causal context in which documents see each other. (Given restarting ``position_ids``, transformers would keep
    the documents apart with a materialised ``batch x block_size^2`` mask and a kernel that skips nothing, 8.6 GB
    and the full quadratic work at 8 rows of 32K.)
    """

    def __init__(self, mode: str = "documents", *, flatten: bool = True):
        if mode not in PACKING_MODES:
            raise ValueError(f"`mode` must be one of {PACKING_MODES}, got {mode!r}")
        self.mode = mode
        self.flatten = flatten and mode == "documents"

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        keys = ("input_ids", "labels", "position_ids") if self.flatten else ("input_ids", "labels")
        if features and "answer_mask" in features[0]:
            keys += ("answer_mask",)
        batch = {key: torch.tensor([f[key] for f in features], dtype=torch.long) for key in keys}
        if self.flatten:
            batch = {key: value.reshape(1, -1) for key, value in batch.items()}
        return batch


def _packing_token_ids(tokenizer) -> tuple[int, int]:
    """The end token that packing puts after every document, and the padding token (the end token if none)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token, which packing puts between documents")
    return tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _tokenize_marking_answers(tokenizer, texts: Sequence[str], questions: Sequence[Sequence] | None):
    """Token ids of ``texts`` and, when ``questions`` (each text's spans, as in the default dataset's records)
    are given, one 0/1 mask per text: 1 on the tokens that overlap an answer span ``[span[2], span[3])``."""
    if questions is None:
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"], None
    encoding = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    masks = []
    for offsets, spans in zip(encoding["offset_mapping"], questions):
        mask = [0] * len(offsets)
        token_ends = [end for _, end in offsets]
        token_starts = [start for start, _ in offsets]
        for span in spans:  # the tokens with end > answer start and start < answer end, found by bisection
            first, stop = bisect.bisect_right(token_ends, span[2]), bisect.bisect_left(token_starts, span[3])
            mask[first:stop] = [1] * max(0, stop - first)
        masks.append(mask)
    return encoding["input_ids"], masks


def tokenize_and_pack(
    dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    mode: str = "documents",
    num_proc: int | None = None,
    description: str = "data",
    mark_answers: bool = False,
):
    """Tokenizes the ``text`` column of a :class:`datasets.Dataset` and packs it with :func:`pack_documents`;
    returns a dataset of ``input_ids``, ``labels`` and ``position_ids`` rows, and with ``mark_answers`` an
    ``answer_mask`` too: 1 on the tokens that overlap an answer span of the ``questions`` column (the default
    dataset's), 0 elsewhere and in data without that column."""
    eos_token_id, pad_token_id = _packing_token_ids(tokenizer)
    has_questions = mark_answers and "questions" in dataset.column_names

    def tokenize(batch):
        if not mark_answers:
            return {"input_ids": _tokenize_marking_answers(tokenizer, batch["text"], None)[0]}
        questions = batch["questions"] if has_questions else [[] for _ in batch["text"]]
        input_ids, masks = _tokenize_marking_answers(tokenizer, batch["text"], questions)
        return {"input_ids": input_ids, "answer_mask": masks}

    def pack(batch):
        return pack_documents(
            batch["input_ids"], block_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id, mode=mode,
            answer_masks=batch["answer_mask"] if mark_answers else None,
        )

    tokenized = dataset.map(
        tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc=f"Tokenizing {description}"
    )
    return tokenized.map(
        pack, batched=True, batch_size=1000, remove_columns=tokenized.column_names, num_proc=num_proc,
        desc=f"Packing {description} into blocks of {block_size}",
    )


def default_documents_per_row(tokenizer, block_size: int, *, rows: int = 8, **document_settings) -> float:
    """About how many documents of :func:`generate_default_dataset` (``document_settings`` are its keyword
    arguments) a row of ``block_size`` tokens holds when packed by :func:`pack_documents`: measured by packing its
    first documents until they fill ``rows`` rows. It sizes the chunks of :class:`DefaultDatasetStream` and turns a
    number of training steps into a number of documents (``scripts/train.py --default-curriculum``)."""
    _check_int(rows, "rows", minimum=1)
    eos_token_id, pad_token_id = _packing_token_ids(tokenizer)
    input_ids: list[list[int]] = []
    tokens = 0  # with the end token of each document
    while tokens < rows * block_size and len(input_ids) < 65536:
        records = generate_default_dataset(16, first_document=len(input_ids), **document_settings)
        batch = _tokenize_marking_answers(tokenizer, [r["text"] for r in records], None)[0]
        input_ids += batch
        tokens += sum(len(ids) + 1 for ids in batch)
    packed = pack_documents(input_ids, block_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id)["input_ids"]
    last_row_fill = sum(1 for token in packed[-1] if token != pad_token_id) / block_size if pad_token_id != eos_token_id else 1.0
    return len(input_ids) / (len(packed) - 1 + last_row_fill)


class DefaultDatasetStream(IterableDataset):
    """Packed rows of the embedded default dataset, made as they are read: nothing is held in memory or on disk
    and the ``datasets`` package is not needed, so that training at long contexts (32K tokens and more, for as many
    steps as one likes) starts at once.

    The rows hold the documents of :func:`generate_default_dataset` (``document_settings`` are its keyword
    arguments) in order, packed by :func:`pack_documents` in chunks of ``documents_per_chunk`` documents (by
    default as many as fill about :data:`STREAM_ROWS_PER_CHUNK` rows: the last row of a chunk is padded, so a chunk
    of few short documents would be mostly padding). A data loader's workers take the chunks in turn: the rows are
    the same for any number of workers, their order in the batches is not. ``num_documents=None`` streams without
    end (train with ``max_steps``). ``mark_answers`` adds the ``answer_mask`` rows of :func:`tokenize_and_pack`.

    ``curriculum``, a sequence of ``(documents, settings)`` pairs, comes first: its first ``documents`` documents
    are made with ``settings`` in place of the matching ``document_settings`` (for example ``{"max_chars": 512}``:
    short documents, many to a row), then the next stage's, and after the last stage the stream goes on with
    ``document_settings`` alone. ``num_documents`` counts the stages' documents too. A retrieval circuit forms
    sooner where a query has few keys to choose from (docs/quality.md, "Retrieval at 32K").
    """

    def __init__(self, tokenizer, block_size: int, *, num_documents: int | None = None,
                 documents_per_chunk: int | None = None, mark_answers: bool = False,
                 curriculum: Sequence[tuple[int, dict]] = (), **document_settings):
        if num_documents is not None:
            _check_int(num_documents, "num_documents", minimum=1)
        if documents_per_chunk is not None:
            _check_int(documents_per_chunk, "documents_per_chunk", minimum=1)
        self.eos_token_id, self.pad_token_id = _packing_token_ids(tokenizer)
        self.tokenizer, self.block_size, self.num_documents, self.mark_answers = tokenizer, block_size, num_documents, mark_answers
        generate_default_dataset(0, **document_settings)  # checks the settings here, not later in a worker

        def chunk_size(settings: dict) -> int:
            if documents_per_chunk is not None:
                return documents_per_chunk
            return max(1, round(STREAM_ROWS_PER_CHUNK * default_documents_per_row(tokenizer, block_size, **settings)))

        self.stages: list[tuple[int | None, dict, int]] = []  # (the stage's end document or None, settings, chunk)
        end = 0
        for index, stage in enumerate(curriculum):
            if not (isinstance(stage, (tuple, list)) and len(stage) == 2 and isinstance(stage[1], dict)):
                raise ValueError(f"`curriculum[{index}]` must be a (documents, settings dict) pair, got {stage!r}")
            _check_int(stage[0], f"curriculum[{index}][0] (its number of documents)", minimum=1)
            settings = {**document_settings, **stage[1]}
            generate_default_dataset(0, **settings)
            end += stage[0]
            self.stages.append((end, settings, chunk_size(settings)))
        self.stages.append((None, document_settings, chunk_size(document_settings)))

    def chunks(self):
        """``(first document, number of documents, settings)`` of every chunk, in order; no chunk spans two stages."""
        first = 0
        for end, settings, size in self.stages:
            if self.num_documents is not None:
                end = self.num_documents if end is None else min(end, self.num_documents)
            while end is None or first < end:
                count = size if end is None else min(size, end - first)
                yield first, count, settings
                first += count

    def rows_of_chunk(self, first: int, count: int, settings: dict) -> list[dict]:
        records = generate_default_dataset(count, first_document=first, **settings)
        input_ids, masks = _tokenize_marking_answers(
            self.tokenizer, [r["text"] for r in records], [r["questions"] for r in records] if self.mark_answers else None
        )
        packed = pack_documents(
            input_ids, self.block_size, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, answer_masks=masks
        )
        return [dict(zip(packed, row)) for row in zip(*packed.values())]

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index, chunk in enumerate(self.chunks()):
            if index % num_workers == worker_id:
                yield from self.rows_of_chunk(*chunk)
