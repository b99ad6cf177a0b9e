"""Incremental detokenisation gives the text a full decode gives, token after token."""

from __future__ import annotations

from collab_agent.backends.detokenize import IncrementalText, find_stop, stop_holdback
from collab_agent.backends.tiny import qwen_tokenizer

TEXT = "Add them.\n\nSo 7 × 3 = 21 ✓ — 東京の天気は晴れ 🌦️ then\tdone. café naïve"


def test_incremental_text_matches_the_full_decode_after_every_token() -> None:
    tokenizer = qwen_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    decoded = IncrementalText(tokenizer)
    for k, token in enumerate(ids, start=1):
        decoded.push(token)
        full = tokenizer.decode(ids[:k])
        # settled text is the full decode; only a token ending mid-character waits
        assert full.startswith(decoded.text) and "\ufffd" not in decoded.text
        if not full.endswith("\ufffd"):
            assert decoded.text == full
        assert decoded.final_text() == full
    assert decoded.text == TEXT
    assert any("\ufffd" in tokenizer.decode(ids[:k]) for k in range(len(ids)))  # split chars
    assert decoded.lengths[-1] == len(TEXT) and decoded.lengths == sorted(decoded.lengths)


def test_a_stop_string_across_tokens_is_found_in_the_tail_only() -> None:
    tokenizer = qwen_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    stops = ["= 21 ✓", "\n\n"]
    decoded = IncrementalText(tokenizer)
    hits = []
    for token in ids:
        checked = len(decoded.text)
        if decoded.push(token):
            found = find_stop(decoded.text, stops, checked)
            if found is not None:
                hits.append(found)
    # each stop is reported once, at the token that completes it, at its true position
    assert hits == [(TEXT.index("\n\n"), "\n\n"), (TEXT.index("= 21 ✓"), "= 21 ✓")]


def test_stop_holdback_is_the_longest_tail_that_could_start_a_stop() -> None:
    assert stop_holdback("one\n", ["\n\n"]) == 1
    assert stop_holdback("one", ["\n\n"]) == 0
    assert stop_holdback("a Final ans", ["Final answer:", "ans"]) == 9
    assert stop_holdback("abc", ["abc"]) == 0  # a whole stop is found, not held back
    assert stop_holdback("x", ["", "y"]) == 0
