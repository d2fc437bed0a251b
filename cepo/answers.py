"""Extracting final answers from model responses, and vetting them before parsing.

The convention of math RLVR: the final answer is the content of the last ``\\boxed{...}``
in the response. Braces nest (``\\boxed{\\frac{1}{2}}``), so a regex is not enough.

Two concerns live here, both pure text work (no sympy, no math-verify import):

* ``extract_answer(text, mode)``: what the final answer is. Strict by default (the last
  complete box); a response without one has no answer. Other modes are opt-in.
* ``answer_limits(answer)``: a cheap structural check run before any parsing, so that
  an answer built to be slow (power towers, huge factorials, thousands of nested braces)
  is refused in microseconds instead of holding a verifier worker until its timeout.
"""

from __future__ import annotations

import math
import re

ANSWER_EXTRACTION_MODES = ("boxed", "last_number", "math_verify")

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\{|[{}]")

# Structural limits (see answer_limits). Ordinary answers are far inside every one.
MAX_RESPONSE_CHARS = 500_000      # a longer response is refused whole ("too_long")
MAX_WHOLE_TEXT_CHARS = 50_000     # math_verify mode parses the whole text: tighter
MAX_ANSWER_CHARS = 1_000          # an extracted answer longer than this: "too_long"
MAX_DEPTH = 8                     # nesting of {} () [] ("too_complex" beyond)
MAX_DIGITS = 100                  # digits in one number literal
MAX_EXPONENT = 10_000             # |exponent| of a power with a numeric base
MAX_SYMBOLIC_EXPONENT = 200       # |exponent| of a power whose base has a symbol
MAX_FACTORIAL = 1_000             # n in n! (and in \binom{n}{k})
MAX_VALUE_DIGITS = 20_000         # digits of the whole answer's value (upper bound)
MAX_TERMS = 100                   # terms once sums, products and powers are expanded


def extract_boxed(text: str) -> str | None:
    """Return the content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``).

    Nested braces are matched; "last" is by position of the marker, so in
    ``\\boxed{\\boxed{3}}`` it is ``3``. A box whose closing brace never comes (a
    truncated response) is skipped: an earlier complete box, if any, is the answer.
    None when there is no complete box. Linear time in ``len(text)``.
    """
    if "\\boxed{" not in text and "\\fbox{" not in text:
        return None
    stack: list[int] = []       # for each open brace: content start if a box, else -1
    best = -1
    best_span = None
    for m in _BOXED_RE.finditer(text):
        tok = m.group()
        if tok == "}":
            if stack:
                begin = stack.pop()
                if begin > best:
                    best, best_span = begin, (begin, m.start())
        elif tok == "{":
            stack.append(-1)
        else:  # a box marker, ending in its own open brace
            stack.append(m.end())
    if best_span is None:
        return None
    return text[best_span[0]:best_span[1]].strip()


_NUMBER_RE = re.compile(r"(?<![\d.,])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d|,\d)|(?<![\d.])-?\d+(?:\.\d+)?")


def extract_last_number(text: str) -> str | None:
    """The last number in ``text``, as a plain string, or None.

    Accepts: an optional ``-`` directly before the digits, taken as a sign unless it
    follows a digit ("x = -3" gives ``-3``, "10-3" gives ``3``), digits, an optional decimal part (``3.5``), and thousands
    separators in groups of three (``1,234`` gives ``1234``; "1,234, then" too). Nothing else: no fractions (``1/2`` gives ``2``), no ``\\frac``, no
    exponents, no percent sign (``50%`` gives ``50``), no words. A number with more
    than MAX_DIGITS digits is returned as is (the verifier refuses it).
    """
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    if last is None:
        return None
    return last.group().replace(",", "")


def extract_answer(text: str, mode: str = "boxed") -> str | None:
    """The final answer of a response according to ``mode`` (one of
    ANSWER_EXTRACTION_MODES), or None when the response has none.

    boxed (default): the content of the last complete ``\\boxed{...}`` / ``\\fbox{...}``
        (see extract_boxed). Text outside the box never counts, so restating the
        question ("45 - 11 cookies") earns nothing.
    last_number: the last number written anywhere (see extract_last_number for what
        counts as a number). For models that do not box; easier to game (a response can
        end with any number it likes).
    math_verify: what math-verify itself extracts from the whole text (its LaTeX and
        plain-expression extraction, the last match it can parse). GAMEABLE: it finds and
        evaluates any expression in the text, so "She has 45 - 11 cookies left." scores
        correct for gold 34. Kept only for compatibility; needs math-verify installed.
    """
    if mode == "boxed":
        return extract_boxed(text)
    if mode == "last_number":
        return extract_last_number(text)
    if mode == "math_verify":
        from math_verify import parse

        found = parse(text)
        if not found:
            return None
        return str(found[-1]) if isinstance(found[-1], str) else str(found[0])
    raise ValueError(f"answer_extraction must be one of {ANSWER_EXTRACTION_MODES}, got {mode!r}")


# --- structural limits -----------------------------------------------------------------

_DISJUNCTION_RE = re.compile(
    r"\\lor(?![a-zA-Z])|\\vee(?![a-zA-Z])|\\land(?![a-zA-Z])|\\wedge(?![a-zA-Z])"
    r"|\\pm(?![a-zA-Z])|\\mp(?![a-zA-Z])|(?<![a-zA-Z])(?:or|and)(?![a-zA-Z])")


def has_disjunction(answer: str) -> bool:
    """True when the answer offers alternatives in words or logic ("34 or 29",
    ``29 \\text{ or } 34``, ``34 \\lor 29``, ``\\pm 3``, "3 and 4"): such an answer must
    not match a single gold value even where the parser keeps only one side."""
    return _DISJUNCTION_RE.search(answer) is not None


_TOKEN_RE = re.compile(
    r"\\[a-zA-Z]+|\\.|\d+(?:\.\d+)?|\.\d+|\*\*|[a-zA-Z]|[{(\[]|[})\]]|[\^!]|\s+|.", re.DOTALL)
_OPEN, _CLOSE = set("{([") | {"\\{"}, set("})]") | {"\\}"}
_ADDITIVE = {"+", "-", "=", ",", ";", "<", ">", "&", "\\\\", "\\pm", "\\mp", "\\le", "\\ge",
             "\\leq", "\\geq", "\\neq", "\\ne", "\\cup", "\\cap", "\\lor", "\\vee"}
_FRACS = {"\\frac", "\\dfrac", "\\tfrac", "\\cfrac"}
_BINOMS = {"\\binom", "\\dbinom", "\\tbinom", "\\choose"}
_NEUTRAL = {"\\right", "\\left", "\\cdot", "\\times", "\\div", "\\,", "\\;", "\\!", "\\ ",
            "\\quad", "\\qquad", "\\text", "\\mathrm", "\\textbf", "\\mathbf", "\\operatorname"}


class _Refused(Exception):
    def __init__(self, status: str, why: str):
        super().__init__(why)
        self.status = status


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for m in re.finditer(r"[{(\[]|[})\]]", text):
        if m.group() in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif depth:
            depth -= 1
    return deepest


class _SizeBound:
    """An upper bound on the size of the numbers an expression denotes, by a tolerant
    recursive descent over LaTeX tokens. A size is log10 of max(|x|, 1/|x|) (how many
    digits an exact value needs either way); a symbol counts as 10. Sums and products
    add sizes (plus log10 of the count), a power multiplies the base's size by the
    exponent's value bound (so ``2^{2^{2^{2}}}`` is sized exactly). It also counts the
    terms the expression has once expanded (a sum adds its operands' counts, a product
    multiplies them, ``(a + b)^k`` has C(k + 1, 1) of them): sympy's time grows with it., n! is n log10 n. Every power's exponent and every factorial's
    argument is checked against its limit on the way: a power tower is refused at the
    first exponent that is too big, without computing anything large."""

    def __init__(self, text: str, count_terms: bool = True):
        self.count_terms = count_terms
        self.toks = [t for t in _TOKEN_RE.findall(text.replace("\\left", " ").replace("\\right", " "))
                     if not t.isspace()]
        self.i = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def seq(self, top: bool = False) -> tuple[float, bool, int]:
        total, count, symbolic = 0.0, 0, False
        terms, product = 0, 1   # terms of the sum so far; of the current product
        while self.i < len(self.toks):
            tok = self.toks[self.i]
            if tok in _CLOSE:
                self.i += 1
                if top:
                    continue
                break
            if tok in _ADDITIVE:
                self.i += 1
                terms, product = self._terms(terms + product), 1
                continue
            size, sym, t = self.chain()
            total += size
            count += 1
            symbolic |= sym
            product = self._terms(product * t)
        return total + math.log10(max(count, 1)), symbolic, self._terms(terms + product)

    def _terms(self, n: int) -> int:
        if self.count_terms and n > MAX_TERMS:
            raise _Refused("too_complex", f"more than {MAX_TERMS} terms once expanded")
        return n

    def chain(self) -> tuple[float, bool, int]:
        atoms = [self.atom()]
        while self.peek() in ("^", "**"):
            self.i += 1
            atoms.append(self.atom())
        size, sym, terms = atoms[-1]
        for base_size, base_sym, base_terms in reversed(atoms[:-1]):  # right-assoc: a^(b^c)
            limit = MAX_SYMBOLIC_EXPONENT if base_sym else MAX_EXPONENT
            if size > math.log10(limit):
                raise _Refused("too_complex", f"exponent of about 10^{size:.0f} > {limit}")
            k = math.ceil(10 ** size)
            # (a + b + ...)^k expands to C(k + t - 1, t - 1) terms; a symbolic exponent
            # does not expand
            terms = base_terms if sym else self._terms(math.comb(k + base_terms - 1, base_terms - 1))
            size, sym = k * base_size, base_sym or sym
        while self.peek() == "!":
            self.i += 1
            size = self._factorial(size)
        return size, sym, terms

    @staticmethod
    def _factorial(size: float) -> float:
        if size > math.log10(MAX_FACTORIAL):
            raise _Refused("too_complex", f"factorial of about 10^{size:.0f} > {MAX_FACTORIAL}")
        n = 10 ** size
        return n * max(math.log10(n), 1.0)

    def atom(self) -> tuple[float, bool]:
        tok = self.peek()
        if tok is None or tok in _CLOSE:
            return 0.0, False, 1
        self.i += 1
        if tok[0].isdigit() or (tok[0] == "." and len(tok) > 1):
            digits = sum(c.isdigit() for c in tok)
            if digits > MAX_DIGITS:
                raise _Refused("too_complex", f"a number with {digits} digits > {MAX_DIGITS}")
            value = float(tok) if digits < 300 else 10.0 ** digits
            return (abs(math.log10(value)) if value > 0 else 0.0), False, 1
        if tok in _OPEN:
            return self.seq()
        if tok in _FRACS:
            (a, sa, ta), (b, sb, tb) = self.atom(), self.atom()
            return a + b, sa or sb, self._terms(ta + tb)
        if tok in _BINOMS:
            (n, sn, tn), (k, sk, tk) = self.atom(), self.atom()
            self._factorial(n)
            return (10 ** n) * 0.302 + k, sn or sk, self._terms(tn + tk)
        if tok in _NEUTRAL or not (tok[0].isalpha() or tok[0] == "\\"):
            return 0.0, False, 1
        return 1.0, True, 1  # a letter or a command: a symbol, pi, \infty, \sin ...


def answer_limits(answer: str, *, whole_text: bool = False) -> tuple[str, str] | None:
    """Refuse an answer that would be slow to parse or verify, before any parsing.

    Returns None when the answer is within every limit, else ``(status, why)`` with
    status "too_long" (more than MAX_ANSWER_CHARS characters; MAX_WHOLE_TEXT_CHARS when
    ``whole_text``, the math_verify mode) or "too_complex" (nesting deeper than
    MAX_DEPTH; a number literal with more than MAX_DIGITS digits; a power whose exponent
    may exceed MAX_EXPONENT, or MAX_SYMBOLIC_EXPONENT when the base has a symbol; a
    factorial or binomial of more than MAX_FACTORIAL; more than MAX_TERMS terms once
    sums, products and powers are expanded, and a value that may need more than
    MAX_VALUE_DIGITS digits, these two not checked for whole texts, whose prose
    juxtaposes every number). Costs microseconds per character; never evaluates anything large.
    """
    limit = MAX_WHOLE_TEXT_CHARS if whole_text else MAX_ANSWER_CHARS
    if len(answer) > limit:
        return "too_long", f"{len(answer)} characters > {limit}"
    depth = _nesting_depth(answer)
    if depth > MAX_DEPTH:
        return "too_complex", f"nesting depth {depth} > {MAX_DEPTH}"
    try:
        size, _, _ = _SizeBound(answer, count_terms=not whole_text).seq(top=True)
    except _Refused as e:
        return e.status, str(e)
    if not whole_text and size > MAX_VALUE_DIGITS:
        return "too_complex", f"a value of about {size:.0f} digits > {MAX_VALUE_DIGITS}"
    return None
