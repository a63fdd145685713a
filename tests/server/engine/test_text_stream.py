"""``TextStream`` on the embedded model's real tokenizer (SmolLM2, byte-level BPE): the windowed,
incremental decode hands out, token by token, exactly what decoding every id each token hands out;
the deltas join to ``tokenizer.decode(ids, skip_special_tokens=True)`` cut at the first stop
string, for random ids (Hypothesis) and real texts, Chinese among them (~1.9 tokens a character,
so characters span tokens), with stop strings that span tokens; each decode is a short window."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import pytest

from talora.server.engine.generation import TextStream

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was 3.14 degrees, née café!",
    "机器学习是人工智能的一个分支。我们今天在北京见面，然后一起去吃饺子。",
    "Mixed: 你好，世界！🙂🚀 naïve façade — 日本語のテキストも少し。Ünïcödé ✓",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code, tabs\tand\nnew lines\n\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from talora.adapters.model.loading import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


class DecodeAll:
    """The tokenizer with nothing but ``decode``: ``TextStream`` decodes every id each token."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


class Windows:
    """The tokenizer, recording how many ids each decode is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.is_fast, self.lengths = tokenizer, True, []

    def decode(self, ids, skip_special_tokens=False):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def expected(tokenizer, ids: list[int], stop: tuple[str, ...]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text[:min([i for i in (text.find(s) for s in stop) if i >= 0], default=len(text))]


def stream_both(tokenizer, ids: list[int], stop: tuple[str, ...]) -> str:
    """Push ``ids`` into a windowed and a decode-everything stream; both hand out the same text at every
    token and stop at the same one. Returns the windowed stream's whole output."""
    windowed, full = TextStream(tokenizer, stop), TextStream(DecodeAll(tokenizer), stop)
    deltas = []
    for token in ids:
        deltas.append(windowed.push(token))
        assert deltas[-1] == full.push(token) and windowed.stopped == full.stopped
        if windowed.stopped:
            break
    deltas.append(windowed.finish())
    assert deltas[-1] == full.finish() and windowed.text == full.text == "".join(deltas)
    assert windowed._windowed  # the windows agreed with the decode throughout: no fallback hid a difference
    return "".join(deltas)


@pytest.fixture(scope="module")
def split_ids(tokenizer) -> list[int]:
    """Ids of tokens that hold part of a character (their own decode has U+FFFD): random ids drawn from
    them often leave a character incomplete, or complete one begun by another token."""
    ids = {i for text in TEXTS for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
    return sorted(i for i in ids if "\ufffd" in tokenizer.decode([i]))


@hypothesis.settings(max_examples=150, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(data=st.data())
def test_random_ids_stream_as_the_whole_decode(tokenizer, split_ids, data):
    vocab = len(tokenizer)
    ids = data.draw(st.lists(st.one_of(st.integers(0, vocab - 1), st.sampled_from(split_ids),
                                       st.sampled_from(tokenizer.all_special_ids)), max_size=40))
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    stop: tuple[str, ...] = ()
    if whole and data.draw(st.booleans()):
        start = data.draw(st.integers(0, len(whole) - 1))
        stop = (whole[start:start + data.draw(st.integers(1, 4))], "\x00never")
        hypothesis.assume("\ufffd" not in stop[0])  # a partial character decodes to it until completed
    assert stream_both(tokenizer, ids, stop) == expected(tokenizer, ids, stop)


@pytest.mark.parametrize("text", TEXTS, ids=["english", "chinese", "mixed", "code"])
@pytest.mark.parametrize("stop", [(), ("世界",), ("一起去", "北京"), ("brown fox", "é"), ("🚀", "return")],
                         ids=["none", "chinese", "two-chinese", "latin", "emoji-or-word"])
def test_real_texts_stream_as_the_whole_decode_cut_at_the_first_stop(tokenizer, text, stop):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert stream_both(tokenizer, ids, stop) == expected(tokenizer, ids, stop)


def test_a_stop_string_split_across_tokens_is_never_handed_out(tokenizer):
    text, stop = TEXTS[1], ("一起去",)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop)
    assert not any("一起去" in tokenizer.decode([token]) for token in ids)  # it spans tokens
    deltas = [stream.push(token) for token in ids if not stream.stopped]
    assert stream.stopped and len(deltas) < len(ids) - 3  # stopped at the stop string's last token
    assert "".join(deltas) == text[:text.index("一起去")]  # deltas are final: none of it got out


class CleanedChars:
    """Characters by code point, decoded with a clean-up across tokens (" ." -> "."): a decoder whose
    window can disagree with the whole decode."""

    is_fast = True

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids)).replace(" .", ".")


def test_a_decoder_that_is_not_local_falls_back_to_the_whole_decode():
    ids = [ord(ch) for ch in "ab c .d e."]
    windowed, full = TextStream(CleanedChars(), ("d",)), TextStream(DecodeAll(CleanedChars()), ("d",))
    assert [windowed.push(i) for i in ids] == [full.push(i) for i in ids]
    assert windowed.text == full.text == "ab c." and not windowed._windowed


def test_each_token_decodes_a_short_window(tokenizer):
    recorder = Windows(tokenizer)
    ids = tokenizer(" ".join(TEXTS) * 4, add_special_tokens=False)["input_ids"]
    assert len(ids) > 300
    stream = TextStream(recorder, ())
    out = "".join(stream.push(token) for token in ids) + stream.finish()
    assert out == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(recorder.lengths) <= 8  # a full decode would reach len(ids)
