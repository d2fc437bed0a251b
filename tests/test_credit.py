"""Token-credit maps and the decisive / template split."""

from cepo import credit
from tiny_lm import make_tokenizer


def test_decisive_mask():
    texts = list("6-17=-11\n-11*8=-88\n") + ["\\boxed{", "-", "8", "8", "}", "<eos>"]
    mask = credit.decisive_mask(texts)
    decisive = "".join(t for t, m in zip(texts, mask) if m)
    assert decisive == "-11-88-88"  # the two intermediate results and the boxed answer


def test_stats_and_renderers(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    ids = tok("3+4=7\n\\boxed{7}", add_special_tokens=False).input_ids
    texts = credit.token_texts(tok, ids)
    mask = credit.decisive_mask(texts)
    delta = [1.0 if m else 0.1 for m in mask]
    rows = [{"step": 1, "tokens": ids, "delta": delta, "weight": [1.0] * len(ids),
             "correct": c, "has_negative": True, "advantage": 1.0 if c else -1.0} for c in (True, False)]
    assert "".join(t for t, m in zip(texts, mask) if m) == "77"  # char-level \boxed{ too
    stats = credit.decisive_stats(rows, tok)
    assert stats["mean_abs_delta_decisive"] == 1.0 and abs(stats["mean_abs_delta_template"] - 0.1) < 1e-9
    picked = credit.pick_rollouts(rows)
    assert [r["correct"] for r in picked] == [True, False]
    html = credit.render_html({"cepo": picked}, tok, tmp_path / "m.html").read_text()
    assert "delta=1.000" in html and "correct" in html and "wrong" in html
    assert credit.render_png({"cepo": picked}, tok, tmp_path / "m.png").stat().st_size > 2000
