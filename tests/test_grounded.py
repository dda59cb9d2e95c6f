"""Grounded overlap metrics, checked against scores worked out by hand."""

from __future__ import annotations

import pytest

from lmpipe.grounded import f_measure, lcs_length, mean_overlap, rouge_l, token_f1, words


def test_words_lowercase_split_identifiers_and_drop_articles():
    assert words("Return THE sum of `os.path.join`, an is_dir flag!") == ["return", "sum", "of", "os", "path",
                                                                         "join", "is_dir", "flag"]
    assert words("") == [] and words("a an the ...") == []


def test_token_f1_by_hand():
    # candidate: return sum of list (4); reference: return sum of values of list (6)
    # overlap counted with multiplicity: return, sum, of, list = 4 ("of" appears once in the candidate)
    # P = 4/4, R = 4/6, F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert token_f1("Return the sum of a list.", "Return the sum of values of the list.") == pytest.approx(0.8)
    # repeated words only match as often as the reference has them: cand "x x x" vs ref "x y": overlap 1
    # P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert token_f1("x x x", "x y") == pytest.approx(0.4)
    assert token_f1("apples", "oranges") == 0.0


def test_empty_texts_follow_the_squad_convention():
    assert token_f1("", "") == 1.0 and rouge_l("the", "") == 1.0  # both empty after normalisation
    assert token_f1("", "something") == 0.0 and rouge_l("something", "") == 0.0


def test_lcs_by_hand():
    assert lcs_length(list("abcde"), list("ace")) == 3
    assert lcs_length(list("xayb"), list("ab")) == 2
    assert lcs_length(list("ba"), list("ab")) == 1
    assert lcs_length([], ["a"]) == 0
    # classic example: ABCBDAB vs BDCABA has an LCS of length 4 (e.g. BCBA)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


def test_rouge_l_counts_order_where_token_f1_does_not():
    # same bag of words, reversed order: token F1 is 1, LCS is 1 of 3 words: P = R = 1/3
    assert token_f1("one two three", "three two one") == 1.0
    assert rouge_l("one two three", "three two one") == pytest.approx(1 / 3)
    # Lin 2004's example: reference "police killed the gunman", candidate "police kill the gunman"
    # words without articles: [police, killed, gunman] vs [police, kill, gunman]: LCS 2, P = R = 2/3
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(2 / 3)


def test_f_measure_and_mean():
    assert f_measure(0.5, 1.0) == pytest.approx(2 / 3)
    assert f_measure(0.0, 0.0) == 0.0
    assert f_measure(0.5, 1.0, beta=2.0) == pytest.approx(5 * 0.5 / (1.0 + 4 * 0.5))  # = 5/6
    means = mean_overlap(["x y", "c"], ["x y", "d"])
    assert means == {"token_f1": pytest.approx(0.5), "rouge_l": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="2 candidates but 1 references"):
        mean_overlap(["x", "y"], ["x"])
