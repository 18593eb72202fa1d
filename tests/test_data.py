"""modeling_longnet.data: the embedded dataset (deterministic, long-range), the tokenizers, loading and packing."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_longnet import LongNetConfig, LongNetForCausalLM
from modeling_longnet.data import (
    END_OF_TEXT,
    PADDING,
    PASSKEY_QUESTION,
    PASSKEY_STATEMENTS,
    TASKS,
    PackedRowsCollator,
    byte_level_tokenizer,
    generate_default_dataset,
    is_retrieval_record,
    least_document_length,
    load_records,
    load_text_datasets,
    load_tokenizer,
    pack_documents,
    pass_keys,
    question_records,
    train_bpe_tokenizer,
)
from modeling_longnet.evaluation import locate_answer

pytest_plugins = ["scripts_support"]  # its autouse fixture one_torch_thread

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def byte_tokenizer():
    return byte_level_tokenizer()


# ----------------------------------------------------------------------------------------------------------
# The embedded dataset
# ----------------------------------------------------------------------------------------------------------


def _digest(documents) -> str:
    return hashlib.sha256(json.dumps(documents, sort_keys=True).encode()).hexdigest()


def test_generation_is_deterministic_across_processes():
    """The same arguments give the same documents in another interpreter with another hash seed."""
    code = (
        "import hashlib, json; from modeling_longnet.data import generate_default_dataset; "
        "print(hashlib.sha256(json.dumps(generate_default_dataset(60, split='train', seed=3), sort_keys=True)"
        ".encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONHASHSEED="12345")
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == _digest(generate_default_dataset(60, split="train", seed=3))


def test_documents_do_not_depend_on_how_many_are_asked():
    assert generate_default_dataset(7, seed=1) == generate_default_dataset(30, seed=1)[:7]


def test_splits_and_seeds_give_different_documents():
    train = {d["text"] for d in generate_default_dataset(50, split="train")}
    assert not train & {d["text"] for d in generate_default_dataset(50, split="validation")}
    assert not train & {d["text"] for d in generate_default_dataset(50, split="train", seed=1)}


def test_task_weights_choose_the_tasks():
    mixed = generate_default_dataset(200)
    assert {d["task"] for d in mixed} == set(TASKS)
    only_passkey = generate_default_dataset(30, task_weights=(1, 0, 0))
    assert {d["task"] for d in only_passkey} == {"passkey"}


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    min_distance=st.integers(16, 300),
    extra_chars=st.integers(0, 1500),
    split=st.sampled_from(["train", "validation", "test"]),
    spread=st.one_of(st.none(), st.integers(0, 2000)),
    statements=st.sampled_from([1, 2, 4, 8, 16]),
)
def test_retrieval_evidence_lies_far_before_the_answer(seed, min_distance, extra_chars, split, spread, statements):
    """Every answer's evidence (its latest statement before it) lies at least `min_distance` characters back (and
    at most `max_distance`), nothing in between gives it away, and documents respect `max_chars`."""
    max_chars = least_document_length(min_distance, statements) + extra_chars
    max_distance = None if spread is None else min_distance + spread
    records = generate_default_dataset(
        12, split=split, seed=seed, max_chars=max_chars, min_distance=min_distance, max_distance=max_distance,
        passkey_statements=statements,
    )
    for record in records:
        text = record["text"]
        assert len(text) <= max_chars and text.isascii()
        if record["task"] == "text":
            assert not is_retrieval_record(record) and record["questions"] == []
            continue
        assert record["questions"] and record["questions"][-1] == [record[k] for k in ("evidence_start", "evidence_end", "answer_start", "answer_end")]
        for evidence_start, evidence_end, answer_start, answer_end in record["questions"]:
            evidence, answer = text[evidence_start:evidence_end], text[answer_start:answer_end]
            assert evidence == answer
            assert answer_start - evidence_end >= min_distance
            if max_distance is not None and record["task"] == "passkey":
                # the key's statement is padded with up to statements - 1 spaces, then comes the question
                assert answer_start - evidence_end <= max(max_distance, len(". ") + statements - 1 + len(PASSKEY_QUESTION))
            assert answer not in text[evidence_end:answer_start]
        key = text[record["answer_start"] : record["answer_end"]]
        if record["task"] == "passkey":
            # the key's letter and digit occur nowhere but in its statements and answers
            occurrences = statements + len(record["questions"])
            assert sum(c.isupper() for c in text) == occurrences and sum(c.isdigit() for c in text) == occurrences
            assert text.count(key) == occurrences
        else:
            assert key.isdigit() and text.count(key) == 2  # the evidence and the answer, nowhere else


@pytest.mark.parametrize("count", [PASSKEY_STATEMENTS, 1, 2, 8, 16])
def test_pass_key_statements_land_on_every_residue(count):
    """A query of a rate-r branch sees only keys of its own residue modulo r: the `count` statements of the key
    must cover all `count` residues, or most queries of the largest rate could never find it."""
    records = generate_default_dataset(
        20, task_weights=(1, 0, 0), max_chars=least_document_length(32, count) + 64, min_distance=32, passkey_statements=count,
    )
    for record in records:
        key = record["text"][record["answer_start"] : record["answer_end"]]
        first_answer = record["questions"][0][2]
        statements = [i for i in range(first_answer) if record["text"].startswith(key, i)]
        assert len(statements) == count
        assert {i % count for i in statements} == set(range(count))


def test_a_wide_distance_range_is_spread_over_every_scale():
    """With `max_distance` the distances are log-uniform: each doubling of distance gets about the same share
    (a little more for the shortest, as the last gap of a document is cut to what fits)."""
    records = generate_default_dataset(
        40, task_weights=(1, 0, 0), max_chars=32767, min_distance=32, max_distance=4096, passkey_statements=8
    )
    distances = [answer - evidence for _, evidence, answer, _ in (q for r in records for q in r["questions"])]
    shares = [sum(32 * 2**k <= d < 32 * 2 ** (k + 1) for d in distances) / len(distances) for k in range(6)]
    assert len(distances) > 500 and all(0.1 < share < 0.22 for share in shares), shares  # 1/7 each, ideally


def test_documents_can_be_read_from_any_index():
    assert generate_default_dataset(5, first_document=7, seed=1) == generate_default_dataset(12, seed=1)[7:]


def test_held_out_splits_share_no_pass_key_with_training():
    train, held_out = set(pass_keys("train")), set(pass_keys("test"))
    assert not train & held_out and pass_keys("validation") == pass_keys("test")
    assert len(train) == 208 and len(held_out) == 52  # 26 letters x 10 digits, one pair in five held out
    assert {k[0] for k in held_out} == {k[0] for k in train} and {k[1] for k in held_out} == {k[1] for k in train}
    for split, pool in (("train", train), ("test", held_out), ("demo", held_out)):
        for record in generate_default_dataset(40, split=split, task_weights=(1, 0, 0), max_chars=300, min_distance=32):
            assert record["text"][record["answer_start"] : record["answer_end"]] in pool


def test_question_records_give_one_record_per_question():
    records = generate_default_dataset(30, max_chars=400, min_distance=32)
    expanded = question_records(records)
    assert len(expanded) == sum(len(r["questions"]) for r in records)
    assert all(is_retrieval_record(r) and "questions" not in r for r in expanded)
    # a record of one's own, without `questions`: its one span
    own = {"text": "x = 1234 ... x is 1234", "evidence_start": 4, "evidence_end": 8, "answer_start": 18, "answer_end": 22}
    assert question_records([own, {"text": "no spans"}]) == [own]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), smallest_segment=st.sampled_from([16, 32, 64, 128]))
def test_evidence_is_outside_the_smallest_segment_in_tokens(byte_tokenizer, seed, smallest_segment):
    """With the settings train.py uses (min_distance = twice the smallest segment length) and the byte-level
    tokenizer, the answer's first token and its evidence never share a segment of the smallest branch: only
    the longer, dilated branches connect them."""
    min_distance = 2 * smallest_segment
    records = generate_default_dataset(10, seed=seed, max_chars=2 * (min_distance + 256), min_distance=min_distance)
    for record in filter(is_retrieval_record, records):
        input_ids, evidence, answer = locate_answer(byte_tokenizer, record)
        assert byte_tokenizer.decode([input_ids[i] for i in answer]) == record["text"][record["answer_start"] : record["answer_end"]]
        last_evidence_token = evidence + (record["evidence_end"] - record["evidence_start"]) - 1
        assert answer[0] - last_evidence_token > smallest_segment
        assert answer[0] // smallest_segment != last_evidence_token // smallest_segment


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_documents": -1}, "`num_documents`"),
        ({"num_documents": 3, "min_distance": 0}, "`min_distance`"),
        ({"num_documents": 3, "max_chars": 300, "min_distance": 128}, "`max_chars` (300) is too short"),
        ({"num_documents": 3, "task_weights": (1, 1)}, "`task_weights`"),
        ({"num_documents": 3, "task_weights": (0, 0, 0)}, "`task_weights`"),
        ({"num_documents": 3, "split": ""}, "`split`"),
        ({"num_documents": 3, "min_distance": 64, "max_distance": 32}, "`max_distance` must be an int >= 64"),
        ({"num_documents": 3, "passkey_statements": 3}, "`passkey_statements` must be a power of two"),
        ({"num_documents": 3, "passkey_statements": 0}, "`passkey_statements` must be a power of two"),
        ({"num_documents": 3, "first_document": -1}, "`first_document`"),
    ],
)
def test_generator_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_default_dataset(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
# Text holding a special token's own spelling ("<|pad|>") becomes that token, by design: such text is left out.
@given(text=st.text(max_size=200).filter(lambda t: END_OF_TEXT not in t and PADDING not in t))
def test_byte_tokenizer_is_lossless_and_its_ids_are_the_bytes(byte_tokenizer, text):
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert byte_tokenizer.decode(ids) == text


def test_byte_tokenizer_round_trips_through_auto_tokenizer(tmp_path, byte_tokenizer):
    from transformers import AutoTokenizer

    byte_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = f"pass key 12345 é{END_OF_TEXT}"
    assert loaded(text)["input_ids"] == byte_tokenizer(text)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id, len(loaded)) == (256, 257, 256, 258)
    assert loaded.convert_ids_to_tokens([256, 257]) == [END_OF_TEXT, PADDING]


def test_bpe_tokenizer_learns_the_training_text(tmp_path):
    documents = generate_default_dataset(60)
    texts = [d["text"] for d in documents]
    tokenizer = train_bpe_tokenizer(texts, 400)
    assert 258 < len(tokenizer) <= 400
    sample = next(d["text"] for d in documents if d["task"] == "text")
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sample and len(ids) < 0.7 * len(sample)  # merges shorten the text
    assert train_bpe_tokenizer(texts, 400).get_vocab() == tokenizer.get_vocab()  # deterministic
    with pytest.raises(ValueError, match="`vocab_size` must be an int >= 258"):
        train_bpe_tokenizer(texts, 100)


def test_load_tokenizer_names_and_errors(tmp_path):
    assert len(load_tokenizer("byte")) == 258
    assert len(load_tokenizer("bpe", texts=["abc abc abd"] * 10, vocab_size=300)) <= 300
    with pytest.raises(ValueError, match="`texts` are needed"):
        load_tokenizer("bpe")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------

EOS, PAD = 900, 901


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), max_size=12), block_size=st.integers(2, 32))
def test_document_packing_keeps_documents_whole_and_marks_them(lengths, block_size):
    documents = [[100 * (i + 1) + j for j in range(n)] for i, n in enumerate(lengths)]
    rows = pack_documents(documents, block_size, eos_token_id=EOS, pad_token_id=PAD)
    assert all(len(row) == block_size for key in rows for row in rows[key])
    # Read the rows back as documents: a new one starts where the position restarts at 0.
    pieces, labels = [], []
    for ids, row_labels, positions in zip(rows["input_ids"], rows["labels"], rows["position_ids"]):
        for token, label, position in zip(ids, row_labels, positions):
            if position == 0:
                pieces.append([])
                labels.append([])
            pieces[-1].append(token)
            labels[-1].append(label)
    real = [(piece, label) for piece, label in zip(pieces, labels) if piece[0] != PAD]
    expected = [tokens[i : i + block_size] for tokens in (d + [EOS] for d in documents) for i in range(0, len(tokens), block_size)]
    assert [piece for piece, _ in real] == expected
    for piece, label in real:
        assert label == [-100] + piece[1:]  # a document's first token is not predicted from another document
    for piece, label in zip(pieces, labels):
        if piece[0] == PAD:
            assert set(piece) == {PAD} and set(label) == {-100}
    # A document that fits a row is never cut.
    for tokens in (d + [EOS] for d in documents):
        if len(tokens) <= block_size:
            assert any(tokens == piece for piece, _ in real)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), max_size=12), block_size=st.integers(2, 32))
def test_concat_packing_cuts_the_stream(lengths, block_size):
    documents = [[100 * (i + 1) + j for j in range(n)] for i, n in enumerate(lengths)]
    stream = [token for d in documents for token in d + [EOS]]
    rows = pack_documents(documents, block_size, eos_token_id=EOS, pad_token_id=PAD, mode="concat")
    assert rows["input_ids"] == [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    assert rows["labels"] == rows["input_ids"]
    assert all(p == list(range(block_size)) for p in rows["position_ids"])


def test_packing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`block_size` must be an int >= 2"):
        pack_documents([[1]], 1, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        pack_documents([[1]], 4, eos_token_id=EOS, pad_token_id=PAD, mode="greedy")
    with pytest.raises(ValueError, match="`mode` must be one of"):
        PackedRowsCollator("greedy")


def test_collator_shapes():
    rows = pack_documents([[1, 2, 3], [4, 5], [6]], 4, eos_token_id=EOS, pad_token_id=PAD)
    features = [{key: rows[key][i] for key in rows} for i in range(len(rows["input_ids"]))]
    flat = PackedRowsCollator("documents")(features)
    assert set(flat) == {"input_ids", "labels", "position_ids"}
    assert flat["input_ids"].shape == (1, 4 * len(features))
    assert flat["position_ids"][0].tolist() == [p for f in features for p in f["position_ids"]]
    stacked = PackedRowsCollator("concat")(features)
    assert set(stacked) == {"input_ids", "labels"} and stacked["input_ids"].shape == (len(features), 4)
    rows_kept = PackedRowsCollator("documents", flatten=False)(features)  # for models that ignore position restarts
    assert set(rows_kept) == {"input_ids", "labels"} and rows_kept["input_ids"].shape == (len(features), 4)


def test_packed_batch_loss_is_the_loss_of_each_document_alone():
    """LongNet reads the packed documents of a collated batch as separate sequences: the batch loss is the
    token-weighted mean of the losses of the documents run one by one."""
    torch.manual_seed(0)
    config = LongNetConfig.from_preset("tiny", vocab_size=64, segment_lengths=[4, 8, 16], pad_token_id=63, eos_token_id=62)
    model = LongNetForCausalLM(config).double().eval()
    documents = [torch.randint(0, 60, (n,)).tolist() for n in (5, 9, 3, 14, 6)]
    rows = pack_documents(documents, 16, eos_token_id=62, pad_token_id=63)
    features = [{key: rows[key][i] for key in rows} for i in range(len(rows["input_ids"]))]
    with torch.no_grad():
        packed_loss = model(**PackedRowsCollator()(features)).loss
        total, count = 0.0, 0
        for document in documents:
            ids = torch.tensor([document + [62]])
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    # The loss is reduced in float32; a document attending another would move it by orders of magnitude more.
    torch.testing.assert_close(float(packed_loss), total / count, rtol=1e-6, atol=0.0)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def test_default_datasets_have_train_and_validation():
    data = load_text_datasets(default_documents=20, default_validation_documents=5, default_max_chars=600, default_min_distance=32)
    assert (len(data["train"]), len(data["validation"])) == (20, 5)
    assert data["train"][0] == generate_default_dataset(1, max_chars=600, min_distance=32)[0]


def test_files_of_each_kind_load(tmp_path):
    import pandas

    texts = [d["text"] for d in generate_default_dataset(10)]
    for i, text in enumerate(texts[:4]):
        (tmp_path / f"doc{i}.txt").write_text(text)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    pandas.DataFrame({"text": texts}).to_parquet(tmp_path / "data.parquet")

    from_text = load_text_datasets(train_files=[str(tmp_path / f"doc{i}.txt") for i in range(4)], validation_fraction=0.25)
    assert sorted(list(from_text["train"]["text"]) + list(from_text["validation"]["text"])) == sorted(texts[:4])
    from_json = load_text_datasets(train_files=[str(tmp_path / "data.jsonl")], text_column="body", validation_fraction=0.0)
    assert list(from_json["train"]["text"]) == texts and len(from_json["validation"]) == 0
    from_parquet = load_text_datasets(train_files=[str(tmp_path / "data.parquet")], validation_files=[str(tmp_path / "data.parquet")])
    assert list(from_parquet["train"]["text"]) == texts == list(from_parquet["validation"]["text"])


def test_loading_errors_name_the_problem(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "data.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(FileNotFoundError, match="missing.txt' does not exist"):
        load_text_datasets(train_files=[str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="the extension '.csv' is not one of"):
        load_text_datasets(train_files=[str(tmp_path / "data.csv")])
    with pytest.raises(ValueError, match="has no column 'text'"):
        load_text_datasets(train_files=[str(tmp_path / "data.jsonl")])
    with pytest.raises(ValueError, match="`validation_fraction`"):
        load_text_datasets(validation_fraction=1.0)


def test_evaluation_records_keep_retrieval_spans(tmp_path):
    records = generate_default_dataset(6, split="test")
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_records(files=[str(tmp_path / "held_out.jsonl")]) == records
    assert load_records(default_documents=6) == records
    assert [is_retrieval_record(r) for r in records] == [r["task"] != "text" for r in records]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    block_size=st.integers(2, 32),
    mode=st.sampled_from(["documents", "concat"]),
    seed=st.integers(0, 10_000),
)
def test_answer_masks_travel_with_their_tokens(lengths, block_size, mode, seed):
    """Packing with answer masks changes nothing else, and each mask value stays with its token: every token is
    numbered apart, so its value says which (document, position) it is. A token without a label (the first of a
    document piece), end tokens and padding are never marked."""
    rng = random.Random(seed)
    documents, masks, origin = [], [], {}
    for d, length in enumerate(lengths):
        documents.append([len(origin) + i for i in range(length)])
        masks.append([rng.randrange(2) for _ in range(length)])
        origin.update({len(origin) + i: (d, i) for i in range(length)})
    end, pad = 10_000, 10_001
    plain = pack_documents(documents, block_size, eos_token_id=end, pad_token_id=pad, mode=mode)
    marked = pack_documents(documents, block_size, eos_token_id=end, pad_token_id=pad, mode=mode, answer_masks=masks)
    assert {key: marked[key] for key in plain} == plain
    for tokens, labels, flags in zip(marked["input_ids"], marked["labels"], marked["answer_mask"]):
        assert len(flags) == block_size
        for token, label, flag in zip(tokens, labels, flags):
            if token in (end, pad) or label == -100:
                assert flag == 0
            else:
                d, i = origin[token]
                assert flag == masks[d][i]


def test_answer_masks_must_match_the_documents():
    with pytest.raises(ValueError, match="one mask per document"):
        pack_documents([[1, 2, 3]], 4, eos_token_id=0, pad_token_id=9, answer_masks=[[1, 0]])


def test_tokenize_and_pack_marks_the_answer_tokens(byte_tokenizer):
    datasets = pytest.importorskip("datasets")
    from modeling_longnet.data import tokenize_and_pack

    records = generate_default_dataset(6, max_chars=255, min_distance=32, task_weights=(1, 1, 1))
    packed = tokenize_and_pack(datasets.Dataset.from_list(records), byte_tokenizer, 256, mark_answers=True)
    marked = "".join(chr(t) for row in packed for t, m in zip(row["input_ids"], row["answer_mask"]) if m)
    expected = "".join(r["text"][a:b] for r in records for _, _, a, b in r["questions"])
    assert marked == expected and marked  # the keys and values of every question, in order
    plain = tokenize_and_pack(datasets.Dataset.from_list(records), byte_tokenizer, 256)
    assert "answer_mask" not in plain.column_names
    batch = PackedRowsCollator("documents")([packed[0], packed[1]])
    assert batch["answer_mask"].shape == batch["input_ids"].shape == (1, 512)


# ----------------------------------------------------------------------------------------------------------
# The default dataset streamed
# ----------------------------------------------------------------------------------------------------------

STREAM_SETTINGS = {"split": "train", "seed": 2, "max_chars": 400, "min_distance": 32, "task_weights": (1, 1, 1)}


@settings(max_examples=10, deadline=None)
@given(num_documents=st.integers(1, 40), chunk=st.integers(1, 9), block_size=st.sampled_from([401, 900, 1500]))
def test_the_stream_holds_the_default_documents_in_order(byte_tokenizer, num_documents, chunk, block_size):
    """Its rows, read in order, hold the documents of generate_default_dataset, each followed by the end token,
    and mark exactly the answers (as tokenize_and_pack does; the rows hold whole documents here, 400 characters
    and the end token at most, so that no answer starts a piece of a document, whose first token has no label)."""
    from modeling_longnet.data import DefaultDatasetStream

    stream = DefaultDatasetStream(
        byte_tokenizer, block_size, num_documents=num_documents, documents_per_chunk=chunk, mark_answers=True,
        **STREAM_SETTINGS,
    )
    rows = list(stream)
    assert all(len(row[key]) == block_size for row in rows for key in ("input_ids", "labels", "position_ids", "answer_mask"))
    records = generate_default_dataset(num_documents, **STREAM_SETTINGS)
    real = [(t, m) for row in rows for t, label, m, p in zip(row["input_ids"], row["labels"], row["answer_mask"], row["position_ids"])
            if not (t == byte_tokenizer.pad_token_id and label == -100)]
    eos = byte_tokenizer.eos_token_id
    assert [t for t, _ in real] == [t for r in records for t in [*r["text"].encode(), eos]]
    marked = "".join(chr(t) for t, m in real if m)
    assert marked == "".join(r["text"][a:b] for r in records for _, _, a, b in r["questions"])


def test_the_stream_gives_the_same_rows_to_any_number_of_workers(byte_tokenizer):
    from modeling_longnet.data import DefaultDatasetStream

    stream = DefaultDatasetStream(byte_tokenizer, 401, num_documents=30, documents_per_chunk=4, **STREAM_SETTINGS)
    alone = sorted(tuple(row["input_ids"]) for row in stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    assert sorted(tuple(row["input_ids"]) for row in loader) == alone
    endless = DefaultDatasetStream(byte_tokenizer, 401, documents_per_chunk=4, **STREAM_SETTINGS)
    first = [row["input_ids"] for _, row in zip(range(len(alone) + 5), endless)]
    assert len(first) == len(alone) + 5  # no end without num_documents


@settings(max_examples=10, deadline=None)
@given(
    stages=st.lists(st.tuples(st.integers(1, 12), st.sampled_from([240, 300, 400])), min_size=1, max_size=3),
    num_documents=st.one_of(st.none(), st.integers(1, 50)),
    chunk=st.one_of(st.none(), st.integers(1, 7)),
)
def test_a_curriculum_streams_each_stage_with_its_settings_then_the_rest(byte_tokenizer, stages, num_documents, chunk):
    """Documents 0.. of the stream are those of generate_default_dataset with each stage's settings in turn, then
    with the stream's own, whatever the chunking; no chunk mixes two stages; rows are those of the whole
    documents (each followed by the end token)."""
    from modeling_longnet.data import DefaultDatasetStream

    settings = {**STREAM_SETTINGS, "max_chars": 900}
    stream = DefaultDatasetStream(
        byte_tokenizer, 1024, num_documents=num_documents, documents_per_chunk=chunk,
        curriculum=[(count, {"max_chars": max_chars}) for count, max_chars in stages], **settings,
    )
    total = num_documents if num_documents is not None else sum(count for count, _ in stages) + 5
    expected, first = [], 0
    for count, max_chars in stages:
        expected += generate_default_dataset(count, first_document=first, **{**settings, "max_chars": max_chars})
        first += count
    expected += generate_default_dataset(max(0, total - first), first_document=first, **settings)
    expected = expected[:total]
    read, boundaries = [], set(itertools.accumulate(count for count, _ in stages))
    for first, count, chunk_settings in itertools.islice(stream.chunks(), 200):
        if first >= total:
            break
        assert not any(first < boundary < first + count for boundary in boundaries)  # within one stage
        read += generate_default_dataset(count, first_document=first, **chunk_settings)
    assert [r["text"] for r in read[:total]] == [r["text"] for r in expected]
    if num_documents is not None:
        assert sum(count for _, count, _ in stream.chunks()) == num_documents
        rows = list(stream)
        real = [t for row in rows for t, label in zip(row["input_ids"], row["labels"])
                if not (t == byte_tokenizer.pad_token_id and label == -100)]
        assert real == [t for r in expected for t in [*r["text"].encode(), byte_tokenizer.eos_token_id]]


def test_the_stream_sizes_its_chunks_to_fill_rows(byte_tokenizer):
    """By default a chunk holds about STREAM_ROWS_PER_CHUNK rows' worth of documents, at every stage: a fixed
    number of short documents would make one mostly padded row per chunk."""
    from modeling_longnet.data import STREAM_ROWS_PER_CHUNK, DefaultDatasetStream

    settings = {**STREAM_SETTINGS, "max_chars": 4000}
    stream = DefaultDatasetStream(byte_tokenizer, 4096, curriculum=[(300, {"max_chars": 300})], **settings)
    sizes = []
    for first, count, chunk_settings in itertools.islice(stream.chunks(), 0, 12, 5):  # one short chunk, two long
        rows = stream.rows_of_chunk(first, count, chunk_settings)
        assert STREAM_ROWS_PER_CHUNK - 1 <= len(rows) <= STREAM_ROWS_PER_CHUNK + 2, (chunk_settings["max_chars"], len(rows))
        sizes.append((chunk_settings["max_chars"], count))
    assert sizes[0][0] == 300 and sizes[-1][0] == 4000 and sizes[0][1] > 5 * sizes[-1][1]


@pytest.mark.parametrize("max_chars, block_size", [(300, 4096), (2000, 4096), (4000, 4096)])
def test_documents_per_row_predicts_how_many_documents_fill_rows(byte_tokenizer, max_chars, block_size):
    """The estimate, made on the first documents, holds for later ones: packing documents 5000.. into 20 rows
    takes within 10% of 20 x the estimate."""
    from modeling_longnet.data import default_documents_per_row

    settings = {**STREAM_SETTINGS, "max_chars": max_chars}
    estimate = default_documents_per_row(byte_tokenizer, block_size, **settings)
    records = generate_default_dataset(round(40 * estimate) + 16, first_document=5000, **settings)
    ids = [r["text"].encode() for r in records]
    packed = pack_documents(ids, block_size, eos_token_id=256, pad_token_id=257)["input_ids"]
    documents_in_20_rows = sum(1 for row in packed[:20] for t in row if t == 256)
    assert abs(documents_in_20_rows - 20 * estimate) <= 0.1 * 20 * estimate


def test_the_stream_checks_its_settings_at_once(byte_tokenizer):
    from modeling_longnet.data import DefaultDatasetStream

    with pytest.raises(ValueError, match="`passkey_statements` must be a power of two"):
        DefaultDatasetStream(byte_tokenizer, 256, passkey_statements=6)
    with pytest.raises(ValueError, match="`num_documents`"):
        DefaultDatasetStream(byte_tokenizer, 256, num_documents=0)
    with pytest.raises(ValueError, match=r"`curriculum\[0\]` must be a \(documents, settings dict\) pair"):
        DefaultDatasetStream(byte_tokenizer, 256, curriculum=[300], **STREAM_SETTINGS)
    with pytest.raises(ValueError, match=r"`curriculum\[1\]\[0\] \(its number of documents\)` must be an int >= 1"):
        DefaultDatasetStream(byte_tokenizer, 256, curriculum=[(2, {}), (0, {})], **STREAM_SETTINGS)
    with pytest.raises(ValueError, match="`max_chars` \\(100\\) is too short"):
        DefaultDatasetStream(byte_tokenizer, 256, curriculum=[(2, {"max_chars": 100})], **STREAM_SETTINGS)
    with pytest.raises(ValueError, match="`documents_per_chunk`"):
        DefaultDatasetStream(byte_tokenizer, 256, documents_per_chunk=0, **STREAM_SETTINGS)
