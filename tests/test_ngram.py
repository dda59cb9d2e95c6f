"""N-gram models: the textbook examples by hand, normalisation, Kneser-Ney against a plain reference."""

import math
import random
from collections import Counter, defaultdict

import numpy as np
import pytest

from lmpipe import ngram, wordtok
from lmpipe.ngram import kn_discounts

FRUIT = [s.split() for s in ["我 吃 苹果", "我 吃 香蕉", "我 喝 可乐"]]
QUESTIONS = [wordtok.tokenize(s) for s in
             ["Questions make difference.", "Questions make reality.", "Questions begin a quest."]]


def _random_corpus(seed: int = 0, n: int = 40) -> list[list[str]]:
    rng = random.Random(seed)
    words = ["a", "b", "c", "d", "e", "f", "g", "h"]
    return [[rng.choice(words[: rng.randint(2, 8)]) for _ in range(rng.randint(1, 7))] for _ in range(n)]


def test_fruit_bigram_mle_by_hand():
    model = ngram.fit(FRUIT, order=2, smoothing="mle")
    assert model.prob("吃", ["我"]) == pytest.approx(2 / 3)
    assert model.prob("喝", ["我"]) == pytest.approx(1 / 3)
    # P(我|<s>) P(吃|我) P(苹果|吃) P(</s>|苹果) = 1 · 2/3 · 1/2 · 1
    assert 10 ** model.sentence_logprob(["我", "吃", "苹果"]) == pytest.approx(1 / 3)


def test_fruit_unsegmented_text_splits_characters():
    sentences = [wordtok.tokenize(s) for s in ["我吃苹果。", "我吃香蕉。", "我喝可乐。"]]
    assert sentences[0] == ["我", "吃", "苹", "果", "。"]
    model = ngram.fit(sentences, order=2, smoothing="mle")
    assert model.prob("吃", ["我"]) == pytest.approx(2 / 3)
    assert model.prob("果", ["苹"]) == pytest.approx(1.0)


def test_fruit_bigram_add_one_by_hand():
    model = ngram.fit(FRUIT, order=2, smoothing="addk", k=1.0)
    v = 6 + 2  # six words, </s> and <unk>
    assert model.vocab.n_predictable == v
    assert model.prob("吃", ["我"]) == pytest.approx(3 / 11)
    assert model.prob("可乐", ["我"]) == pytest.approx(1 / 11)
    expected = (3 + 1) / (3 + v) * (2 + 1) / (3 + v) * (1 + 1) / (2 + v) * (1 + 1) / (1 + v)
    assert 10 ** model.sentence_logprob(["我", "吃", "苹果"]) == pytest.approx(expected)


def test_questions_unigram_and_bigram_by_hand():
    assert QUESTIONS[0] == ["Questions", "make", "difference", "."]
    uni = ngram.fit(QUESTIONS, order=1, smoothing="mle")
    # 13 words and 3 </s>: 16 predicted tokens
    assert uni.prob("Questions") == pytest.approx(3 / 16)
    assert uni.prob("make") == pytest.approx(2 / 16)
    assert uni.prob("quest") == pytest.approx(1 / 16)
    assert uni.prob("</s>") == pytest.approx(3 / 16)
    bi = ngram.fit(QUESTIONS, order=2, smoothing="mle")
    assert bi.prob("Questions", ["<s>"]) == pytest.approx(1.0)
    assert bi.prob("make", ["Questions"]) == pytest.approx(2 / 3)
    assert bi.prob("begin", ["Questions"]) == pytest.approx(1 / 3)
    assert bi.prob("reality", ["make"]) == pytest.approx(1 / 2)
    assert bi.prob(".", ["quest"]) == pytest.approx(1.0)
    assert 10 ** bi.sentence_logprob(["Questions", "make", "reality", "."]) == pytest.approx(2 / 3 * 1 / 2)


def test_four_gram_is_count_ratio():
    text = ["students opened their books", "students opened their laptops", "the students opened their books now",
            "students opened their minds", "students closed their books"]
    model = ngram.fit([s.split() for s in text], order=4, smoothing="mle")
    # count(students opened their w) / count(students opened their) = 2/4, 1/4, 1/4
    assert model.prob("books", ["students", "opened", "their"]) == pytest.approx(2 / 4)
    assert model.prob("laptops", ["students", "opened", "their"]) == pytest.approx(1 / 4)
    assert model.prob("closed", ["students", "opened", "their"]) == 0.0


def test_mle_perplexity_is_infinite_not_an_error():
    model = ngram.fit(FRUIT, order=2, smoothing="mle")
    test = [["我", "喝", "香蕉"], ["我", "吃", "苹果"]]
    assert math.isinf(model.perplexity(test))
    assert model.zero_probability_count(test) == 1  # P(香蕉|喝) = 0
    assert model.perplexity([["我", "吃", "苹果"]]) == pytest.approx(3 ** (1 / 4))


def test_stupid_backoff_scores_by_hand():
    model = ngram.fit(FRUIT, order=2, smoothing="stupid", alpha=0.4)
    assert model.prob("吃", ["我"]) == pytest.approx(2 / 3)
    # unseen bigram: 0.4 · c(苹果) / N, N = 12 predicted tokens
    assert model.prob("苹果", ["我"]) == pytest.approx(0.4 * 1 / 12)
    assert not model.normalised


def test_discount_formulas_by_hand():
    (d1, d2, d3), fell_back = kn_discounts([10, 4, 2, 1])
    y = 10 / 18
    assert (d1, d2, d3) == pytest.approx((1 - 2 * y * 4 / 10, 2 - 3 * y * 2 / 4, 3 - 4 * y * 1 / 2))
    assert not fell_back
    assert kn_discounts([10, 4, 0, 1]) == ((0.5, 1.0, 1.5), True)  # n3 = 0: the closed form is undefined
    assert kn_discounts([0, 5, 3, 1])[1]  # no singletons (deduplicated data)
    d, fell_back = ngram.good_turing_discounts([10, 4, 2], k=2)
    # r* = (r+1) n_{r+1}/n_r; d_r = (r*/r - 3 n3/n1) / (1 - 3 n3/n1)
    assert d == pytest.approx([(0.8 - 0.6) / 0.4, (0.75 - 0.6) / 0.4]) and not fell_back


@pytest.mark.parametrize("method", ["mle", "addk", "katz", "jm", "kn"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_sum_to_one_for_any_context(method, order):
    corpus = _random_corpus()
    kw = {"val": _random_corpus(seed=1, n=10)} if method == "jm" else {}
    model = ngram.fit(corpus, order, method, k=0.5, **kw)
    contexts = [[], ["<s>"], ["<s>", "a"], ["a", "b", "c"], ["h", "h", "h"], ["zzz", "a"], ["b", "zzz"],
                ["<s>", "zzz", "zzz"], *[random.Random(i).choices("abcdefgh", k=3) for i in range(8)]]
    for ctx in contexts:
        total = sum(model.next_word_distribution(ctx).values())
        if method == "mle" and total == 0:
            continue  # MLE has no distribution after a context whose continuations are all unseen
        assert total == pytest.approx(1.0, abs=1e-6), ctx  # tables hold float32 log-probabilities, as KenLM


def _reference_kn(sentences, order, vocab_size):
    """Interpolated modified Kneser-Ney written out directly from Chen & Goodman (1998), in plain Python."""
    raw = defaultdict(Counter)  # raw[k][ngram]
    for s in sentences:
        toks = ["<s>", *s, "</s>"]
        for i in range(1, len(toks)):
            for k in range(1, order + 1):
                if i - k + 1 >= 0:
                    raw[k][tuple(toks[i - k + 1: i + 1])] += 1
    adjusted = {order: raw[order]}
    for k in range(order - 1, 0, -1):
        left = Counter(g[1:] for g in raw[k + 1])
        adjusted[k] = Counter({g: (c if g[0] == "<s>" else left[g]) for g, c in raw[k].items()})
    discounts = {k: kn_discounts([sum(1 for c in adjusted[k].values() if c == r) for r in (1, 2, 3, 4)])[0]
                 for k in adjusted}

    def d(k, c):
        return 0.0 if c == 0 else discounts[k][min(c, 3) - 1]

    def p(word, ctx):
        k = len(ctx) + 1
        if k == 1:
            total = sum(adjusted[1].values())
            gamma = sum(d(1, c) for c in adjusted[1].values()) / total
            return max(adjusted[1].get((word,), 0) - d(1, adjusted[1].get((word,), 0)), 0) / total + gamma / vocab_size
        conts = {g: c for g, c in adjusted[k].items() if g[:-1] == tuple(ctx)}
        if not conts:
            return p(word, ctx[1:])
        total = sum(conts.values())
        c = conts.get((*ctx, word), 0)
        gamma = sum(d(k, x) for x in conts.values()) / total
        return (c - d(k, c)) / total + gamma * p(word, ctx[1:])

    return p


@pytest.mark.parametrize("order", [2, 3])
def test_kneser_ney_matches_plain_reference(order):
    corpus = _random_corpus(seed=3, n=80)
    model = ngram.fit(corpus, order, "kn")
    ref = _reference_kn(corpus, order, model.vocab.n_predictable)
    words = [w for w in model.vocab.words if w != "<s>"]
    for ctx in [["<s>"], ["a"], ["b", "c"], ["<s>", "a"], ["g", "zzz"], ["h", "a"]]:
        ctx = ctx[-(order - 1):]
        for w in words:
            want = ref(w, [t if t in model.vocab else "<unk>" for t in ctx])
            assert model.prob(w, ctx) == pytest.approx(want, rel=1e-6), (ctx, w)


def test_jelinek_mercer_lambdas_and_formula():
    corpus, val = _random_corpus(seed=4), _random_corpus(seed=5, n=15)
    counts = ngram.count(corpus, 2)
    lam = ngram.fit_lambdas(counts, 2, val)
    assert all(0 < x < 1 for x in lam)
    fixed = ngram.fit(counts, 2, "jm", lambdas=[0.7, 0.6])
    mle = ngram.fit(counts, 2, "mle")
    uni = ngram.fit(counts, 1, "mle")
    v = counts.vocab.n_predictable
    for w in ("a", "b", "</s>"):  # λ2 p_ML(w|a) + (1-λ2)(λ1 p_ML(w) + (1-λ1)/V)
        want = 0.6 * mle.prob(w, ["a"]) + 0.4 * (0.7 * uni.prob(w) + 0.3 / v)
        assert fixed.prob(w, ["a"]) == pytest.approx(want)
    # fitted λ's beat fixed ones on the data they were fitted on
    assert ngram.fit(counts, 2, "jm", lambdas=lam).perplexity(val) <= fixed.perplexity(val) + 1e-9


def test_generate_is_seeded_and_greedy_with_top_k_one():
    model = ngram.fit(QUESTIONS, order=2, smoothing="kn")
    assert model.generate("Questions", 10, seed=1) == model.generate("Questions", 10, seed=1)
    greedy, context = [], ["<s>", "Questions"]
    for _ in range(10):  # top_k = 1 is the argmax at every step
        best = max((p, -model.vocab.index[w], w) for w, p in model.next_word_distribution(context).items()
                   if w != "<unk>")[2]
        if best == "</s>":
            break
        greedy.append(best)
        context.append(best)
    assert model.generate(["Questions"], 10, top_k=1) == greedy
    dist = model.next_word_distribution(["Questions"])
    assert list(dist)[0] == "make" and "<s>" not in dist
    samples = [w for seed in range(20) for w in model.generate("", 8, seed=seed)]
    assert "<unk>" not in samples and "</s>" not in samples


def test_counts_reused_for_lower_orders_match_fresh_counts():
    corpus = _random_corpus(seed=6)
    counts = ngram.count(corpus, 4)
    for order in (1, 2, 3):
        shared = ngram.fit(counts, order, "kn")
        fresh = ngram.fit(corpus, order, "kn")
        lp_shared = shared.token_log10([shared.encode(s) for s in corpus[:10]])
        lp_fresh = fresh.token_log10([fresh.encode(s) for s in corpus[:10]])
        np.testing.assert_array_equal(lp_shared, lp_fresh)


def test_bits_per_byte_charges_oov_spelling():
    from lmpipe.scoring import text_bytes

    assert text_bytes(["ab", "é"]) == 3 + 3  # UTF-8 bytes plus one newline per document
    model = ngram.fit(FRUIT, 2, "kn")
    spelling = ngram.fit_spelling(["ab", "abc", "ba"])
    plain = ngram.score_texts(model, ["我 吃 香蕉"], spelling)
    assert plain.oov == 0
    assert plain.nll_bits == pytest.approx(-model.sentence_logprob(["我", "吃", "香蕉"]) * math.log2(10))
    assert plain.bytes == len("我 吃 香蕉".encode()) + 1 and plain.tokens == 4
    s = ngram.score_texts(model, ["我 吃 abx"], spelling)
    unk_bits = -model.sentence_logprob(["我", "吃", "abx"]) * math.log2(10)  # "abx" scored as <unk>
    # p(spelling) = p_char(a b <unk> </s>) · 2^-8 for the one byte of the character never seen ("x")
    spell_bits = -spelling.sentence_logprob(["a", "b", "x"]) * math.log2(10) + 8
    assert s.oov == 1 and s.oov_rate == pytest.approx(1 / 4)
    assert s.perplexity_unk == pytest.approx(2 ** (unk_bits / 4))
    assert s.nll_bits == pytest.approx(unk_bits + spell_bits)
    assert s.bits_per_byte == pytest.approx((unk_bits + spell_bits) / (len("我 吃 abx".encode()) + 1))


@pytest.mark.parametrize("method", ["kn", "katz", "addk"])
def test_large_vocabulary_keys_past_64_bits(tmp_path, method):
    """With 70k types an id takes 17 bits, so 4- and 5-grams need 128-bit keys while lower orders keep
    64-bit ones; estimation, lookup and ARPA export must agree across both key widths."""
    corpus = _random_corpus(seed=7, n=80)
    seen = sorted({w for s in corpus for w in s})
    vocab = wordtok.Vocabulary([*wordtok.SPECIALS, *seen, *(f"filler{i}" for i in range(70_000))])
    counts = ngram.count(corpus, 5, vocab=vocab)
    assert ngram.ngram_count.key_type(4, counts.bits) == "HUGEINT" == ngram.ngram_count.key_type(5, counts.bits)
    assert ngram.ngram_count.key_type(3, counts.bits) == "BIGINT"
    model = ngram.estimate(counts, 5, method)
    probe = [["<s>", "a", "b", "c"], ["a", "b", "c", "d"], ["h", "a", "zzz", "b"], ["c", "c", "c", "c"]]
    if method == "kn":
        ref = _reference_kn(corpus, 5, vocab.n_predictable)
        for ctx in probe:
            for w in [*seen, "</s>", "filler9"]:
                want = ref(w, [t if t in vocab else "<unk>" for t in ctx])
                assert model.prob(w, ctx) == pytest.approx(want, rel=1e-6), (ctx, w)
    if method != "addk":
        from lmpipe.arpa import read_arpa

        ngram.estimate_arpa(counts, 5, method, tmp_path / "big.arpa")
        loaded = read_arpa(tmp_path / "big.arpa")
        for ctx in probe:
            for w in [*seen, "</s>", "filler9"]:
                assert loaded.logprob(w, ctx) == pytest.approx(model.logprob(w, ctx), abs=1e-5), (ctx, w)
    for ctx in probe[:2]:
        assert sum(model.next_word_distribution(ctx).values()) == pytest.approx(1.0, abs=1e-4)
    counts.con.close()
